"""RLPD (algorithms/rlpd.py): symmetric batches, the subset-min target, the LayerNorm ensemble, the
once-per-env-step actor and temperature updates on hand-checkable inputs, and the warm-up without
updates in a tiny run."""

import json
import math

import pytest
import torch

from conftest import RESUME_ARGS, load_script


@pytest.fixture(scope="module")
def rlpd():
    return load_script("algorithms/rlpd.py")


def buffers(rlpd, width_obs=2, width_act=1):
    """An offline buffer whose rows have reward 1 and an online one whose rows have reward 0."""
    offline = rlpd.ReplayBuffer(50, width_obs, width_act, torch.device("cpu"))
    online = rlpd.ReplayBuffer(50, width_obs, width_act, torch.device("cpu"))
    for buffer, reward in ((offline, 1.0), (online, 0.0)):
        rows = torch.zeros(50, 2 * width_obs + width_act + 2)
        rows[:, width_obs + width_act] = reward
        buffer.extend(rows)
    return offline, online


@pytest.mark.parametrize("ratio,offline_rows", [(0.5, 128), (0.25, 64), (0.75, 192), (0.0, 0), (1.0, 256)])
def test_every_mini_batch_holds_the_offline_share(rlpd, ratio, offline_rows):
    offline, online = buffers(rlpd)
    cfg = rlpd.Config(batch_size=256, utd=5, offline_ratio=ratio)
    batches = rlpd.symmetric_batches(offline, online, cfg)
    assert batches.shape == (5, 256, 2 * 2 + 1 + 2)
    rewards = online.split(batches)[2]
    assert rewards.sum(1).tolist() == [offline_rows] * 5  # per mini-batch, not on average


def test_td_target_is_the_min_over_the_subset_with_the_entropy_backup(rlpd):
    reward, done = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0])
    next_q = torch.tensor([[3.0, 7.0], [5.0, 2.0]])  # the 2 target members of the subset
    next_log_prob = torch.tensor([-1.0, -2.0])
    y = rlpd.td_target(reward, done, next_q, next_log_prob, 0.5, 0.9, backup_entropy=True)
    # row 0: 1 + 0.9 * (min(3, 5) + 0.5); row 1 is terminal: its reward only
    assert torch.allclose(y, torch.tensor([1 + 0.9 * 3.5, 0.5]))
    y = rlpd.td_target(reward, done, next_q, next_log_prob, 0.5, 0.9, backup_entropy=False)
    assert torch.allclose(y, torch.tensor([1 + 0.9 * 3.0, 0.5]))


def test_critic_members_are_layer_normed_mlps_and_a_subset_is_those_members(rlpd):
    torch.manual_seed(0)
    critic = rlpd.VectorizedCritic(3, 2, 8, num_critics=4, layer_norm=True)
    with torch.no_grad():  # distinct per-member LayerNorm parameters, so that a mix-up would show
        for p in (*critic.norm_scales, *critic.norm_shifts):
            p.normal_()
    obs, act = torch.randn(5, 3), torch.randn(5, 2)
    q = critic(obs, act)
    assert q.shape == (4, 5)
    for k in range(4):
        x = torch.cat([obs, act], -1)
        for layer in range(2):
            x = x @ critic.weights[layer][k] + critic.biases[layer][k]
            x = torch.nn.functional.layer_norm(
                x, (8,), critic.norm_scales[layer][k, 0], critic.norm_shifts[layer][k, 0], 1e-6
            )
            x = torch.relu(x)
        assert torch.allclose(q[k], (x @ critic.weights[2][k] + critic.biases[2][k]).squeeze(-1), atol=1e-6)
    members = torch.tensor([3, 1])
    assert torch.equal(critic(obs, act, members), q[members])


def test_each_critic_update_draws_a_fresh_subset_without_replacement(rlpd):
    torch.manual_seed(0)
    cfg = rlpd.Config(num_critics=10, num_min_qs=2, hidden_dim=8)
    agent = rlpd.RLPDAgent(3, 2, cfg, torch.device("cpu"))
    seen, forward = [], agent.target_critic.forward
    agent.target_critic.forward = lambda o, a, members=None: seen.append(members) or forward(o, a, members)
    split = rlpd.ReplayBuffer(1, 3, 2, torch.device("cpu")).split
    batch = torch.randn(16, 2 * 3 + 2 + 2)
    for _ in range(20):
        agent.critic_step(batch, split, torch.tensor(0.2))
    assert all(len(m) == 2 and m[0] != m[1] and 0 <= m.min() and m.max() < 10 for m in seen)
    assert len({tuple(sorted(m.tolist())) for m in seen}) > 1  # drawn anew, not fixed once


