"""The shipped behaviour policies (results/policies/): the manifest is complete, and the
halfcheetah and hopper medium policies and the shipped experts reach their documented score band
through the README's command (scripts/eval_policy.py, 10 held-out start states;
results/policies/heldout_eval.jsonl records every policy's result)."""

import json
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch

from conftest import REPO, assert_main_refuses, finished_run, load_run_file, load_script, read_metrics, run_script

MANIFEST = json.loads((REPO / "results" / "policies" / "manifest.json").read_text())
SHIPPED = sorted(name for name, entry in MANIFEST.items() if entry["file"] is not None)


# What a user needs to trust and reproduce a shipped policy: how long and on what it trained, the
# exact command and config, and the evaluation that put it in its band.
ENTRY_FIELDS = {
    "file",
    "env",
    "seed",
    "command",
    "sac_config",
    "torch_threads",
    "training_env_steps",
    "wall_time_s",
    "hardware",
    "eval_episodes",
    "eval_return",
    "eval_normalized_score",
    "score_band",
}


def test_every_entry_is_shipped_or_says_why():
    sac = load_script("algorithms/sac.py")
    for name, entry in MANIFEST.items():
        if entry["file"] is None:
            assert entry["status"].startswith("not trained"), name
        else:
            assert ENTRY_FIELDS <= set(entry), (name, ENTRY_FIELDS - set(entry))
            assert entry["wall_time_s"] > 0 and entry["eval_episodes"] > 0 and entry["hardware"], name
            assert (REPO / "results" / "policies" / entry["file"]).exists(), name
            low, high = entry["score_band"]
            assert low <= entry["eval_normalized_score"] <= high, name
            # On today's reference returns (a change of references must re-export the entries it moves).
            today = float(sac.normalized_score(entry["env"], entry["eval_return"]))
            assert entry["eval_normalized_score"] == pytest.approx(today, abs=0.051), name
            assert entry["command"].startswith(
                f"OMP_NUM_THREADS={entry['torch_threads']} python algorithms/sac.py --env {entry['env']}"
            )
            assert entry["sac_config"]["env"] == entry["env"] and entry["training_env_steps"] > 0


def test_medium_and_expert_policies_follow_the_d4rl_protocol():
    """Every env but ant (an expert only, for its v5 reference) has a medium and an expert entry; a
    medium policy is a SAC run stopped at its stop score, an expert one the same run's config trained
    to the end (D4RL: the same SAC, 1M steps) or, where that final policy missed its band, to one of
    its checkpoints (configs/sweeps/sac_experts.yaml)."""
    envs = ("halfcheetah", "hopper", "walker2d")
    adroit = {"pen-medium"}  # configs/sweeps/sac_pen_medium.yaml; D4RL has no Adroit medium or SAC expert
    ant = {"ant-expert"}  # the Ant-v5 expert reference (configs/sweeps/sac_ant_expert.yaml); no ant medium
    assert set(MANIFEST) == {f"{env}-{level}" for env in envs for level in ("medium", "expert")} | adroit | ant
    # Fields sac.py gained after the medium runs kept their old behaviour as the default.
    defaults = asdict(load_script("algorithms/sac.py").Config())
    for name in SHIPPED:
        entry = MANIFEST[name]
        config = entry["sac_config"]
        if name.endswith("-medium"):
            assert config["stop_score"] is not None, name
            assert entry["training_env_steps"] < config["total_steps"], name
        else:
            if name == "ant-expert":  # no medium run: the other experts' config (sac_ant_expert.yaml)
                medium = {**MANIFEST["halfcheetah-medium"]["sac_config"], "env": "ant"}
            else:
                medium = MANIFEST[name.replace("-expert", "-medium")]["sac_config"]
            assert config["stop_score"] is None and entry["training_env_steps"] == config["total_steps"]
            # The final policy of the 1M-step run, or by the sweep file's rule an earlier checkpoint's.
            assert config["total_steps"] == 1_000_000 or (
                config["total_steps"] % config["checkpoint_every"] == 0 and "missed the band" in entry["note"]
            ), name
            differ = {k for k in config if config[k] != medium.get(k, defaults.get(k))}
            assert differ <= {"stop_score", "wandb_project", "total_steps"}, (name, differ)


