"""Exact resume in every algorithm file: kill -9 at random points and SIGTERM, then --resume, give
the same metrics.jsonl and the same final networks as the uninterrupted run."""

import json
import signal
import time

import pytest

from conftest import (
    FILES,
    PHASES,
    RESUME_ARGS,
    kill_and_resume,
    run_script,
    same_run,
    script,
    start_script,
    wait_for_checkpoint,
)


@pytest.mark.parametrize("name", FILES)
def test_kill_9_at_random_points_then_resume_equals_uninterrupted(name, reference, tmp_path, datasets_root):
    """3 SIGKILLs per phase, each at a random moment after a fresh checkpoint (inside a step, an
    evaluation or a checkpoint write), each followed by --resume: the same metrics.jsonl and the
    same final networks as the uninterrupted run."""
    run_dir = kill_and_resume(
        script(name), RESUME_ARGS[name], tmp_path, datasets_root, {phase: 3 for phase in PHASES[name]}, seed=len(name)
    )
    same_run(reference(name), run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


@pytest.mark.parametrize(
    "name,phase", [("so2", "finetune"), ("cal_ql", "pretrain"), ("cal_ql", "finetune"), ("sac", "online")]
)
def test_sigterm_checkpoints_exits_143_and_resumes(name, phase, reference, tmp_path, datasets_root):
    since = time.time()
    process = start_script(script(name), [*RESUME_ARGS[name], "--out-dir", str(tmp_path)], datasets_root)
    run_dir = wait_for_checkpoint(process, tmp_path, phase, since)
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=300)[1]
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert f"Resume with: python algorithms/{name}.py --resume {run_dir}" in stderr and "Traceback" not in stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (
        summary["status"] == "interrupted"
        and summary["resume_command"] == f"python algorithms/{name}.py --resume {run_dir}"
    )
    assert not (run_dir / "final.pt").exists()
    result = run_script(script(name), ["--resume", str(run_dir)], datasets_root)
    assert result.returncode == 0, result.stderr[-3000:]
    same_run(reference(name), run_dir)
