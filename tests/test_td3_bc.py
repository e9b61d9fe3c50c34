"""algorithms/td3_bc.py: the TD3+BC rule on hand-checkable inputs (lambda normalisation, the BC term
and its removal with --loose, target policy smoothing, policy delay, the TD target), fixed dataset
state statistics, and end-to-end runs (TD3+BC + SERA, then --loose from its pretrain.pt)."""

import math

import numpy as np
import pytest
import torch

from conftest import RESUME_ARGS, check_summary, finished_run, load_run_file, load_script, read_metrics

td3_bc = load_script("algorithms/td3_bc.py")


def test_target_policy_smoothing_clips_the_noise_then_the_action():
    next_action = torch.tensor([[0.9, -0.2, 0.0]])
    noise = torch.tensor([[1.0, -5.0, 0.5]])
    # 0.9 + 0.2 = 1.1 -> 1.0; 0.2 * -5 = -1.0 -> clipped to -0.5: -0.7; 0.2 * 0.5 = 0.1
    expected = torch.tensor([[1.0, -0.7, 0.1]])
    assert torch.allclose(td3_bc.smoothed_target_action(next_action, noise, 0.2, 0.5), expected)


def test_actor_loss_lambda_normalisation_and_bc_term():
    q1 = torch.tensor([2.0, -4.0], requires_grad=True)
    policy = torch.tensor([[0.5], [0.0]], requires_grad=True)
    data = torch.tensor([[0.0], [1.0]])
    loss, lmbda = td3_bc.td3_bc_actor_loss(q1, policy, data, alpha=2.5, bc=True)
    # lambda = 2.5 / mean(|2|, |-4|) = 2.5 / 3; -lambda * mean(Q) = -(2.5 / 3) * (-1); BC = (0.25 + 1) / 2
    assert math.isclose(float(lmbda), 2.5 / 3, rel_tol=1e-6)
    assert math.isclose(loss.item(), 2.5 / 3 + 0.625, rel_tol=1e-6)
    loss.backward()
    # lambda is a constant of the step: dL/dQ1_i = -lambda / B, with no term from lambda's own gradient
    assert torch.allclose(q1.grad, torch.full((2,), -2.5 / 3 / 2))
    assert torch.allclose(policy.grad, torch.tensor([[0.5], [-1.0]]))  # 2 (pi - a) / B


def test_loose_drops_the_bc_term():
    q1 = torch.tensor([2.0, -4.0])
    policy, data = torch.tensor([[0.5], [0.0]]), torch.tensor([[0.0], [1.0]])
    loss, lmbda = td3_bc.td3_bc_actor_loss(q1, policy, data, alpha=2.5, bc=False)
    assert float(loss) == 1.0 and float(lmbda) == 1.0  # -mean Q1, plain TD3


def test_state_statistics_are_the_datasets_with_the_released_epsilon():
    mean, std = td3_bc.state_stats(np.array([[0.0, 5.0], [2.0, 5.0]], dtype=np.float32))
    assert torch.equal(mean, torch.tensor([1.0, 5.0]))
    assert torch.allclose(std, torch.tensor([1.0 + 1e-3, 1e-3]))  # population std, as numpy's


def make_agent(policy_noise=0.2):
    cfg = td3_bc.Config(hidden_dims=(8,), policy_noise=policy_noise, batch_size=4)
    stats = (torch.tensor([0.5, -1.0, 0.0]), torch.tensor([2.0, 1.0, 0.5]))
    torch.manual_seed(0)
    return td3_bc.TD3BCAgent(3, 2, cfg, torch.device("cpu"), stats), cfg


def batch_rows():
    torch.manual_seed(1)
    rows = torch.rand(4, 3 + 2 + 1 + 3 + 1) * 2 - 1
    rows[:, 8 + 1] = torch.tensor([0.0, 1.0, 0.0, 1.0])  # done column
    return rows


def test_critic_loss_is_the_clipped_double_q_target():
    agent, cfg = make_agent(policy_noise=0.0)  # no smoothing noise: the target is deterministic
    split = td3_bc.ReplayBuffer(1, 3, 2, torch.device("cpu")).split
    rows = batch_rows()
    obs, act, rew, next_obs, done = split(rows)
    # the networks see normalised states
    raw_next = agent.target_actor.net((next_obs - agent.actor.mean) / agent.actor.std)[0]
    assert torch.allclose(agent.target_actor(next_obs)[0], raw_next)
    q_next = agent.target_critic(next_obs, raw_next).min(0).values
    y = rew + cfg.gamma * (1 - done) * q_next
    expected = sum(((q - y) ** 2).mean() for q in agent.critic(obs, act))
    assert torch.allclose(agent.critic_loss(rows, split), expected)
    assert done.tolist() == [0.0, 1.0, 0.0, 1.0]


