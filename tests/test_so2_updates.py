"""The update equations of algorithms/so2.py on small hand-checkable inputs."""

import copy
import math
from dataclasses import replace

import pytest
import torch


def test_perturbed_action_hand_values(so2):
    action = torch.tensor([0.5, 0.2, -0.9, 0.0])
    noise = torch.tensor([3.0, -1.0, -5.0, 1.0])
    out = so2.perturb_action(action, noise, sigma=0.3, noise_clip=0.6)
    # 0.5 + clip(0.9) = 1.1 -> 1.0;  0.2 - 0.3 = -0.1;  -0.9 - 0.6 -> -1.0;  0 + 0.3
    assert torch.allclose(out, torch.tensor([1.0, -0.1, -1.0, 0.3]))


def test_perturbed_action_bounds(so2):
    torch.manual_seed(0)
    action = torch.rand(10_000, 6) * 2 - 1
    out = so2.perturb_action(action, torch.randn(10_000, 6), sigma=0.45, noise_clip=0.6)
    assert (out - action).abs().max() <= 0.6 + 1e-6
    assert out.min() >= -1.0 and out.max() <= 1.0
    # The clip is reached: without it, 45% std noise exceeds 0.6 often.
    assert ((out - action).abs() > 0.599).any()


def test_sigma_zero_is_the_plain_target(so2):
    action = torch.rand(64, 3) * 2 - 1
    assert torch.equal(so2.perturb_action(action, torch.randn(64, 3), sigma=0.0, noise_clip=0.6), action)


def test_td_target_per_member_and_min(so2):
    next_q = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # [N=2 members, B=2]
    reward, done = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0])
    log_prob = torch.tensor([0.5, -1.0])
    per_member = so2.td_target(reward, done, next_q, log_prob, 0.2, 0.9, "per-member")
    # y_i = r + 0.9 (Q_i - 0.2 * 0.5) for the live transition; the terminal one is just r.
    assert torch.allclose(per_member, torch.tensor([[1 + 0.9 * 0.9, 0.5], [1 + 0.9 * 2.9, 0.5]]))
    minimum = so2.td_target(reward, done, next_q, log_prob, 0.2, 0.9, "min")
    assert torch.allclose(minimum, torch.tensor([1 + 0.9 * 0.9, 0.5]))


def test_finetune_critic_step_uses_perturbed_per_member_targets(so2):
    """The agent's SO2 critic loss equals the one written out by hand from the same randoms."""
    cfg = replace(so2.Config(), num_critics=3, hidden_dim=16, sigma=0.3, noise_clip=0.6)
    torch.manual_seed(0)
    agent = so2.SO2Agent(4, 2, cfg, torch.device("cpu"))
    with torch.no_grad():  # distinct target members, so per-member and min targets differ
        for w in agent.target_critic.weights:
            w.add_(0.3 * torch.randn_like(w))
    buffer = so2.ReplayBuffer(8, 4, 2, torch.device("cpu"))
    buffer.extend(torch.rand(8, sum(buffer.sizes)))
    batch = buffer.rows
    obs, act, rew, next_obs, done = buffer.split(batch)

    torch.manual_seed(1)
    next_action, next_log_prob = agent.actor(next_obs)
    noise = torch.randn_like(next_action)
    tilde = (next_action + (0.3 * noise).clamp(-0.6, 0.6)).clamp(-1, 1)
    q_next = torch.stack([member_q(agent.target_critic, i, next_obs, tilde) for i in range(3)])
    y = rew + cfg.gamma * (1 - done) * (q_next - 0.2 * next_log_prob)
    q = torch.stack([member_q(agent.critic, i, obs, act) for i in range(3)])
    expected = ((q - y) ** 2).mean(1).sum()

    torch.manual_seed(1)
    loss = agent.finetune_critic_step(batch, buffer.split, 0.2)
    assert torch.allclose(loss, expected.detach(), rtol=1e-5)


def member_q(critic, i, obs, action):
    """Member i of the vectorized critic as a plain MLP."""
    x = torch.cat([obs, action], -1)
    for k, (w, b) in enumerate(zip(critic.weights, critic.biases)):
        x = x @ w[i] + b[i, 0]
        if k < len(critic.weights) - 1:
            x = torch.relu(x)
    return x.squeeze(-1)


