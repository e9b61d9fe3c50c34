"""algorithms/so2.py end to end as a user runs it: tiny runs, determinism, bad input."""

import copy
import json
import math
import shutil
from functools import partial

import pytest
import torch

from conftest import (
    assert_one_line_error,
    check_summary,
    finished_run,
    load_run_file,
    load_script,
    read_metrics,
    rows_in,
    run_script,
)

RECORD_KEYS = load_script("algorithms/so2.py").RECORD_KEYS

# Tiny budget: a 1,500-step random dataset, 30 pretraining and 60 online steps, 2 critics.
TINY = (
    "--env walker2d-random --random-dataset-steps 1500 --num-critics 2 --hidden-dim 32 "
    "--pretrain-steps 30 --pretrain-eval-every 15 --batch-size 32 --online-steps 60 "
    "--warmup-steps 20 --utd 2 --online-batch-size 16 --mixed-batch-size 48 --eval-every 20 "
    "--eval-episodes 2 --mc-tail-steps 5 --kendall-windows 2"
).split()


run = partial(run_script, "algorithms/so2.py")
finished = partial(finished_run, "algorithms/so2.py")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, datasets_root):
    return finished(TINY + ["--track"], tmp_path_factory.mktemp("runs"), datasets_root)[0]


def test_end_to_end_outputs(tiny_run):
    assert {"config.yaml", "metrics.jsonl", "summary.json", "pretrain.pt", "final.pt", "wandb"} <= {
        p.name for p in tiny_run.iterdir()
    }
    records = read_metrics(tiny_run)
    assert all(tuple(r)[: len(RECORD_KEYS)] == RECORD_KEYS for r in records)
    assert [(r["phase"], r["step"], r["env_steps"]) for r in records] == [
        ("pretrain", 15, 0),
        ("pretrain", 30, 0),
        # 40 env steps after the 20 warm-up steps, 2 critic updates each
        ("finetune", 0, 0),
        ("finetune", 0, 20),
        ("finetune", 40, 40),
        ("finetune", 80, 60),
    ]
    assert records[-1]["alpha"] == 0.2  # fixed temperature while finetuning (released code)
    check_summary(tiny_run, records)
    config = (tiny_run / "config.yaml").read_text()
    assert "num_critics: 2" in config and "dataset_id: local/walker2d/random-n1500-v0" in config


def test_same_seed_gives_identical_metrics(tiny_run, tmp_path, datasets_root):
    again, _ = finished(TINY, tmp_path, datasets_root)
    assert (again / "metrics.jsonl").read_text() == (tiny_run / "metrics.jsonl").read_text()


def test_pretrained_checkpoint_skips_pretraining(tiny_run, tmp_path, datasets_root):
    run_dir, _ = finished(
        [*TINY, "--pretrained", str(tiny_run / "pretrain.pt"), "--sigma", "0", "--utd", "1"], tmp_path, datasets_root
    )
    records = read_metrics(run_dir)
    assert {r["phase"] for r in records} == {"finetune"}
    assert not (run_dir / "pretrain.pt").exists()
    # The first evaluation is the loaded pretrained policy (same eval seeds as the original run).
    assert records[0]["normalized_score"] == read_metrics(tiny_run)[2]["normalized_score"]


def finetune_calls(so2, monkeypatch, tiny_run, tmp_path, flags: list[str]) -> dict:
    """A tiny finetuning from tiny_run's pretraining, in this process, recording what it computes:
    the shapes drawn from each buffer (by capacity), the number of actor steps and the critic
    targets used."""
    calls = {"samples": set(), "actor_steps": {}, "targets": set()}
    slots, actor_step, td_target = so2.ReplayBuffer.slots, so2.SO2Agent.actor_and_alpha_step, so2.td_target

    def record_slots(buffer, shape):
        calls["samples"].add((buffer.capacity, tuple(shape)))
        return slots(buffer, shape)

    def record_actor_step(agent, *args):
        # Per agent: the start-of-run time estimate takes a few steps on a copy of the agent.
        calls["actor_steps"][id(agent)] = calls["actor_steps"].get(id(agent), 0) + 1
        return actor_step(agent, *args)

    def record_target(*args):
        calls["targets"].add(args[-1])
        return td_target(*args)

    monkeypatch.setattr(so2.ReplayBuffer, "slots", record_slots)
    monkeypatch.setattr(so2.SO2Agent, "actor_and_alpha_step", record_actor_step)
    monkeypatch.setattr(so2, "td_target", record_target)
    so2.main([*TINY, "--pretrained", str(tiny_run / "pretrain.pt"), "--out-dir", str(tmp_path), *flags])
    return {**calls, "actor_steps": max(calls["actor_steps"].values())}


