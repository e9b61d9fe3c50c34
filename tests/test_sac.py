"""algorithms/sac.py: the soft target, end-to-end runs, exact resume, bad input."""

import copy
import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from functools import partial

import pytest
import torch

from conftest import (
    REPO,
    assert_one_line_error,
    load_script,
    read_metrics,
    run_dirs,
    run_script,
    same_run,
    script_env,
)

SCRIPT = str(REPO / "algorithms" / "sac.py")
TINY = (
    "--env hopper --total-steps 600 --learning-starts 100 --eval-every 150 --eval-episodes 2 "
    "--hidden-dim 32 --batch-size 32 --checkpoint-every 200"
).split()


@pytest.fixture(scope="module")
def sac():
    return load_script("algorithms/sac.py")


run = partial(run_script, "algorithms/sac.py")


def only_dir(folder):
    (run_dir,) = run_dirs(folder)
    return run_dir


def test_soft_target_is_clipped_double_q(sac):
    next_q = torch.tensor([[1.0, 5.0], [3.0, 2.0]])  # [2 critics, B=2]
    y = sac.td_target(
        torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), next_q, torch.tensor([0.5, 0.5]), 0.2, 0.9, "min"
    )
    assert torch.allclose(y, torch.tensor([1 + 0.9 * (1.0 - 0.1), 0.0]))


def test_update_trains_critics_actor_and_temperature(sac):
    cfg = replace(sac.Config(), hidden_dim=16)
    torch.manual_seed(0)
    agent = sac.SACAgent(4, 2, cfg, torch.device("cpu"))
    buffer = sac.ReplayBuffer(64, 4, 2, torch.device("cpu"))
    for _ in range(64):
        buffer.add(torch.randn(4).numpy(), torch.rand(2).numpy() * 2 - 1, 1.0, torch.randn(4).numpy(), 0.0)
    before = {
        name: [p.detach().clone() for p in getattr(agent, name).parameters()]
        for name in ("actor", "critic", "target_critic")
    }
    log_alpha = float(agent.log_alpha.detach())
    batch = buffer.sample((32,))
    obs, act, rew, next_obs, done = buffer.split(batch)
    with torch.no_grad():
        loss_before = (
            (agent.critic(obs, act) - (rew + 0.99 * agent.target_critic(next_obs, act).min(0).values)).pow(2).mean()
        )
    out = agent.update(batch, buffer.split)
    assert float(out["alpha"]) == 1.0  # the step used the temperature before its own update
    assert float(agent.log_alpha.detach()) != log_alpha
    for name in ("actor", "critic", "target_critic"):  # every network moved
        assert all(not torch.equal(a, b) for a, b in zip(before[name], getattr(agent, name).parameters())), name
    # The target moved by tau towards the updated critic: target' = (1 - tau) target + tau critic.
    for old, new, critic in zip(before["target_critic"], agent.target_critic.parameters(), agent.critic.parameters()):
        assert torch.allclose(new, (1 - cfg.tau) * old + cfg.tau * critic, atol=1e-6)
    assert torch.isfinite(loss_before) and float(out["critic_loss"]) > 0


def delayed_agent(sac):
    """A small policy_frequency-2 agent and the row splitter of its buffer layout (obs 4, act 2)."""
    torch.manual_seed(0)
    agent = sac.SACAgent(4, 2, replace(sac.Config(), hidden_dim=16, policy_frequency=2), torch.device("cpu"))
    return agent, sac.ReplayBuffer(1, 4, 2, torch.device("cpu")).split