def test_policy_delay_moves_actor_and_targets_every_second_update():
    agent, cfg = make_agent()
    split = td3_bc.ReplayBuffer(1, 3, 2, torch.device("cpu")).split
    rows = batch_rows()
    actor0 = [p.clone() for p in agent.actor.parameters()]
    target_critic0 = [p.clone() for p in agent.target_critic.parameters()]
    out = agent.update(rows, split, bc=True)
    assert set(out) == {"critic_loss"} and agent.updates == 1
    assert all(torch.equal(a, b) for a, b in zip(actor0, agent.actor.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(target_critic0, agent.target_critic.parameters()))
    critic1 = [p.clone() for p in agent.critic.parameters()]
    out = agent.update(rows, split, bc=True)
    assert {"critic_loss", "actor_loss", "bc_lambda"} == set(out) and agent.updates == 2
    assert not all(torch.equal(a, b) for a, b in zip(actor0, agent.actor.parameters()))
    # targets: polyak step towards the critic after its second step
    for old, target, new in zip(target_critic0, agent.target_critic.parameters(), agent.critic.parameters()):
        assert torch.allclose(target, old + cfg.tau * (new - old))
        assert not torch.equal(target, old)
    assert not all(torch.equal(a, b) for a, b in zip(critic1, agent.critic.parameters()))
    # the statistics are buffers, not parameters: no optimiser moves them
    assert torch.equal(agent.actor.mean, torch.tensor([0.5, -1.0, 0.0]))


@pytest.fixture(scope="module")
def sera_run(tmp_path_factory, datasets_root):
    """TD3+BC + SERA with the resume tests' tiny budget."""
    out = tmp_path_factory.mktemp("runs")
    return finished_run("algorithms/td3_bc.py", RESUME_ARGS["td3_bc"], out, datasets_root)[0]


def test_end_to_end_with_sera(sera_run):
    assert {"config.yaml", "metrics.jsonl", "summary.json", "pretrain.pt", "final.pt"} <= {
        p.name for p in sera_run.iterdir()
    }
    records = read_metrics(sera_run)
    check_summary(sera_run, records)
    pretrain = [r for r in records if r["phase"] == "pretrain"]
    online = [r for r in records if r["phase"] == "finetune"]
    assert [r["step"] for r in pretrain] == [100, 200, 300]
    # Updates begin once the online buffer holds an online half-batch (32 - 16 = 16 rows): one per
    # env step from env step 16 on.
    assert [(r["env_steps"], r["step"]) for r in online] == [(e, max(e - 15, 0)) for e in range(0, 301, 60)]
    assert all(r["sera_reward"] is not None for r in online[1:]) and "sera_reward" not in online[0]
    assert all(r["bc_lambda"] > 0 for r in online[1:])
    # the state statistics stayed the dataset's through finetuning
    dataset = td3_bc.load_dataset("walker2d", "random", 1500)[0]
    mean, std = td3_bc.state_stats(dataset["observations"])
    final = load_run_file(sera_run / "final.pt")["agent"]
    for net in ("actor", "critic", "target_actor", "target_critic"):
        assert torch.equal(final[net]["mean"], mean) and torch.equal(final[net]["std"], std)


def test_loose_finetuning_from_the_pretraining(sera_run, tmp_path, datasets_root):
    args = [*RESUME_ARGS["td3_bc"], "--loose", "--pretrained", str(sera_run / "pretrain.pt"), "--online-steps", "60"]
    args = [a for a in args if a != "--sera"]
    run_dir, result = finished_run("algorithms/td3_bc.py", args, tmp_path, datasets_root)
    assert "TD3+BC loose" in result.stderr and "finetune from step 0" in result.stderr
    records = read_metrics(run_dir)
    assert [(r["phase"], r["env_steps"]) for r in records] == [("finetune", 0), ("finetune", 60)]
    # starts from the pretrained policy: the same first evaluation as the pretraining run's finetuning
    first = next(r for r in read_metrics(sera_run) if r["phase"] == "finetune")
    assert records[0]["return"] == first["return"]
    assert records[-1]["bc_lambda"] == 1.0 and "sera_reward" not in records[-1]
