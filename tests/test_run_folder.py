"""The run-folder contract of every algorithm file: exact resume after kill -9 at random points and
after SIGTERM, divergence, --pretrained refusing an unfinished run, separate folders for runs
started together, and the same metrics and summary keys everywhere."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import (
    REPO,
    assert_one_line_error,
    kill_and_resume,
    load_script,
    read_metrics,
    run_dirs,
    run_script,
    same_run,
    script_env,
    start_script,
    wait_for_checkpoint,
)

# Long enough phases (hundreds of steps, a checkpoint every 25) for several kills in each.
ARGS = {
    "so2": [
        "--env", "walker2d-random", "--random-dataset-steps", "1500", "--num-critics", "2", "--hidden-dim", "32",
        "--pretrain-steps", "600", "--pretrain-eval-every", "150", "--batch-size", "32", "--online-steps", "300",
        "--warmup-steps", "50", "--utd", "2", "--online-batch-size", "16", "--mixed-batch-size", "48", "--eval-every", "60",
        "--eval-episodes", "2", "--mc-tail-steps", "5", "--kendall-windows", "2", "--checkpoint-every", "25",
    ],
    "cal_ql": [
        "--env", "walker2d-random", "--random-dataset-steps", "1500", "--actor-hidden-dims", "32", "32",
        "--critic-hidden-dims", "32", "32", "--cql-n-actions", "2", "--pretrain-steps", "300", "--pretrain-eval-every", "100",
        "--batch-size", "32", "--online-steps", "300", "--eval-every", "60", "--eval-episodes", "2", "--mc-tail-steps", "5",
        "--kendall-windows", "2", "--checkpoint-every", "25", "--sera", "--sera-k", "3",
    ],
    "sac": [
        "--env", "hopper", "--total-steps", "1200", "--learning-starts", "200", "--eval-every", "300", "--eval-episodes", "2",
        "--hidden-dim", "32", "--batch-size", "32", "--checkpoint-every", "25",
    ],
}
PHASES = {"so2": ("pretrain", "finetune"), "cal_ql": ("pretrain", "finetune"), "sac": ("online",)}
FILES = list(ARGS)


def script(name: str) -> str:
    return f"algorithms/{name}.py"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, datasets_root):
    """The uninterrupted run of each file, made once."""
    runs = {}

    def get(name):
        if name not in runs:
            out = tmp_path_factory.mktemp(f"reference_{name}")
            result = run_script(script(name), [*ARGS[name], "--out-dir", str(out)], datasets_root)
            assert result.returncode == 0, result.stderr[-3000:]
            (runs[name],) = run_dirs(out)
        return runs[name]

    return get


@pytest.mark.parametrize("name", FILES)
def test_kill_9_at_random_points_then_resume_equals_uninterrupted(name, reference, tmp_path, datasets_root):
    """3 SIGKILLs per phase, each at a random moment after a fresh checkpoint (inside a step, an
    evaluation or a checkpoint write), each followed by --resume: the same metrics.jsonl and the
    same final networks as the uninterrupted run."""
    run_dir = kill_and_resume(script(name), ARGS[name], tmp_path, datasets_root, {phase: 3 for phase in PHASES[name]}, seed=len(name))
    same_run(reference(name), run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("name,phase", [("so2", "finetune"), ("cal_ql", "pretrain"), ("cal_ql", "finetune"), ("sac", "online")])
def test_sigterm_checkpoints_exits_143_and_resumes(name, phase, reference, tmp_path, datasets_root):
    since = time.time()
    process = start_script(script(name), [*ARGS[name], "--out-dir", str(tmp_path)], datasets_root)
    run_dir = wait_for_checkpoint(process, tmp_path, phase, since)
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=300)[1]
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert f"Resume with: python algorithms/{name}.py --resume {run_dir}" in stderr and "Traceback" not in stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["resume_command"] == f"python algorithms/{name}.py --resume {run_dir}"
    assert not (run_dir / "final.pt").exists()
    result = run_script(script(name), ["--resume", str(run_dir)], datasets_root)
    assert result.returncode == 0, result.stderr[-3000:]
    same_run(reference(name), run_dir)


@pytest.mark.parametrize("name,method,calls,phase", [
    ("so2", "SO2Agent.pretrain_step", 40, "pretrain"),
    ("so2", "SO2Agent.finetune_critic_step", 30, "finetune"),
    ("cal_ql", "CalQLAgent.update", 340, "finetune"),
    ("sac", "SACAgent.update", 100, "online"),
])
def test_non_finite_values_stop_the_run_as_diverged(name, method, calls, phase, tmp_path, datasets_root):
    """A critic weight set to NaN after `calls` updates: the run stops at the next check with exit
    code 3 and one error line naming phase, step and quantity; the summary says diverged and the
    checkpoint keeps the last good (finite, earlier) state."""
    command = [sys.executable, str(REPO / "tests" / "nan_driver.py"), str(REPO / script(name)), method, str(calls), *ARGS[name], "--out-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=script_env(datasets_root), cwd=REPO, timeout=600)
    assert result.returncode == 3, result.stderr[-3000:]
    (error,) = [line for line in result.stderr.splitlines() if "error" in line]
    assert f"not finite in {phase} at step" in error and "Traceback" not in result.stderr
    (run_dir,) = run_dirs(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and f"in {phase} at step" in summary["error"] and not (run_dir / "final.pt").exists()
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for net in ("actor", "critic") for v in checkpoint["agent"][net].values())
    assert all(None not in (r["return"], r["critic_loss"]) for r in read_metrics(run_dir) if r["step"]), "no NaN record was written"


def test_pretrained_accepts_only_a_finished_pretraining(reference, tmp_path, datasets_root):
    run_dir = reference("so2")
    for path, message in [
        (run_dir / "checkpoint.pt", f"not a finished pretrain; continue that run with --resume {run_dir}"),
        (run_dir / "final.pt", "is a final export"),
    ]:
        result = run_script("algorithms/so2.py", [*ARGS["so2"], "--out-dir", str(tmp_path / "runs"), "--pretrained", str(path)], datasets_root)
        assert_one_line_error(result, message)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args,message", [
    (lambda runs: ["--resume", str(runs("sac"))], "is a checkpoint of algorithms/sac.py"),
    (lambda runs: ["--resume", str(runs("so2")), "--env", "hopper-random"], "env cannot change in a resumed run"),
    (lambda runs: ["--resume", str(runs("so2")), "--config", "configs/so2_cpu.yaml"], "leave out --config"),
    (lambda runs: ["--resume", "/nonexistent/run"], "no checkpoint.pt in"),
])
def test_resume_refuses_foreign_or_changed_runs(args, message, reference, datasets_root):
    assert_one_line_error(run_script("algorithms/so2.py", args(reference), datasets_root), message)


def test_run_folders_never_collide(monkeypatch, tmp_path):
    so2 = load_script("algorithms/so2.py")
    monkeypatch.setattr(so2.time, "time", lambda: 1_700_000_000.0)
    cfg = so2.Config(out_dir=str(tmp_path), seed=3)
    folders = [so2.new_run_dir(cfg) for _ in range(3)]
    assert [f.name for f in folders] == ["walker2d-random__so2__3__1700000000", "walker2d-random__so2__3__1700000000-1", "walker2d-random__so2__3__1700000000-2"]
    assert so2.new_run_dir(so2.Config(out_dir=str(tmp_path), seed=3, run_name="sacn")).name == "walker2d-random__so2-sacn__3__1700000000"


def test_so2_and_sacn_launched_together(reference, tmp_path, datasets_root):
    """The paper's protocol: two finetunings from one pretraining, started at the same moment."""
    pretrained = ["--pretrained", str(reference("so2") / "pretrain.pt"), "--out-dir", str(tmp_path)]
    processes = [start_script("algorithms/so2.py", [*ARGS["so2"], *pretrained, *extra], datasets_root) for extra in ([], ["--sigma", "0", "--utd", "1"])]
    assert [p.wait(timeout=600) for p in processes] == [0, 0], [p.stderr.read()[-2000:] for p in processes]
    assert len(run_dirs(tmp_path)) == 2


def test_same_record_and_summary_keys_in_every_file(reference):
    so2 = load_script("algorithms/so2.py")
    summaries = {name: json.loads((reference(name) / "summary.json").read_text()) for name in FILES}
    assert len({tuple(s) for s in summaries.values()}) == 1, {name: sorted(s) for name, s in summaries.items()}
    for name in FILES:
        for record in read_metrics(reference(name)):
            assert tuple(record)[: len(so2.RECORD_KEYS)] == so2.RECORD_KEYS