def test_delayed_actor_update_takes_policy_frequency_steps_on_one_batch(sac):
    """CleanRL's delayed update (policy_frequency 2): the first critic update leaves actor and
    temperature alone; the second is followed by two actor + temperature steps on its batch,
    each with the temperature as it is then, against the critics just updated."""
    delayed, split = delayed_agent(sac)
    reference = copy.deepcopy(delayed)  # does the second update by hand
    rows = torch.randn(2, 32, 4 + 2 + 1 + 4 + 1)
    actor, log_alpha = [p.detach().clone() for p in delayed.actor.parameters()], float(delayed.log_alpha.detach())
    torch.manual_seed(1)  # the same action noise for both
    out = delayed.update(rows[0], split)
    assert set(out) == {"critic_loss"} and float(delayed.log_alpha.detach()) == log_alpha
    assert all(torch.equal(a, b) for a, b in zip(actor, delayed.actor.parameters()))
    out = delayed.update(rows[1], split)

    torch.manual_seed(1)
    reference.cfg = replace(reference.cfg, policy_frequency=1_000)  # critic steps only
    reference.update(rows[0], split)
    reference.update(rows[1], split)
    obs = split(rows[1])[0]
    for _ in range(2):
        alpha = reference.log_alpha.detach().exp()
        action, log_prob = reference.actor(obs)
        reference.actor_optim.zero_grad()
        (alpha * log_prob - reference.critic(obs, action).min(0).values).mean().backward()
        reference.actor_optim.step()
        reference.alpha_optim.zero_grad()
        (-(reference.log_alpha * (log_prob.detach() - 2.0))).mean().backward()  # target entropy -|A| = -2
        reference.alpha_optim.step()
    assert set(out) == {"critic_loss", "actor_loss", "alpha"} and delayed.updates == 2
    assert float(out["alpha"]) == float(alpha)  # the temperature of the last actor step
    # Exact: the same operations in the same order (a temperature read once, before both actor
    # steps, differs by ~1e-7).
    for name in ("actor", "critic", "target_critic"):
        for a, b in zip(getattr(delayed, name).parameters(), getattr(reference, name).parameters()):
            assert torch.equal(a, b), name
    assert float(delayed.log_alpha.detach()) == float(reference.log_alpha.detach()) != log_alpha


def test_delayed_update_counter_survives_a_checkpoint(sac):
    """Saved after an odd number of critic updates, a policy_frequency-2 agent takes its actor
    steps on the next update after loading, as the uninterrupted one does."""
    agent, split = delayed_agent(sac)
    rows = torch.randn(32, 4 + 2 + 1 + 4 + 1)
    agent.update(rows, split)
    loaded, _ = delayed_agent(sac)
    loaded.load_state_dict(agent.state_dict())
    assert set(loaded.update(rows, split)) == {"critic_loss", "actor_loss", "alpha"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, datasets_root):
    out = tmp_path_factory.mktemp("sac")
    result = run([*TINY, "--out-dir", str(out), "--track"], datasets_root)
    assert result.returncode == 0, result.stderr[-3000:]
    return only_dir(out)


def test_end_to_end_outputs(uninterrupted):
    assert {"config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt", "final.pt", "wandb"} <= {
        p.name for p in uninterrupted.iterdir()
    }
    records = read_metrics(uninterrupted)
    assert [r["step"] for r in records] == [150, 300, 450, 600]
    assert {"normalized_score", "q_bias", "kendall_tau", "alpha"} <= set(records[-1])
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert (
        summary["status"] == "finished"
        and summary["env_steps"] == 600
        and summary["final_score"] == records[-1]["normalized_score"]
    )


def test_stop_then_resume_equals_uninterrupted(uninterrupted, tmp_path, datasets_root):
    args = [*TINY, "--out-dir", str(tmp_path)]
    args[args.index("600")] = "300"
    assert run(args, datasets_root).returncode == 0
    result = run(["--resume", str(only_dir(tmp_path)), "--total-steps", "600"], datasets_root)
    assert result.returncode == 0, result.stderr[-3000:]
    same_run(uninterrupted, only_dir(tmp_path))


def test_ctrl_c_then_resume_equals_uninterrupted(uninterrupted, tmp_path, datasets_root):
    process = subprocess.Popen(
        [sys.executable, SCRIPT, *TINY, "--out-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=script_env(datasets_root),
        cwd=REPO,
    )
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:  # interrupt once it has evaluated
        metrics = list(tmp_path.glob("*/metrics.jsonl"))
        if metrics and metrics[0].read_text():
            process.send_signal(signal.SIGINT)
            break
        time.sleep(0.02)
    _, stderr = process.communicate(timeout=300)
    # The run must still have been going when the signal came; otherwise this test shows nothing.
    assert process.returncode == 130, f"the run ended before the signal (exit {process.returncode}): {stderr[-2000:]}"
    assert "Resume with: python algorithms/sac.py --resume" in stderr and "Traceback" not in stderr
    assert not (only_dir(tmp_path) / "final.pt").exists()
    assert json.loads((only_dir(tmp_path) / "summary.json").read_text())["status"] == "interrupted"
    result = run(["--resume", str(only_dir(tmp_path))], datasets_root)
    assert result.returncode == 0, result.stderr[-3000:]
    same_run(uninterrupted, only_dir(tmp_path))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--env", "humanoid"], "unknown env"),
        (["--resume", "/nonexistent/run"], "no checkpoint.pt"),
        (["--batch-size", "0"], "batch_size"),
    ],
)
def test_bad_input(args, message, tmp_path, datasets_root):
    result = run([*TINY, "--out-dir", str(tmp_path / "runs"), *args], datasets_root)
    assert_one_line_error(result, message)
    assert not (tmp_path / "runs").exists()