def test_vectorized_critic_matches_member_mlps(so2):
    torch.manual_seed(0)
    critic = so2.VectorizedCritic(5, 3, (32, 32, 32), 4)
    obs, act = torch.randn(7, 5), torch.rand(7, 3)
    q = critic(obs, act)
    assert q.shape == (4, 7)
    for i in range(4):
        assert torch.allclose(q[i], member_q(critic, i, obs, act), atol=1e-6)
    per_member = torch.rand(4, 7, 3)
    q = critic(obs, per_member)
    for i in range(4):
        assert torch.allclose(q[i], member_q(critic, i, obs, per_member[i]), atol=1e-6)


def test_critic_init_follows_edac(so2):
    critic = so2.VectorizedCritic(5, 3, (32, 32, 32), 4)
    assert all(torch.all(b == 0.1) for b in critic.biases[:-1])
    assert critic.weights[-1].abs().max() <= 3e-3 and critic.biases[-1].abs().max() <= 3e-3


def test_diversity_loss_hand_values(so2):
    orthogonal = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # N=2, B=1, A=2
    assert so2.diversity_loss(orthogonal).item() == pytest.approx(0.0, abs=1e-6)
    aligned = torch.tensor([[[1.0, 0.0]], [[2.0, 0.0]]])  # cos = 1 for both ordered pairs
    assert so2.diversity_loss(aligned).item() == pytest.approx(2.0, abs=1e-5)
    opposite = torch.tensor([[[1.0, 0.0]], [[-3.0, 0.0]]])
    assert so2.diversity_loss(opposite).item() == pytest.approx(-2.0, abs=1e-5)


def test_diversity_loss_matches_masked_gram(so2):
    torch.manual_seed(0)
    grads = torch.randn(5, 7, 3)
    unit = grads / grads.norm(dim=-1, keepdim=True)
    total = 0.0
    for b in range(7):
        for i in range(5):
            for j in range(5):
                if i != j:
                    total += float(unit[i, b] @ unit[j, b])
    assert so2.diversity_loss(grads).item() == pytest.approx(total / 7 / 4, rel=1e-5)


def test_per_member_action_gradients_from_one_forward(so2):
    """The fused forward gives each member its own dQ_i/da, as separate forwards would."""
    torch.manual_seed(0)
    critic = so2.VectorizedCritic(4, 2, (16, 16, 16), 3)
    obs, act = torch.randn(5, 4), torch.rand(5, 2)
    member_actions = act.expand(3, -1, -1).clone().requires_grad_(True)
    grads = torch.autograd.grad(critic(obs, member_actions).sum(), member_actions)[0]
    for i in range(3):
        a = act.clone().requires_grad_(True)
        expected = torch.autograd.grad(member_q(critic, i, obs, a).sum(), a)[0]
        assert torch.allclose(grads[i], expected, atol=1e-6)


def test_actor_log_prob_matches_tanh_transformed_normal(so2):
    torch.manual_seed(0)
    actor = so2.Actor(4, 3, (16, 16, 16))
    obs = torch.randn(6, 4)
    torch.manual_seed(5)
    action, log_prob = actor(obs)
    h = actor.trunk(obs)
    mu, std = actor.mu(h), actor.log_std(h).clamp(-5, 2).exp()
    torch.manual_seed(5)
    u = mu + std * torch.randn_like(mu)
    expected = torch.distributions.Normal(mu, std).log_prob(u).sum(-1) - torch.log(1 - torch.tanh(u) ** 2).sum(-1)
    assert torch.allclose(action, torch.tanh(u))
    assert torch.allclose(log_prob, expected, atol=1e-4)
    deterministic, none = actor(obs, deterministic=True)
    assert none is None and torch.allclose(deterministic, torch.tanh(mu))


def test_soft_update(so2):
    source, target = so2.VectorizedCritic(2, 1, (4, 4, 4), 2), so2.VectorizedCritic(2, 1, (4, 4, 4), 2)
    before = [p.clone() for p in target.parameters()]
    so2.soft_update(target, source, 0.1)
    for old, new, src in zip(before, target.parameters(), source.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * src)


