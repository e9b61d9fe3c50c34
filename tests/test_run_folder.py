"""The run-folder contract of every algorithm file: divergence, --pretrained refusing an unfinished
run, --resume refusing foreign runs, separate folders for runs started together, and the same
metrics and summary keys everywhere (exact resume: tests/test_resume.py)."""

import fcntl
import json
import subprocess
import sys
import time

import pytest
import torch

from conftest import (
    FILES,
    REPO,
    RESUME_ARGS,
    assert_one_line_error,
    load_run_file,
    load_script,
    read_metrics,
    run_dirs,
    run_script,
    script,
    script_env,
    start_script,
    wait_for_checkpoint,
)


@pytest.mark.parametrize(
    "name,method,calls,phase",
    [
        ("so2", "SO2Agent.pretrain_step", 40, "pretrain"),
        ("so2", "SO2Agent.finetune_critic_step", 30, "finetune"),
        ("cal_ql", "CalQLAgent.update", 340, "finetune"),
        ("td3_bc", "TD3BCAgent.update", 320, "finetune"),
        ("iql", "IQLAgent.update", 150, "pretrain"),
        ("awac", "AWACAgent.update", 330, "finetune"),
        ("pex", "PEXAgent.update", 420, "finetune"),
        ("off2on", "Off2OnAgent.online_update", 330, "finetune"),
        ("odt", "ODTAgent.update", 330, "finetune"),
        ("rlpd", "RLPDAgent.critic_step", 300, "online"),
        ("wsrl", "WSRLAgent.critic_step", 300, "finetune"),
        ("sac", "SACAgent.update", 100, "online"),
    ],
)
def test_non_finite_values_stop_the_run_as_diverged(name, method, calls, phase, tmp_path, datasets_root):
    """A critic weight set to NaN after `calls` updates: the run stops at the next check with exit
    code 3 and one error line naming phase, step and quantity; the summary says diverged and the
    checkpoint keeps the last good (finite, earlier) state."""
    command = [
        sys.executable,
        str(REPO / "tests" / "nan_driver.py"),
        str(REPO / script(name)),
        method,
        str(calls),
        *RESUME_ARGS[name],
        "--out-dir",
        str(tmp_path),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, env=script_env(datasets_root), cwd=REPO, timeout=600
    )
    assert result.returncode == 3, result.stderr[-3000:]
    (error,) = [line for line in result.stderr.splitlines() if "error" in line]
    assert f"not finite in {phase} at step" in error and "Traceback" not in result.stderr
    (run_dir,) = run_dirs(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (
        summary["status"] == "diverged"
        and f"in {phase} at step" in summary["error"]
        and not (run_dir / "final.pt").exists()
    )
    checkpoint = load_run_file(run_dir / "checkpoint.pt")
    so2 = load_script("algorithms/so2.py")
    assert all(torch.isfinite(t).all() for t in so2.tensors(checkpoint["agent"]) if t.is_floating_point())
    loss = "actor_loss" if name == "odt" else "critic_loss"  # odt.py has no critic
    assert all(None not in (r["return"], r[loss]) for r in read_metrics(run_dir) if r["step"]), (
        "no NaN record was written"
    )


def test_pretrained_accepts_only_a_finished_pretraining(reference, tmp_path, datasets_root):
    run_dir = reference("so2")
    for path, message in [
        (run_dir / "checkpoint.pt", f"not a finished pretrain; continue that run with --resume {run_dir}"),
        (run_dir / "final.pt", "is a final export"),
    ]:
        result = run_script(
            "algorithms/so2.py",
            [*RESUME_ARGS["so2"], "--out-dir", str(tmp_path / "runs"), "--pretrained", str(path)],
            datasets_root,
        )
        assert_one_line_error(result, message)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (lambda runs: ["--resume", str(runs("sac"))], "is a checkpoint of algorithms/sac.py"),
        (lambda runs: ["--resume", str(runs("so2")), "--env", "hopper-random"], "env cannot change in a resumed run"),
        (lambda runs: ["--resume", str(runs("so2")), "--config", "configs/so2_cpu.yaml"], "leave out --config"),
        (lambda runs: ["--resume", "/nonexistent/run"], "no checkpoint.pt in"),
        (
            lambda runs: ["--resume", str(runs("so2")), "--online-steps", "100"],
            "online_steps=100 is below the 300 steps the run has made in finetune",
        ),
        (
            lambda runs: ["--resume", str(runs("so2")), "--finetune-lr", "0.1"],
            "finetune_lr cannot change in a resumed run",
        ),
    ],
)
def test_resume_refuses_foreign_or_changed_runs(args, message, reference, datasets_root):
    assert_one_line_error(run_script("algorithms/so2.py", args(reference), datasets_root), message)