def test_paper_variants_change_what_is_computed(so2, tiny_run, tmp_path, monkeypatch):
    """40 env steps after the warm-up, utd 2, from a 1,500-row dataset and a 60-row online buffer."""
    default = finetune_calls(so2, monkeypatch, tiny_run, tmp_path / "default", [])
    assert default == {"samples": {(60, (2, 16)), (1500, (2, 48))}, "actor_steps": 40, "targets": {"per-member"}}
    # --batch-mode union: one batch of 16 + 48 rows from dataset U online (1,500 + 60 rows).
    union = finetune_calls(so2, monkeypatch, tiny_run, tmp_path / "union", ["--batch-mode", "union"])
    assert union["samples"] == {(1560, (2, 64))}
    # --actor-update per-critic-step: an actor step after each of the 2 critic steps.
    assert (
        finetune_calls(so2, monkeypatch, tiny_run, tmp_path / "actor", ["--actor-update", "per-critic-step"])[
            "actor_steps"
        ]
        == 80
    )
    # --target min: the min over the ensemble (its value is checked by test_td_target_per_member_and_min).
    assert finetune_calls(so2, monkeypatch, tiny_run, tmp_path / "min", ["--target", "min"])["targets"] == {"min"}
    metrics = {name: read_metrics(next((tmp_path / name).iterdir())) for name in ("default", "union", "actor", "min")}
    finals = {name: records[-1]["critic_loss"] for name, records in metrics.items()}
    assert len(set(finals.values())) == 4, finals  # each variant trained differently


def test_sera_rewards_the_online_rows_of_both_buffers(so2, tiny_run, tmp_path, monkeypatch):
    """With --sera, every batch row that was collected online, from the online buffer or from the
    dataset-initialised mixed buffer, and no dataset row, is flagged for the intrinsic reward, also
    once online rows fill the whole mixed buffer (a 40-row dataset); the critic it conditions on
    stays the pretrained one; the run trains differently from one without SERA and logs the mean
    intrinsic reward."""
    seen, bonus = [], so2.sera_bonus

    def record(frozen_critic, batch, online_rows, split, cfg):
        seen.append((batch, online_rows, copy.deepcopy(frozen_critic.state_dict())))
        return bonus(frozen_critic, batch, online_rows, split, cfg)

    monkeypatch.setattr(so2, "sera_bonus", record)
    flags = ["--pretrained", str(tiny_run / "pretrain.pt"), "--out-dir", str(tmp_path), "--sera", "--sera-k", "3"]
    so2.main([*TINY, *flags, "--run-name", "sera"])
    so2.main([*TINY, *flags[:4]])
    runs = {path.name.split("__")[1]: path for path in tmp_path.iterdir()}
    online = load_run_file(runs["so2-sera"] / "checkpoint.pt")["loop"]["online"]["rows"]
    batches = seen[-40 * 2 :]  # the run's 40 updating env steps x utd 2, after the time estimate's calls
    flagged_from_mixed = 0
    pretrained = load_run_file(tiny_run / "pretrain.pt")["agent"]["critic"]
    for batch, online_rows, frozen in batches:
        assert torch.equal(online_rows, rows_in(batch, online))
        assert all(torch.equal(frozen[k], pretrained[k]) for k in pretrained)
        flagged_from_mixed += int(online_rows[16:].sum())
    assert flagged_from_mixed > 0  # online rows drawn from the mixed buffer get the reward too
    sera, plain = read_metrics(runs["so2-sera"]), read_metrics(runs["so2"])
    updating = [r for r in sera if r["step"] > 0]  # records after the first update
    assert len(updating) == 2 and all(math.isfinite(r["sera_reward"]) for r in updating)
    assert "sera_reward" not in plain[-1]
    assert sera[-1]["critic_loss"] != plain[-1]["critic_loss"]
    # A dataset smaller than the online rows after the warm-up (30 < 40): from env step 50 on, every
    # mixed slot holds an online row, and the FIFO wraps around.
    seen.clear()
    small = ["--random-dataset-steps", "30", "--pretrain-steps", "4", "--run-name", "small"]
    so2.main([*TINY, *small, "--out-dir", str(tmp_path), "--sera", "--sera-k", "3"])
    (run_dir,) = [path for path in tmp_path.iterdir() if "so2-small" in path.name]
    online = load_run_file(run_dir / "checkpoint.pt")["loop"]["online"]["rows"]
    for batch, online_rows, _ in seen[-40 * 2 :]:
        assert torch.equal(online_rows, rows_in(batch, online))
    assert seen[-1][1].all()  # the last env step's batch is online rows only


