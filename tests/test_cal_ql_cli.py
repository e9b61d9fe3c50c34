"""algorithms/cal_ql.py end to end as a user runs it: tiny CQL, Cal-QL and Cal-QL+SERA runs,
determinism, --pretrained with --loose, bad input, and the SERA benchmark script."""

import json
from functools import partial

import pytest

from conftest import assert_one_line_error, check_summary, finished_run, load_script, read_metrics, run_script

RECORD_KEYS = load_script("algorithms/cal_ql.py").RECORD_KEYS

# Tiny budget: a 1,500-step random dataset, 20 pretraining and 60 online steps, 16-wide networks.
TINY = (
    "--env walker2d-random --random-dataset-steps 1500 --actor-hidden-dims 16 16 "
    "--critic-hidden-dims 16 16 --cql-n-actions 3 --pretrain-steps 20 --pretrain-eval-every 10 "
    "--batch-size 32 --online-steps 60 --eval-every 30 --eval-episodes 2 --mc-tail-steps 5 "
    "--kendall-windows 2"
).split()


run = partial(run_script, "algorithms/cal_ql.py")
finished = partial(finished_run, "algorithms/cal_ql.py")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, datasets_root):
    """Cal-QL (the default), logged to wandb offline."""
    return finished(TINY + ["--track"], tmp_path_factory.mktemp("runs"), datasets_root)[0]


def check_records(records, utd=1):
    assert all(tuple(r)[: len(RECORD_KEYS)] == RECORD_KEYS for r in records)
    assert [(r["phase"], r["step"]) for r in records[:3]] == [("pretrain", 10), ("pretrain", 20), ("finetune", 0)]
    online = records[2:]
    # Updates follow whole trajectories: utd updates per env step, the budget exact.
    assert all(r["step"] == utd * r["env_steps"] for r in online)
    assert online[-1]["env_steps"] == 60 and len(online) >= 3
    assert all(r["phase"] == "finetune" for r in online)


def test_cal_ql_end_to_end_outputs(tiny_run):
    assert {"config.yaml", "metrics.jsonl", "summary.json", "pretrain.pt", "final.pt", "wandb"} <= {
        p.name for p in tiny_run.iterdir()
    }
    records = read_metrics(tiny_run)
    check_records(records)
    assert {"cql_loss", "bellman_loss", "bound_rate", "alpha"} <= set(records[-1])
    check_summary(tiny_run, records)
    config = (tiny_run / "config.yaml").read_text()
    assert "calibrate: true" in config and "dataset_id: local/walker2d/random-n1500-v0" in config


def test_same_seed_gives_identical_metrics(tiny_run, tmp_path, datasets_root):
    again, _ = finished(TINY, tmp_path, datasets_root)
    assert (again / "metrics.jsonl").read_text() == (tiny_run / "metrics.jsonl").read_text()


@pytest.mark.parametrize(
    "variant,name",
    [
        (["--no-calibrate"], "cql"),
        ("--sera --sera-k 5 --sera-lambda 0.5 --utd 2 --cql-lagrange".split(), "sera"),
    ],
)
def test_variants_run(variant, name, tmp_path, datasets_root):
    run_dir, result = finished([*TINY, *variant], tmp_path, datasets_root)
    records = read_metrics(run_dir)
    check_records(records, utd=2 if name == "sera" else 1)
    assert (run_dir / "final.pt").exists() and (run_dir / "pretrain.pt").exists()
    if name == "cql":
        assert "CQL" in result.stderr and "calibrate: false" in (run_dir / "config.yaml").read_text()
    else:
        assert "Cal-QL + SERA" in result.stderr
        assert "sera_reward" in records[-1] and "cql_multiplier" in records[-1]
        assert "sera_reward" not in records[1]  # offline: no augmentation


def test_pretrained_checkpoint_with_loose_finetuning(tiny_run, tmp_path, datasets_root):
    run_dir, _ = finished([*TINY, "--pretrained", str(tiny_run / "pretrain.pt"), "--loose"], tmp_path, datasets_root)
    records = read_metrics(run_dir)
    assert {r["phase"] for r in records} == {"finetune"} and not (run_dir / "pretrain.pt").exists()
    # The first evaluation is the loaded pretrained policy (same eval seeds as the original run).
    assert records[0]["normalized_score"] == read_metrics(tiny_run)[2]["normalized_score"]
    assert "cql_loss" not in records[-1] and records[-1]["critic_loss"] == records[-1]["bellman_loss"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--env", "walker2d-expertt"], "unknown env"),
        (["--utd", "0"], "utd must be >= 1"),
        (["--mixing-ratio", "1.0"], "mixing_ratio must be in"),
        (["--sera", "--sera-k", "16"], "sera_k must be in"),
        (["--env", "walker2d-medium"], "unavailable offline"),
        (["--config", "/nonexistent/cpu.yaml"], "cannot use config file"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(args, message, tmp_path, datasets_root):
    result = run([*TINY, "--out-dir", str(tmp_path / "runs"), *args], datasets_root)
    assert_one_line_error(result, message)
    assert not (tmp_path / "runs").exists()


def test_unreadable_or_mismatched_checkpoint(tiny_run, tmp_path, datasets_root):
    bad = tmp_path / "pretrain.pt"
    bad.write_bytes(b"not a checkpoint")
    result = run([*TINY, "--out-dir", str(tmp_path / "runs"), "--pretrained", str(bad)], datasets_root)
    assert_one_line_error(result, "cannot read checkpoint")
    assert not (tmp_path / "runs").exists()
    result = run(
        [
            *TINY,
            "--out-dir",
            str(tmp_path / "runs"),
            "--pretrained",
            str(tiny_run / "pretrain.pt"),
            "--critic-hidden-dims",
            "8",
            "8",
        ],
        datasets_root,
    )
    assert result.returncode == 2 and "hidden dims" in result.stderr and not (tmp_path / "runs").exists()


def test_bench_sera_prints_one_json_line(datasets_root):
    result = run_script(
        "scripts/bench_sera.py",
        "--batch-size 32 --steps 1 --rounds 1 --hidden-dim 16".split(),
        datasets_root,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (line,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert line["batch_size"] == 32 and line["device"] == "cpu"
    assert line["ms_per_update"] > 0 and line["ms_per_update_sera"] > 0 and line["ms_sera_reward"] > 0
