"""Every algorithm file reads as its method first, then one banner, then the shared plumbing. Each
definition of the plumbing is identical in every file that has it, so a reader who diffs two
algorithm files sees only the methods."""

import ast
import functools
import re

import pytest

from conftest import REPO, load_script

FILES = sorted((REPO / "algorithms").glob("*.py"))
BANNER = "identical in every algorithm file"
RULE = r"# -{90,}"
# The method's sections, in this order; "Method data" (a method's own dataset handling or buffer) is optional.
PART1 = ["Config", "Method data", "Networks", "Losses and updates", "Train loop"]
# The plumbing's sections, in this order; a file leaves out those it does not use (sac.py has no dataset).
PART2 = [
    "Config parsing and checks",
    "Environments and scores",
    "Datasets",
    "Replay buffer",
    "Evaluation and Q diagnostics",
    "Run folder",
]
# Definitions of the method (above the banner) that share a name with another file's and differ, and why.
DELIBERATE = {
    "Config": "each algorithm has its own fields",
    "RESUME_FIXED": "the fields a resumed run cannot change depend on the algorithm",
    "PHASE_BUDGET": "sac.py has one phase, online, with its own budget field",
    "resolve_config": "the checks of each algorithm's own fields",
    "ALGO": "the file's name",
    "FIRST_RESULT": "the way to a first result on a CPU differs per algorithm",
    "VectorizedCritic": "each method's released init: EDAC's (so2, cal_ql), nn.Linear's (td3_bc; sac, which "
    "trained the shipped behaviour policies), orthogonal (iql), Xavier-uniform with LayerNorm (rlpd), orthogonal "
    "with LayerNorm (wsrl)",
    "pretrain": "the algorithm's own update",
    "finetune": "the algorithm's own online loop",
    "online": "the online loop of a file without pretraining (sac.py, rlpd.py)",
    "Actor": "rlpd.py's and wsrl.py's are their releases': Xavier-uniform weights and log-std in [-20, 2] "
    "(rlpd), LayerNorm, orthogonal weights and std in [1e-5, 10] (wsrl)",
    "td_target": "rlpd.py's is the min over a random subset of target members, wsrl.py's adds CQL's max backup",
    "sera_bonus": "so2.py's mixed buffer holds online rows too: it takes a mask of the online rows",
    "time_phases": "the phases and updates of each algorithm",
    "read_pretrained": "the network sizes a pretraining must match",
    "reward_rule": "each release's AntMaze reward and its source: r - 1 (rlpd, pex; awac as CORL's), r x 10 - 5 (wsrl)",
    "train": "the algorithm's own phases",
    # cal_ql.py's own version of a shared piece (its "Method data" section)
    "ReplayBuffer": "cal_ql.py stores the return-to-go and appends whole trajectories",
    # odt.py's own evaluator
    "Evaluator": "odt.py's policy reads a window of returns-to-go, states and actions, and has no Q to diagnose",
}


def definitions(source: str, start: int = 0, end: int | None = None) -> dict[str, str]:
    """Top-level functions, classes and assignments whose text starts in source[start:end]."""
    end = len(source) if end is None else end
    out = {}
    line_starts = [0]
    for line in source.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            name = node.name
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        else:
            continue
        if start <= line_starts[node.lineno - 1] < end:
            out[name] = ast.get_source_segment(source, node)
    return out


@functools.cache
def parts(path) -> tuple[dict[str, str], dict[str, str]]:
    """(definitions above the banner, definitions below it)."""
    source = path.read_text()
    banner = source.index(BANNER)
    return definitions(source, 0, banner), definitions(source, banner)


def test_plumbing_is_identical_in_every_file_that_has_it():
    plumbing = {path.name: parts(path)[1] for path in FILES}
    assert {"Evaluator", "open_run", "Run", "load_dataset", "parse_args", "ReplayBuffer"} <= {
        name for defs in plumbing.values() for name in defs
    }  # the check looks at real blocks
    differing = []
    for name in sorted({name for defs in plumbing.values() for name in defs}):
        versions = {defs[name] for defs in plumbing.values() if name in defs}
        if len(versions) > 1:
            differing.append(f"{name} ({', '.join(f for f, d in plumbing.items() if name in d)})")
    assert not differing, f"plumbing definitions differ: {differing}"


def test_shared_method_definitions_are_identical_unless_listed():
    """Above the banner too, a definition that two files share (Actor, soft_update, sera_reward, ...)
    is identical, or DELIBERATE says why not."""
    files = [{**below, **above} for above, below in map(parts, FILES)]
    method = {name for path in FILES for name in parts(path)[0]}
    differing = []
    for name in sorted(method - set(DELIBERATE)):
        if len({defs[name] for defs in files if name in defs}) > 1:
            differing.append(name)
    assert not differing, f"shared definitions differ: {differing}"


def test_deliberate_differences_are_real_and_in_the_method():
    """An entry of DELIBERATE whose copies became identical is stale, so the list stays short and
    true; and no file defines a name both above and below the banner."""
    files = [parts(path) for path in FILES]
    for name in DELIBERATE:
        versions = {d[name] for above, below in files for d in (above, below) if name in d}
        assert len(versions) > 1, f"{name}: listed as a deliberate difference but its copies are identical"
    for path, (above, below) in zip(FILES, files):
        assert not (set(below) & set(above)), path.name


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_method_first_then_plumbing(path):
    """Part 1 (the method) in PART1's order, the banner, then Part 2 in PART2's order; the
    __main__ guard ends the file."""
    source = path.read_text()
    banner = source.index(BANNER)
    title = re.compile(rf"^{RULE}\n# ([^\n:(]+).*\n{RULE}$", re.M)
    above = [m.group(1).strip() for m in title.finditer(source[:banner])]
    below = [m.group(1).strip() for m in title.finditer(source[banner:])]
    assert above[0] == "Config" and above == [s for s in PART1 if s in above], above
    assert {"Networks", "Losses and updates", "Train loop"} <= set(above)
    assert below == [s for s in PART2 if s in below] and {"Config parsing and checks", "Run folder"} <= set(below)
    assert source.rstrip().endswith('if __name__ == "__main__":\n    main()')
    assert "def main(" in source[:banner]  # main stands with the method, above the helpers it calls


def test_file_layout_counts_the_two_parts():
    """scripts/file_layout.py (the README's table): the method is every line above the banner line,
    the plumbing the rest, and the learning rule and train loop start at their section titles."""
    row = load_script("scripts/file_layout.py").layout(REPO / "algorithms" / "so2.py")
    lines = (REPO / "algorithms" / "so2.py").read_text().splitlines()
    assert row["lines"] == len(lines) and row["method"] + row["plumbing"] == len(lines)
    assert BANNER in lines[row["method"]] and not any(BANNER in line for line in lines[: row["method"]])
    assert lines[row["rule"] - 1].startswith("# Losses and updates") and lines[row["loop"] - 1] == "# Train loop"


def test_readme_layout_table_is_current():
    """The README's table of method and plumbing lines is what scripts/file_layout.py prints today."""
    table = load_script("scripts/file_layout.py").table(FILES)
    assert table in (REPO / "README.md").read_text(), "regenerate it: python scripts/file_layout.py"
