"""The shipped behaviour policies (results/policies/): the manifest is complete, and the
halfcheetah and hopper medium policies reach their documented score band through the README's
command (scripts/eval_policy.py, 10 held-out start states; results/policies/heldout_eval.jsonl
records every policy's result)."""

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
            assert entry["command"].startswith(
                f"OMP_NUM_THREADS={entry['torch_threads']} python algorithms/sac.py --env {entry['env']}"
            )
            assert entry["sac_config"]["env"] == entry["env"] and entry["training_env_steps"] > 0


# Not walker2d-medium: deterministic rollouts are chaotic in the last bits of the actions, so on
# another CPU the 10 held-out episodes become 10 other draws from the policy's return
# distribution. Resampling 10-episode means from 100 held-out episodes per policy (seeds
# 10000-10049 and 20000-20049, heldout_eval.jsonl) put them below the band's 25 in 0.003% of
# draws for halfcheetah, never for hopper, and in 20% for walker2d (episode std 13.5): a failure
# there would say nothing about the policy.
@pytest.mark.parametrize("name", ["halfcheetah-medium", "hopper-medium"])
def test_shipped_policy_reaches_its_band(name, datasets_root):
    assert name in SHIPPED
    result = run_script("scripts/eval_policy.py", [name, "--episodes", "10"], datasets_root)
    assert result.returncode in (0, 1), result.stderr[-3000:]  # 1 = out of band, anything else a crash
    report = json.loads(result.stdout)
    assert report["policy"] == name and report["episodes"] == 10
    assert result.returncode == 0 and report["in_band"], report
