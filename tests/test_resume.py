"""Exact resume in every algorithm file after SIGTERM, inside the updates owed to a trajectory, and
with a larger budget: the same metrics.jsonl and final networks as the uninterrupted run (kill -9:
tests/test_resume_kill.py)."""

import json
import os
import signal
import time

import pytest
import torch

from conftest import (
    RESUME_ARGS,
    load_run_file,
    load_script,
    run_dirs,
    run_script,
    same_run,
    script,
    start_script,
    wait_for_checkpoint,
)


@pytest.mark.parametrize(
    "name,phase",
    [
        ("so2", "finetune"),
        ("cal_ql", "pretrain"),
        ("cal_ql", "finetune"),
        ("td3_bc", "finetune"),
        ("iql", "pretrain"),
        ("awac", "finetune"),
        ("pex", "finetune"),
        ("off2on", "finetune"),
        ("odt", "finetune"),
        ("rlpd", "online"),
        ("wsrl", "finetune"),
        ("sac", "online"),
    ],
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


def test_so2_extended_budget_continues_exactly(reference, tmp_path, datasets_root):
    """A finished run given a larger --online-steps on --resume continues as if the budget had been
    the larger one from the start (180 is an evaluation step of the 300-step reference)."""
    args = RESUME_ARGS["so2"].copy()
    args[args.index("--online-steps") + 1] = "180"
    result = run_script(script("so2"), [*args, "--out-dir", str(tmp_path)], datasets_root)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    result = run_script(script("so2"), ["--resume", str(run_dir), "--online-steps", "300"], datasets_root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finetune from step 180" in result.stderr
    same_run(reference("so2"), run_dir)


def test_cal_ql_stopped_inside_the_updates_of_a_trajectory(reference, tmp_path, datasets_root, monkeypatch):
    """A SIGTERM during the updates owed to a finished trajectory: the checkpoint holds the updates
    still owed, and the resumed run ends as the uninterrupted one (in this process: torch and
    the data are the same as in the script)."""
    cal_ql = load_script("algorithms/cal_ql.py")
    update, calls = cal_ql.CalQLAgent.update, {}

    def signalling_update(agent, *args, **kwargs):
        out = update(agent, *args, **kwargs)
        calls[id(agent)] = calls.get(id(agent), 0) + 1  # per agent: the time estimate uses a copy
        if calls[id(agent)] == 300 + 3:  # the 3rd update of the first online trajectory
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(cal_ql.CalQLAgent, "update", signalling_update)
    with pytest.raises(SystemExit) as exit_info:
        cal_ql.main([*RESUME_ARGS["cal_ql"], "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 128 + signal.SIGTERM
    (run_dir,) = run_dirs(tmp_path)
    checkpoint = load_run_file(run_dir / "checkpoint.pt")
    assert (
        checkpoint["phase"] == "finetune" and checkpoint["loop"]["updates"] == 3 and checkpoint["loop"]["pending"] > 0
    )
    result = run_script(script("cal_ql"), ["--resume", str(run_dir)], datasets_root)
    assert result.returncode == 0, result.stderr[-3000:]
    same_run(reference("cal_ql"), run_dir)


def test_replay_buffer_state_round_trip():
    """Rows go back to their slots; a full buffer keeps its pointer, and one loaded into a larger
    buffer (a resumed run with a larger budget) continues after its last row."""
    so2 = load_script("algorithms/so2.py")
    small = so2.ReplayBuffer(3, 1, 1, torch.device("cpu"))
    for k in range(5):  # rows 4 and 5 overwrite slots 0 and 1: ptr 2
        small.add(k, k, k, k, 0.0)
    same = so2.ReplayBuffer(3, 1, 1, torch.device("cpu"))
    same.load_state_dict(small.state_dict())
    assert torch.equal(same.rows, small.rows) and (same.ptr, same.size) == (2, 3)
    online = so2.ReplayBuffer(2, 1, 1, torch.device("cpu"))
    online.extend(torch.tensor([[1.0] * 5, [2.0] * 5]))  # full, ptr back at 0
    larger = so2.ReplayBuffer(4, 1, 1, torch.device("cpu"))
    larger.load_state_dict(online.state_dict())
    larger.add(3, 3, 3, 3, 0.0)
    assert larger.rows[:3, 0].tolist() == [1.0, 2.0, 3.0] and (larger.ptr, larger.size) == (3, 3)