def test_pretrain_step_moves_alpha_critic_and_target(so2):
    cfg = replace(so2.Config(), num_critics=3, hidden_dim=16, eta=1.0)
    torch.manual_seed(0)
    agent = so2.SO2Agent(4, 2, cfg, torch.device("cpu"))
    buffer = so2.ReplayBuffer(32, 4, 2, torch.device("cpu"))
    buffer.extend(torch.rand(32, sum(buffer.sizes)))
    critic_before = [p.clone() for p in agent.critic.parameters()]
    out = agent.pretrain_step(buffer.rows, buffer.split)
    assert all(math.isfinite(float(v)) for v in out.values())
    assert float(out["alpha"]) != 1.0  # log alpha starts at 0 and took one step
    assert all(not torch.equal(a, b) for a, b in zip(critic_before, agent.critic.parameters()))
    assert all(p.grad is None for p in agent.target_critic.parameters())


def test_actor_step_leaves_no_gradient_in_the_critic(so2):
    """The actor loss -min_i Q_i(s, pi(s)) differentiates through the critic but must not leave
    gradients on its weights (they would leak into the next critic step's Adam moments if a
    step ever skipped zero_grad, and they cost a backward pass)."""
    cfg = replace(so2.Config(), num_critics=3, hidden_dim=16)
    torch.manual_seed(0)
    agent = so2.SO2Agent(4, 2, cfg, torch.device("cpu"))
    critic_before = [p.clone() for p in agent.critic.parameters()]
    _, actor_loss = agent.actor_and_alpha_step(torch.rand(8, 4), None)
    assert math.isfinite(float(actor_loss))
    assert all(p.grad is None for p in agent.critic.parameters())
    assert all(torch.equal(a, b) for a, b in zip(critic_before, agent.critic.parameters()))
    assert agent.actor.mu.weight.grad is not None and agent.actor.mu.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("include_self", [False, True])
def test_sera_bonus_on_the_online_rows_only(so2, include_self):
    """SERA in so2.py: the online rows of a batch (from either buffer) get sera_lambda times the
    shared sera_reward computed over those rows alone; dataset rows get none; the critic step
    takes the bonus as reward."""
    cfg = replace(
        so2.Config(), num_critics=3, hidden_dim=16, sera=True, sera_k=2, sera_lambda=0.5, sera_include_self=include_self
    )
    torch.manual_seed(0)
    agent = so2.SO2Agent(4, 2, cfg, torch.device("cpu"))
    buffer = so2.ReplayBuffer(10, 4, 2, torch.device("cpu"))
    buffer.extend(torch.rand(10, sum(buffer.sizes)))
    online_rows = torch.tensor([1, 1, 1, 0, 1, 0, 0, 1, 0, 1], dtype=torch.bool)
    bonus, mean_r_int = so2.sera_bonus(agent.critic, buffer.rows, online_rows, buffer.split, cfg)
    obs, act = buffer.split(buffer.rows[online_rows])[:2]
    expected = so2.sera_reward(obs, agent.critic(obs, act).min(0).values, 2, include_self)
    assert bonus[~online_rows].tolist() == [0.0] * 4
    assert torch.allclose(bonus[online_rows], 0.5 * expected) and mean_r_int == pytest.approx(expected.mean().item())

    def loss(rows, bonus=None):
        torch.manual_seed(1)
        return copy.deepcopy(agent).finetune_critic_step(rows, buffer.split, 0.2, bonus).item()

    shifted = buffer.rows.clone()
    shifted[:, 6] += bonus  # the reward column (obs 4 + action 2)
    assert loss(buffer.rows, bonus) == pytest.approx(loss(shifted)) and loss(buffer.rows, bonus) != loss(buffer.rows)


def test_actor_log_std_floor(so2):
    """A log-std head far below the floor is clamped to log_std_min: with the same noise, the
    log-prob at floor -20 exceeds the one at EDAC's -5 by 15 per action dimension (the tanh term is
    ~0 for a zero mean)."""
    actor = so2.Actor(3, 2, (8,))
    torch.nn.init.zeros_(actor.mu.weight), torch.nn.init.zeros_(actor.mu.bias)
    torch.nn.init.zeros_(actor.log_std.weight), torch.nn.init.constant_(actor.log_std.bias, -30.0)
    obs = torch.randn(4, 3)
    log_probs = {}
    for floor in (-5.0, -20.0):
        actor.log_std_min = floor
        torch.manual_seed(0)
        log_probs[floor] = actor(obs)[1]
    assert torch.allclose(log_probs[-20.0] - log_probs[-5.0], torch.full((4,), 30.0), atol=1e-3)
