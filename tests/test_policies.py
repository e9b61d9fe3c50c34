"""The shipped behaviour policies (results/policies/): the manifest is complete, and each policy
reaches its documented score band through the README's command (scripts/eval_policy.py) on the
first 5 of its 10 held-out start states (results/policies/heldout_eval.jsonl records both)."""

import json

import pytest

from conftest import REPO, run_script

MANIFEST = json.loads((REPO / "results" / "policies" / "manifest.json").read_text())
SHIPPED = sorted(name for name, entry in MANIFEST.items() if entry["file"] is not None)


def test_every_entry_is_shipped_or_says_why():
    for name, entry in MANIFEST.items():
        if entry["file"] is None:
            assert entry["status"].startswith("not trained"), name
        else:
            assert (REPO / "results" / "policies" / entry["file"]).exists(), name
            low, high = entry["score_band"]
            assert low <= entry["eval_normalized_score"] <= high, name
            assert entry["command"].startswith(f"OMP_NUM_THREADS={entry['torch_threads']} python algorithms/sac.py --env {entry['env']}")
            assert entry["sac_config"]["env"] == entry["env"] and entry["training_env_steps"] > 0


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_policy_reaches_its_band(name, datasets_root):
    result = run_script("scripts/eval_policy.py", [name, "--episodes", "5"], datasets_root)
    assert result.returncode in (0, 1), result.stderr[-3000:]  # 1 = out of band, anything else a crash
    report = json.loads(result.stdout)
    assert report["policy"] == name and report["episodes"] == 5
    assert result.returncode == 0 and report["in_band"], report