def test_critic_step_loss_target_and_polyak_update_by_hand(rlpd):
    """The mean squared error over members and rows against one target built with alpha, the min over
    the step's subset and the entropy backup; then the target moves by exactly tau toward the critic."""
    torch.manual_seed(0)
    cfg = rlpd.Config(num_critics=4, num_min_qs=2, hidden_dim=8, gamma=0.9, tau=0.1)
    agent = rlpd.RLPDAgent(3, 2, cfg, torch.device("cpu"))
    split = rlpd.ReplayBuffer(1, 3, 2, torch.device("cpu")).split
    batch = torch.randn(16, 2 * 3 + 2 + 2)
    batch[:, -1] = (torch.rand(16) < 0.3).float()  # some terminal rows
    obs, act, rew, next_obs, done = split(batch)
    alpha, old_target = torch.tensor(0.3), [p.clone() for p in agent.target_critic.parameters()]
    state = torch.get_rng_state()
    with torch.no_grad():  # the same draws as the step: the next action, then the subset
        next_action, next_log_prob = agent.actor(next_obs)
        subset = torch.randperm(4)[:2]
        next_q = agent.target_critic(next_obs, next_action)[subset].min(0).values
        y = rew + 0.9 * (1 - done) * (next_q - 0.3 * next_log_prob)
        expected = ((agent.critic(obs, act) - y) ** 2).mean()
    torch.set_rng_state(state)
    loss = agent.critic_step(batch, split, alpha)
    assert torch.allclose(loss, expected)
    for new, old, online in zip(agent.target_critic.parameters(), old_target, agent.critic.parameters()):
        assert torch.allclose(new, old + 0.1 * (online - old))
        assert not torch.equal(online, old)  # the critic moved before the target followed it


def test_actor_maximises_the_mean_of_all_members_and_alpha_follows_the_entropy(rlpd):
    """Actor loss alpha log pi - mean_k Q_k, with no gradient into the critics; the temperature's
    gradient in log alpha is alpha (H - target), H from the actor's sample (alpha != 1 tells this from
    the log-alpha form)."""
    torch.manual_seed(0)
    cfg = rlpd.Config(num_critics=4, hidden_dim=8, lr=1e-3, init_temperature=0.5)
    agent = rlpd.RLPDAgent(3, 2, cfg, torch.device("cpu"))
    obs = torch.randn(16, 3)
    state = torch.get_rng_state()
    action, log_prob = agent.actor(obs)
    expected = (0.5 * log_prob - agent.critic(obs, action).mean(0)).mean()
    entropy = -log_prob.mean().item()
    torch.set_rng_state(state)
    actor_loss, alpha = agent.actor_and_temperature_step(obs)
    assert torch.allclose(actor_loss, expected.detach())
    assert all(p.grad is None for p in agent.critic.parameters())
    assert agent.target_entropy == -1.0
    assert math.isclose(agent.log_alpha.grad.item(), 0.5 * (entropy + 1.0), rel_tol=1e-5)
    # Adam's first step moves log alpha by lr against the sign of that gradient.
    assert math.isclose(math.log(alpha.item()), math.log(0.5) - 1e-3 * math.copysign(1, entropy + 1.0), rel_tol=1e-4)


def test_no_update_before_start_training_then_utd_per_env_step(reference):
    """The tiny reference run (start_training 50, utd 2): the step count of each evaluation record is
    the critic updates so far."""
    records = [json.loads(line) for line in (reference("rlpd") / "metrics.jsonl").read_text().splitlines()]
    assert RESUME_ARGS["rlpd"][RESUME_ARGS["rlpd"].index("--start-training") + 1] == "50"
    assert [(r["env_steps"], r["step"]) for r in records] == [(0, 0)] + [(s, 2 * (s - 50)) for s in range(60, 301, 60)]
    assert records[0]["alpha"] == 1.0 and all(r["normalized_score"] is not None for r in records)
