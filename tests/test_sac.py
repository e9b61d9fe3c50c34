"""algorithms/sac.py: the soft target, end-to-end runs, exact resume, bad input."""

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from functools import partial

import pytest
import torch

from conftest import REPO, assert_one_line_error, load_script, read_metrics, run_dirs, run_script, script_env

SCRIPT = str(REPO / "algorithms" / "sac.py")
TINY = ["--env", "hopper", "--total-steps", "600", "--learning-starts", "100", "--eval-every", "150", "--eval-episodes", "2", "--hidden-dim", "32", "--batch-size", "32", "--checkpoint-every", "200"]


@pytest.fixture(scope="module")
def sac():
    return load_script("algorithms/sac.py")


run = partial(run_script, "algorithms/sac.py")


def only_dir(folder):
    (run_dir,) = run_dirs(folder)
    return run_dir


def test_soft_target_is_clipped_double_q(sac):
    next_q = torch.tensor([[1.0, 5.0], [3.0, 2.0]])  # [2 critics, B=2]
    y = sac.soft_target(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), next_q, torch.tensor([0.5, 0.5]), 0.2, 0.9)
    assert torch.allclose(y, torch.tensor([1 + 0.9 * (1.0 - 0.1), 0.0]))


def test_update_trains_critics_actor_and_temperature(sac):
    cfg = replace(sac.Config(), hidden_dim=16)
    torch.manual_seed(0)
    agent = sac.SACAgent(4, 2, cfg, torch.device("cpu"))
    buffer = sac.ReplayBuffer(64, 4, 2, torch.device("cpu"))
    for _ in range(64):
        buffer.add(torch.randn(4).numpy(), torch.rand(2).numpy() * 2 - 1, 1.0, torch.randn(4).numpy(), 0.0)
    before = {k: v.clone() for k, v in agent.state_dict().items() if isinstance(v, torch.Tensor)}
    actor_before = [p.clone() for p in agent.actor.parameters()]
    out = agent.update(buffer.sample(32), buffer.split)
    assert float(out["alpha"]) == 1.0  # the step used the temperature before its own update
    assert float(agent.log_alpha.detach()) != float(before["log_alpha"])
    assert any(not torch.equal(a, b) for a, b in zip(actor_before, agent.actor.parameters()))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, datasets_root):
    out = tmp_path_factory.mktemp("sac")
    result = run([*TINY, "--out-dir", str(out), "--track"], datasets_root)
    assert result.returncode == 0, result.stderr[-3000:]
    return only_dir(out)


def test_end_to_end_outputs(uninterrupted):
    assert {"config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt", "actor.pt", "wandb"} <= {p.name for p in uninterrupted.iterdir()}
    records = read_metrics(uninterrupted)
    assert [r["step"] for r in records] == [150, 300, 450, 600]
    assert {"normalized_score", "q_bias", "kendall_tau", "alpha"} <= set(records[-1])
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["env_steps"] == 600 and summary["final_score"] == records[-1]["normalized_score"]


def same_final_state(a, b):
    actor_a, actor_b = torch.load(a / "actor.pt"), torch.load(b / "actor.pt")
    assert all(torch.equal(actor_a[k], actor_b[k]) for k in actor_a)
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()


def test_stop_then_resume_equals_uninterrupted(uninterrupted, tmp_path, datasets_root):
    args = [*TINY, "--out-dir", str(tmp_path)]
    args[args.index("600")] = "300"
    assert run(args, datasets_root).returncode == 0
    result = run(["--resume", str(only_dir(tmp_path)), "--total-steps", "600"], datasets_root)
    assert result.returncode == 0, result.stderr[-3000:]
    same_final_state(uninterrupted, only_dir(tmp_path))


def test_ctrl_c_then_resume_equals_uninterrupted(uninterrupted, tmp_path, datasets_root):
    process = subprocess.Popen([sys.executable, SCRIPT, *TINY, "--out-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=script_env(datasets_root), cwd=REPO)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:  # interrupt once it has evaluated
        metrics = list(tmp_path.glob("*/metrics.jsonl"))
        if metrics and metrics[0].read_text():
            process.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    _, stderr = process.communicate(timeout=300)
    if process.returncode == 130:  # interrupted mid-run (otherwise it had already finished)
        assert "resume with: python algorithms/sac.py --resume" in stderr
        assert not (only_dir(tmp_path) / "actor.pt").exists()
        result = run(["--resume", str(only_dir(tmp_path))], datasets_root)
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        assert process.returncode == 0, stderr[-3000:]
    same_final_state(uninterrupted, only_dir(tmp_path))


@pytest.mark.parametrize("args,message", [(["--env", "humanoid"], "unknown env"), (["--resume", "/nonexistent/run"], "cannot resume"), (["--batch-size", "0"], "batch_size")])
def test_bad_input(args, message, tmp_path, datasets_root):
    result = run([*TINY, "--out-dir", str(tmp_path / "runs"), *args], datasets_root)
    assert_one_line_error(result, message)
    assert not (tmp_path / "runs").exists()