def test_run_folders_never_collide(monkeypatch, tmp_path):
    so2 = load_script("algorithms/so2.py")
    monkeypatch.setattr(so2.time, "time", lambda: 1_700_000_000.0)
    cfg = so2.Config(out_dir=str(tmp_path), seed=3)
    folders = [so2.new_run_dir(cfg) for _ in range(3)]
    assert [f.name for f in folders] == [
        "walker2d-random__so2__3__1700000000",
        "walker2d-random__so2__3__1700000000-1",
        "walker2d-random__so2__3__1700000000-2",
    ]
    assert (
        so2.new_run_dir(so2.Config(out_dir=str(tmp_path), seed=3, run_name="sacn")).name
        == "walker2d-random__so2-sacn__3__1700000000"
    )


def test_so2_and_sacn_launched_together(reference, tmp_path, datasets_root):
    """The paper's protocol: two finetunings from one pretraining, started at the same moment."""
    pretrained = ["--pretrained", str(reference("so2") / "pretrain.pt"), "--out-dir", str(tmp_path)]
    processes = [
        start_script("algorithms/so2.py", [*RESUME_ARGS["so2"], *pretrained, *extra], datasets_root)
        for extra in ([], ["--sigma", "0", "--utd", "1"])
    ]
    assert [p.wait(timeout=600) for p in processes] == [0, 0], [p.stderr.read()[-2000:] for p in processes]
    assert len(run_dirs(tmp_path)) == 2


def test_same_record_and_summary_keys_in_every_file(reference):
    so2 = load_script("algorithms/so2.py")
    summaries = {name: json.loads((reference(name) / "summary.json").read_text()) for name in FILES}
    assert len({tuple(s) for s in summaries.values()}) == 1, {name: sorted(s) for name, s in summaries.items()}
    for name in FILES:
        for record in read_metrics(reference(name)):
            assert tuple(record)[: len(so2.RECORD_KEYS)] == so2.RECORD_KEYS


def test_time_estimate_restores_the_rng_and_points_to_a_first_result(capsys):
    so2 = load_script("algorithms/so2.py")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    seconds = so2.seconds_per_call(lambda: torch.rand(1000), torch.device("cpu"), 2)
    assert seconds > 0 and torch.equal(torch.rand(3), expected)  # timing drew nothing from the run's RNG
    so2.announce_time([("pretraining", 3_000_000, 0.08), ("finetuning", 95_000, 3.2)])
    stderr = capsys.readouterr().err
    assert "pretraining: 3,000,000 steps x 80.0 ms = 66.67 h" in stderr and "total 151.11 h" in stderr
    assert "that is days on this device" in stderr and "configs/so2_cpu.yaml" in stderr
    so2.announce_time([("finetuning", 1000, 0.01)])
    assert "days" not in capsys.readouterr().err


def test_a_run_folder_in_use_is_refused_and_freed_when_its_process_dies(tmp_path, datasets_root):
    """A second process resuming a folder that a live run holds stops with one line and exit 2, and
    writes nothing; once the holder is killed (kill -9), the folder is free again (the resume after
    kill -9 itself: tests/test_resume_kill.py)."""
    since = time.time()
    long_run = [*RESUME_ARGS["so2"], "--pretrain-steps", "100000", "--out-dir", str(tmp_path)]  # outlives the test
    process = start_script(script("so2"), long_run, datasets_root)
    try:
        run_dir = wait_for_checkpoint(process, tmp_path, "pretrain", since)
        config_written = (run_dir / "config.yaml").stat().st_mtime_ns
        second = run_script(script("so2"), ["--resume", str(run_dir)], datasets_root)
        assert_one_line_error(second, "is in use by another process")
        assert process.poll() is None  # the first run goes on
        assert (run_dir / "config.yaml").stat().st_mtime_ns == config_written  # a resume would rewrite it
        assert not (run_dir / "summary.json").exists()
    finally:
        process.kill()
        process.wait()
    with open(run_dir / ".lock") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if still held