# Not walker2d-medium: deterministic rollouts are chaotic in the last bits of the actions, so on
# another CPU the 10 held-out episodes become 10 other draws from the policy's return
# distribution. Resampling 10-episode means from 100 held-out episodes per policy (seeds
# 10000-10049 and 20000-20049, heldout_eval.jsonl) put them below the band's 25 in 0.003% of
# draws for halfcheetah, never for hopper, and in 20% for walker2d (episode std 13.5): a failure
# there would say nothing about the policy. halfcheetah-expert: each of its 100 held-out episodes
# scored at least 88.6 (episode std 0.7-0.8), far inside its band of 60-130. hopper-expert: these 10
# start states chose its checkpoint (96.5 on them), so on this CPU type the test re-checks that
# choice; on 50 other start states (seeds 20000-20049) it scores 84.5 with episode std 19.9, so a
# 10-episode mean sits ~4 standard errors above the band's 60.
# pen-medium: 19.6 normalised on 100 held-out episodes with an episode std of 40.1, so a 10-episode
# mean falls below its band's 0 in about 6% of draws: not tested here either.
# ant-expert: 100.0 and 118.4 on two sets of 100 held-out episodes (episode std 53.5 / 48.1): taking
# the episodes as normal around ~109, a 10-episode mean on another CPU type leaves its band of 60-130
# in about 10% of draws, so it is not tested here (on this CPU, seeds 10000-10009 give 114.5).
# walker2d-expert: on 50 independent start states (seeds 20000-20049) it scores 111.8 with
# episode std 11.6, so a 10-episode mean sits ~14 standard errors above the band's 60 and ~5 below its 130.
@pytest.mark.parametrize(
    "name", ["halfcheetah-medium", "hopper-medium", "halfcheetah-expert", "hopper-expert", "walker2d-expert"]
)
def test_shipped_policy_reaches_its_band(name, datasets_root):
    assert name in SHIPPED
    result = run_script("scripts/eval_policy.py", [name, "--episodes", "10"], datasets_root)
    assert result.returncode in (0, 1), result.stderr[-3000:]  # 1 = out of band, anything else a crash
    report = json.loads(result.stdout)
    assert report["policy"] == name and report["episodes"] == 10
    if name.startswith("halfcheetah"):  # never terminates: every episode runs to the 1,000-step limit
        assert report["episode_length"] == 1000.0
    assert result.returncode == 0 and report["in_band"], report


def test_eval_policy_counts_each_episode_until_it_ends(monkeypatch):
    """eval_policy.py's return and episode length: episodes that end at steps 3 and 7 (reward 1 per
    step) give a mean length and return of 5, and no step is counted after an episode's end."""
    evaluate = load_script("scripts/eval_policy.py")
    so2 = evaluate.make_dataset.so2

    class Ends:
        def __init__(self, steps):
            self.steps, self.taken = steps, 0

        def reset(self, seed):
            return np.zeros(2), {}

        def step(self, action):
            assert self.taken < self.steps, "stepped after the episode ended"
            self.taken += 1
            return np.zeros(2), 1.0, self.taken == self.steps, False, {}

    envs = iter([Ends(3), Ends(7)])
    monkeypatch.setattr(so2, "make_env", lambda name: next(envs))

    def actor(obs, deterministic):
        return torch.zeros(len(obs), 1), None

    monkeypatch.setattr(evaluate.make_dataset, "load_policy", lambda *a: (actor, {"score_band": [0.0, 100.0]}))
    report = evaluate.evaluate(evaluate.Args("hopper-medium", episodes=2))
    assert (report["episode_length"], report["return"], report["return_std"]) == (5.0, 5.0, 2.0)


