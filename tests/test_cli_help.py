"""Every script answers --help, and an algorithm script's help carries each Config field's flag
and its documentation."""

import re

import pytest

from conftest import REPO, load_script, run_script

ALGORITHMS = sorted(f"algorithms/{p.name}" for p in (REPO / "algorithms").glob("*.py"))
SCRIPTS = sorted(
    f"scripts/{p.name}" for p in (REPO / "scripts").glob("*.py") if p.name != "common.py"
)  # common.py is a module


def words(text: str) -> str:
    """Text without tyro's box drawing and without any whitespace (tyro re-wraps lines)."""
    return "".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.parametrize("relative", ALGORITHMS)
def test_help_documents_every_field(relative, datasets_root):
    result = run_script(relative, ["--help"], datasets_root)
    assert result.returncode == 0
    shown = words(result.stdout)
    fields = load_script(relative).Config.__dataclass_fields__
    assert set(FIELD_DOCS[relative]) == set(fields)  # every field has a docstring under it
    for name in fields:
        assert "--" + name.replace("_", "-") in shown, name
        help_text = words(FIELD_DOCS[relative][name])
        assert help_text and help_text in shown, (name, help_text)


def field_docs(relative: str) -> dict[str, str]:
    """The docstring under each Config field, read from the source as tyro reads it."""
    source = (REPO / relative).read_text()
    body = source[source.index("class Config:") : source.index("\n\n\n", source.index("class Config:"))]
    return {
        m.group(1): m.group(2)
        for m in re.finditer(r"^    (\w+): [^\n]+\n    \"\"\"(.*?)\"\"\"", body, flags=re.M | re.S)
    }


FIELD_DOCS = {relative: field_docs(relative) for relative in ALGORITHMS}


@pytest.mark.parametrize("relative", SCRIPTS)
def test_every_script_answers_help(relative, datasets_root):
    result = run_script(relative, ["--help"], datasets_root)
    assert result.returncode == 0 and "usage:" in result.stdout and "Traceback" not in result.stderr, result.stderr[
        -2000:
    ]
