"""Print a markdown table of each algorithm file's layout: its method (above the banner) and its shared
plumbing (below it), in lines, with where the learning rule and the train loop start.

  python scripts/file_layout.py          # the table in the README's "How to read a file" section

Counted with the file's own text, so the README's table is regenerated, never typed
(tests/test_shared_blocks.py checks that the README holds the current table).
"""

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

REPO = Path(__file__).resolve().parent.parent
BANNER = "identical in every algorithm file"


@dataclass
class Args:
    files: tyro.conf.Positional[tuple[str, ...]] = ()
    """Algorithm files; every algorithms/*.py by default."""


def layout(path: Path) -> dict:
    lines = path.read_text().splitlines()
    banner = next((i for i, line in enumerate(lines) if BANNER in line), None)
    if banner is None:
        raise ValueError(f"{path}: no plumbing banner (a line with '{BANNER}')")

    def first(title: str) -> int:
        pattern = re.compile(rf"^# {title}\b")
        return next(i + 1 for i, line in enumerate(lines) if pattern.match(line))

    return {
        "file": path.name,
        "lines": len(lines),
        "method": banner,  # the lines above the banner (docstring, imports, Config, networks, rule, loop, main)
        "plumbing": len(lines) - banner,
        "rule": first("Losses and updates"),
        "loop": first("Train loop"),
    }


def table(paths: list[Path]) -> str:
    rows = ["| file | lines | the method | shared plumbing | learning rule from line | train loop from line |"]
    rows.append("|---|---|---|---|---|---|")
    for r in map(layout, paths):
        share = f"{100 * r['method'] / r['lines']:.0f}%"
        rows.append(
            f"| `{r['file']}` | {r['lines']:,} | {r['method']:,} ({share}) | {r['plumbing']:,} | {r['rule']} | {r['loop']} |"
        )
    return "\n".join(rows)


def main(args: Args) -> int:
    try:
        print(table([Path(f) for f in args.files] or sorted((REPO / "algorithms").glob("*.py"))))
    except (OSError, ValueError) as exc:
        print(f"file_layout.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