def test_export_at_a_checkpoint_records_the_shorter_run(tmp_path, datasets_root, monkeypatch):
    """--at-step N FILE (the experts' rule for a final policy outside its band): the shipped actor is
    FILE, and the entry describes the run that ends at N: its steps, evaluation and command."""
    run_dir, _ = finished_run(
        "algorithms/sac.py",
        "--env hopper --total-steps 300 --learning-starts 100 --eval-every 150 --eval-episodes 1 "
        "--hidden-dim 32 --batch-size 32 --checkpoint-every 150".split(),
        tmp_path / "runs",
        datasets_root,
    )
    actor = {k: v + 1.0 for k, v in load_run_file(run_dir / "final.pt")["agent"]["actor"].items()}
    torch.save(actor, tmp_path / "actor_150.pt")
    monkeypatch.syspath_prepend(str(REPO / "scripts"))  # its `from common import ...`, as when run
    export = load_script("scripts/export_policy.py")
    monkeypatch.setattr(export, "POLICIES", tmp_path / "policies")
    with pytest.raises(SystemExit) as refused:  # no checkpoint (nor evaluation) at step 100
        export.main(export.Args(str(run_dir), "hopper-expert", at_step=(100, str(tmp_path / "actor_150.pt"))))
    assert refused.value.code == 2 and not (tmp_path / "policies" / "hopper-expert.pt").exists()
    # The entry's score is on the reference returns of today's code, not those logged in training.
    monkeypatch.setitem(load_script("algorithms/sac.py").ENVS, "hopper", ("Hopper-v5", (0.0, 1000.0), None))
    export.main(
        export.Args(str(run_dir), "hopper-expert", band=(0.0, 100.0), at_step=(150, str(tmp_path / "actor_150.pt")))
    )
    entry = json.loads((tmp_path / "policies" / "manifest.json").read_text())["hopper-expert"]
    at_150 = next(r for r in read_metrics(run_dir) if r["env_steps"] == 150)
    assert entry["training_env_steps"] == entry["sac_config"]["total_steps"] == 150
    assert entry["eval_return"] == round(at_150["return"], 1) and "--total-steps 150 " in entry["command"]
    assert entry["eval_normalized_score"] == round(at_150["return"] / 10.0, 1)  # 100 * return / 1000
    assert "of a 300-step run" in entry["note"]
    shipped = load_run_file(tmp_path / "policies" / "hopper-expert.pt")
    assert shipped.keys() == actor.keys() and all(torch.equal(shipped[k], actor[k]) for k in actor)


def test_keep_actors_copies_every_checkpoint_until_the_run_ends(tmp_path, monkeypatch, capsys):
    """scripts/keep_actors.py beside a run: each checkpoint's actor lands in actors/step_<step>.pt
    (the FILE of export_policy.py --at-step), including the one written just before final.pt; a
    checkpoint it has seen is not read again; it returns once final.pt exists."""
    keep = load_script("scripts/keep_actors.py")
    run = tmp_path / "run"
    assert_main_refuses(keep, keep.Args(str(run)), capsys, "is not a run folder")
    run.mkdir()
    (run / "config.yaml").write_text("env: hopper\n")
    assert_main_refuses(keep, keep.Args(str(run), poll_s=float("nan")), capsys, "--poll-s must be")

    def actor(step: int) -> dict:
        return {"net.0.weight": torch.full((2, 3), float(step))}

    def write_checkpoint(step: int) -> None:
        torch.save({"step": step, "agent": {"actor": actor(step)}}, run / "checkpoint.pt")

    # The "training" between two polls: nothing yet, checkpoint 25, no change, 50, then 75 and final.pt.
    timeline = iter([None, 25, None, 50, 75])
    loads = []
    real_load = torch.load
    monkeypatch.setattr(keep.torch, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))

    def training(_seconds):
        step = next(timeline)
        if step is not None:
            write_checkpoint(step)
            os.utime(run / "checkpoint.pt", ns=(step, step))  # a new mtime even within the clock's tick
        if step == 75:
            torch.save({"agent": {"actor": actor(999)}}, run / "final.pt")

    monkeypatch.setattr(keep.time, "sleep", training)
    keep.main(keep.Args(str(run), poll_s=0.0))
    kept = sorted((run / "actors").iterdir())
    assert [p.name for p in kept] == ["step_25.pt", "step_50.pt", "step_75.pt"]
    for path, step in zip(kept, (25, 50, 75)):
        assert torch.equal(real_load(path)["net.0.weight"], actor(step)["net.0.weight"])
    assert len(loads) == 3  # one read per new checkpoint, none while it was unchanged
