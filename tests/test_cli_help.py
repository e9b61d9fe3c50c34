"""Every algorithm script's --help documents every field of its Config."""

import pytest

from conftest import load_script, run_script


@pytest.mark.parametrize("relative", ["algorithms/so2.py", "algorithms/cal_ql.py", "algorithms/sac.py"])
def test_help_documents_every_field(relative, datasets_root):
    result = run_script(relative, ["--help"], datasets_root)
    assert result.returncode == 0
    for field in load_script(relative).Config.__dataclass_fields__:
        assert "--" + field.replace("_", "-") in result.stdout, field