def test_warmup_rows_stay_out_of_the_mixed_buffer(so2, tiny_run, tmp_path, monkeypatch):
    """Released code: the warm-up's 20 transitions go to the online buffer only, and the mixed FIFO
    buffer receives the 40 later ones from its slot 0 on; --batch-mode union holds all 60. The
    policy's log-std floor is EDAC's -5 in pretraining and the released finetuning actor's -20."""
    buffers, floors = [], []

    class Recorded(so2.ReplayBuffer):
        def __init__(self, *args):
            super().__init__(*args)
            buffers.append(self)

    def record_floor(step):
        def wrapped(self, *args, **kwargs):
            floors.append((step.__name__, self.actor.log_std_min))
            return step(self, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(so2, "ReplayBuffer", Recorded)
    for step in (so2.SO2Agent.pretrain_step, so2.SO2Agent.finetune_critic_step):
        monkeypatch.setattr(so2.SO2Agent, step.__name__, record_floor(step))
    for mode in ("online+mixed", "union"):
        buffers.clear()
        so2.main([*TINY, "--out-dir", str(tmp_path / mode), "--batch-mode", mode])
        online = next(b for b in buffers if b.capacity == 60)
        mixed = buffers[buffers.index(online) + 1]
        assert online.size == 60
        if mode == "online+mixed":
            assert torch.equal(mixed.rows[:40], online.rows[20:60])
            assert not rows_in(mixed.rows, online.rows[:20]).any()
        else:
            assert torch.equal(mixed.rows[1500:], online.rows)
        # the run's 40 updating env steps x utd 2 (the start-of-run estimate times a copy before them)
        assert floors[-80:] == [("finetune_critic_step", -20.0)] * 80
    assert {floor for name, floor in floors if name == "pretrain_step"} == {-5.0}


def test_auto_alpha_tunes_the_temperature(tiny_run, tmp_path, datasets_root):
    run_dir, _ = finished(
        [*TINY, "--pretrained", str(tiny_run / "pretrain.pt"), "--auto-alpha"], tmp_path, datasets_root
    )
    records = read_metrics(run_dir)
    assert records[-1]["alpha"] != 0.2  # tuned, not fixed
    assert records[-1]["step"] == 80


@pytest.mark.parametrize(
    "args,message",
    [
        (["--env", "walker2d-expertt"], "unknown env"),
        (["--sigma", "-0.3"], "sigma must be >= 0"),
        (["--utd", "0"], "utd must be in [1, 10000]"),
        (["--env", "walker2d-medium"], "unavailable offline"),
        (["--config", "/nonexistent/cpu.yaml"], "cannot use config file"),
        (["--sera", "--batch-mode", "union"], "--sera needs --batch-mode online+mixed"),
        (["--sera", "--sera-k", "16"], "sera_k must be in [1, 15]"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(args, message, tmp_path, datasets_root):
    result = run([*TINY, "--out-dir", str(tmp_path / "runs"), *args], datasets_root)
    assert_one_line_error(result, message)
    assert not (tmp_path / "runs").exists()


def test_unreadable_checkpoint(tmp_path, datasets_root):
    bad = tmp_path / "pretrain.pt"
    bad.write_bytes(b"not a checkpoint")
    result = run([*TINY, "--out-dir", str(tmp_path / "runs"), "--pretrained", str(bad)], datasets_root)
    assert_one_line_error(result, "cannot read checkpoint")
    assert not (tmp_path / "runs").exists()


def test_checkpoint_from_another_env_is_refused(tiny_run, tmp_path, datasets_root):
    args = [*TINY, "--out-dir", str(tmp_path / "runs"), "--pretrained", str(tiny_run / "pretrain.pt")]
    args[args.index("walker2d-random")] = "hopper-random"
    result = run(args, datasets_root)
    assert result.returncode == 2 and "pretrained on walker2d-random" in result.stderr


def test_finetuning_checkpoint_of_the_older_buffer_rule_is_refused(tiny_run, tmp_path, datasets_root):
    """A finetuning checkpoint without the count of online rows kept out of the mixed buffer was
    written before the warm-up's rows stayed out of it: resuming would rebuild another buffer."""
    run_dir = tmp_path / "old"
    shutil.copytree(tiny_run, run_dir)
    checkpoint = load_run_file(run_dir / "checkpoint.pt")
    del checkpoint["loop"]["skip"]
    torch.save(checkpoint, run_dir / "checkpoint.pt")
    result = run(["--resume", str(run_dir)], datasets_root)
    assert_one_line_error(result, "older so2.py whose mixed buffer also took the warm-up's rows")


def test_bench_updates_prints_one_json_line_per_phase(datasets_root):
    result = run_script(
        "scripts/bench_updates.py", ["--num-critics", "3", "--batch-size", "16", "--steps", "1"], datasets_root
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["phase"] for line in lines] == ["pretrain", "finetune"]
    for line in lines:
        assert line["num_critics"] == 3 and line["batch_size"] == 16 and line["device"] == "cpu"
        assert line["ms_per_update"] > 0 and line["baseline_ms_per_update"] > 0
