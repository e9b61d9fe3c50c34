"""The blocks that every algorithm file copies on purpose stay identical, and the files keep one
section order. A reader who diffs two algorithm files should see only the algorithms."""

import ast
import re

import pytest

from conftest import REPO

FILES = sorted((REPO / "algorithms").glob("*.py"))

# Same-named top-level definitions that differ on purpose, and why. Everything else defined in two
# or more algorithm files must be identical, character for character.
DELIBERATE = {
    "Config": "each algorithm has its own fields",
    "RESUME_FIXED": "the fields a resumed run cannot change depend on the algorithm",
    "PHASE_BUDGET": "sac.py has one phase, online, with its own budget field",
    "resolve_config": "the checks of each algorithm's own fields",
    "parse_env_name": "cal_ql.py also takes AntMaze names",
    "dataset_ids": "cal_ql.py also resolves AntMaze ids",
    "build_flat_cache": "cal_ql.py flattens AntMaze's dict observations",
    "make_env": "cal_ql.py recovers AntMaze envs from the dataset; sac.py takes a bare env name",
    "GYM_IDS": "sac.py trains the locomotion envs only; cal_ql.py adds AntMaze",
    "REF_SCORES": "the same constants for the envs each file supports",
    "ReplayBuffer": "cal_ql.py stores the return-to-go and appends whole trajectories",
    "VectorizedCritic": "each method's released init: EDAC's (so2, cal_ql), nn.Linear's (td3_bc; sac, which "
    "trained the shipped behaviour policies), orthogonal (iql)",
    "pretrain": "the algorithm's own update",
    "finetune": "the algorithm's own online loop",
    "read_pretrained": "the network sizes a pretraining must match",
    "train": "the algorithm's own phases",
    "ALGO": "the file's name",
    "FIRST_RESULT": "the way to a first result on a CPU differs per algorithm",
    "time_phases": "the phases and updates of each algorithm",
    "Evaluator": "odt.py's policy reads a window of returns-to-go, states and actions, and has no Q to diagnose",
    "check_common": "odt.py has no Q diagnostics, so no kendall_windows / mc_tail_steps to check",
}


def top_level(path) -> dict[str, str]:
    source = path.read_text()
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = ast.get_source_segment(source, node)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = ast.get_source_segment(source, node)
    return out


def test_shared_definitions_are_identical():
    definitions = {path.name: top_level(path) for path in FILES}
    shared = {
        name for defs in definitions.values() for name in defs if sum(name in d for d in definitions.values()) > 1
    }
    assert {
        "Evaluator",
        "RunLog",
        "Run",
        "load_dataset",
        "Actor",
        "parse_args",
    } <= shared  # the check looks at real blocks
    differing = []
    for name in sorted(shared - set(DELIBERATE)):
        versions = {defs[name] for defs in definitions.values() if name in defs}
        if len(versions) > 1:
            differing.append(f"{name} ({', '.join(f for f, d in definitions.items() if name in d)})")
    assert not differing, f"shared definitions differ: {differing}"


def test_deliberate_differences_are_real():
    """An entry of DELIBERATE whose copies became identical (or that no file defines twice) is
    stale and must go, so the list stays short and true."""
    definitions = [top_level(path) for path in FILES]
    for name in DELIBERATE:
        versions = {defs[name] for defs in definitions if name in defs}
        assert len(versions) > 1, f"{name}: listed as a deliberate difference but its copies are identical"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_section_order(path):
    """Every algorithm file has the same sections in the same order."""
    headers = re.findall(r"^# -{90,}\n# ([^\n:(]+).*\n# -{90,}$", path.read_text(), flags=re.M)
    expected = [
        "Config",
        "Config parsing and checks",
        "Datasets" if path.name != "sac.py" else "Environment and scores",
        "Replay buffer",
        "Networks",
        "Losses and updates",
        "Evaluation and Q diagnostics",
        "Run folder",
        "Train loop",
    ]
    assert [h.strip() for h in headers] == expected
