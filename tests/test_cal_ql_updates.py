"""The update equations of algorithms/cal_ql.py on hand-checkable inputs: the calibrated CQL term,
the Monte-Carlo return-to-go, the SERA reward against a brute-force k-NN, the loose variant."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch


def lse(values):
    return math.log(sum(math.exp(v) for v in values))


def test_cql_logsumexp_plain_by_hand(cal_ql):
    # N=1 member, n=1 action of each kind, B=1, A=2: random density 0.5^2, so -log density = log 4.
    q_random, q_current, q_next = torch.tensor([[[1.0]]]), torch.tensor([[[2.0]]]), torch.tensor([[[0.5]]])
    log_pi_current, log_pi_next = torch.tensor([[-1.0]]), torch.tensor([[0.3]])
    out = cal_ql.cql_logsumexp(q_random, q_current, log_pi_current, q_next, log_pi_next, 2, None)
    assert out.item() == pytest.approx(lse([1.0 + math.log(4), 2.0 + 1.0, 0.5 - 0.3]), rel=1e-6)


def test_calibration_is_a_no_op_when_the_bound_is_below_every_q(cal_ql):
    torch.manual_seed(0)
    q_random, q_current, q_next = (torch.randn(2, 4, 5) for _ in range(3))
    log_pi_current, log_pi_next = torch.randn(4, 5), torch.randn(4, 5)
    plain = cal_ql.cql_logsumexp(q_random, q_current, log_pi_current, q_next, log_pi_next, 3, None)
    below = torch.full((5,), -100.0)
    assert torch.equal(cal_ql.cql_logsumexp(q_random, q_current, log_pi_current, q_next, log_pi_next, 3, below), plain)


def test_calibration_raises_exactly_the_policy_actions_below_the_bound(cal_ql):
    # B=2 transitions, N=1, n=2. Bound 1.5 for transition 0, -9 for transition 1 (below everything).
    q_random = torch.tensor([[[0.0, 3.0], [2.0, 0.0]]])  # [N, n, B]: random actions are never bounded
    q_current = torch.tensor([[[1.0, 1.0], [2.0, -1.0]]])
    q_next = torch.tensor([[[1.4, 5.0], [1.6, 0.0]]])
    log_pi_current = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    log_pi_next = torch.tensor([[-0.1, -0.2], [-0.3, -0.4]])
    bound = torch.tensor([1.5, -9.0])
    out = cal_ql.cql_logsumexp(q_random, q_current, log_pi_current, q_next, log_pi_next, 1, bound)[0]
    ld = math.log(2)  # -log 0.5^1
    # Transition 0: q_current 1.0 -> 1.5 and 2.0 stays; q_next 1.4 -> 1.5 and 1.6 stays; random 0.0 stays.
    expected_0 = lse([0.0 + ld, 2.0 + ld, 1.5 + 0.1, 1.6 + 0.3, 1.5 - 0.1, 2.0 - 0.3])
    # Transition 1: nothing is below -9, so it is the plain value.
    expected_1 = lse([3.0 + ld, 0.0 + ld, 5.0 + 0.2, 0.0 + 0.4, 1.0 - 0.2, -1.0 - 0.4])
    assert out.tolist() == pytest.approx([expected_0, expected_1], rel=1e-6)
    plain = cal_ql.cql_logsumexp(q_random, q_current, log_pi_current, q_next, log_pi_next, 1, None)[0]
    assert plain[1].item() == pytest.approx(expected_1, rel=1e-6) and plain[0] < out[0]


def test_return_to_go_with_termination_and_truncation(cal_ql):
    # Episode 1 (3 steps) terminates; episode 2 (2 steps) is truncated: its tail counts as 0.
    rewards = np.array([1, 2, 3, 4, 5], dtype=np.float32)
    terminals = np.array([0, 0, 1, 0, 0], dtype=np.float32)
    timeouts = np.array([0, 0, 0, 0, 1], dtype=np.float32)
    g = cal_ql.return_to_go(rewards, terminals, timeouts, 0.5, None)
    assert g.tolist() == [1 + 0.5 * (2 + 0.5 * 3), 2 + 0.5 * 3, 3, 4 + 0.5 * 5, 5]
    # A truncation in the middle of the array separates episodes as a termination does.
    g = cal_ql.return_to_go(rewards, np.zeros(5, np.float32), np.array([0, 1, 0, 0, 0], np.float32), 0.5, None)
    assert g.tolist() == [1 + 0.5 * 2, 2, 3 + 0.5 * (4 + 0.5 * 5), 4 + 0.5 * 5, 5]


def test_return_to_go_sparse_failure_rule(cal_ql):
    # Episode 1 fails everywhere (-1 = the failure reward): -1 / (1 - 0.5) = -2 at every step.
    # Episode 2 reaches the goal (reward 0): the usual recursion.
    rewards = np.array([-1, -1, -1, -1, 0], dtype=np.float32)
    terminals = np.array([0, 0, 0, 0, 1], dtype=np.float32)
    timeouts = np.array([0, 0, 1, 0, 0], dtype=np.float32)
    assert cal_ql.return_to_go(rewards, terminals, timeouts, 0.5, -1.0).tolist() == [-2, -2, -2, -1, 0]
    assert cal_ql.return_to_go(rewards, terminals, timeouts, 0.5, None).tolist() == [-1.75, -1.5, -1, -1, 0]


def test_transition_rows_scale_rewards_before_the_return(cal_ql):
    arrays = {
        "observations": np.zeros((3, 2), np.float32),
        "actions": np.zeros((3, 1), np.float32),
        "next_observations": np.ones((3, 2), np.float32),
        "rewards": np.array([0, 0, 1], np.float32),
        "terminals": np.array([0, 0, 1], np.float32),
        "timeouts": np.zeros(3, np.float32),
    }
    cfg = replace(cal_ql.Config(), gamma=0.5, reward_scale=10.0, reward_bias=-5.0, sparse_fail_reward=0.0)
    rows = cal_ql.transition_rows(arrays, cfg)
    buffer = cal_ql.ReplayBuffer(3, 2, 1, torch.device("cpu"))
    buffer.extend(rows)
    obs, act, rew, next_obs, done, mc = buffer.split(buffer.rows)
    assert rew.tolist() == [-5, -5, 5] and done.tolist() == [0, 0, 1]
    assert mc.tolist() == [-5 + 0.5 * (-5 + 0.5 * 5), -5 + 0.5 * 5, 5]  # not all failures: no rule
    arrays["rewards"] = np.zeros(3, np.float32)
    assert cal_ql.transition_rows(arrays, cfg)[:, -1].tolist() == [-10, -10, -10]  # -5 / (1 - 0.5)


def digamma_int(m):
    return -0.5772156649015329 + sum(1.0 / j for j in range(1, m))


def brute_force_sera(states, q, k, include_self):
    n, dim = states.shape
    out = []
    for i in range(n):
        others = [j for j in range(n) if include_self or j != i]
        d = sorted(
            max(math.sqrt(sum((states[i, c] - states[j, c]) ** 2 for c in range(dim))), abs(q[i] - q[j]))
            for j in others
        )
        eps = d[k - 1]
        count = sum(1 for j in others if abs(q[i] - q[j]) < eps)
        out.append(digamma_int(count + 1) / dim + math.log(2 * eps + 1e-5))
    return out


def test_sera_reward_by_hand(cal_ql):
    # 1-D states 0, 0, 3 with q 0, 1, 1; k = 1, j = i excluded:
    # d_01 = max(0, 1) = 1, d_02 = d_12 = 3 -> eps = 1, 1, 3; n_q = 0, 1 (q_2 = q_1), 2.
    states, q = torch.tensor([[0.0], [0.0], [3.0]]), torch.tensor([0.0, 1.0, 1.0])
    r = cal_ql.sera_reward(states, q, 1, include_self=False)
    expected = [
        digamma_int(1) + math.log(2 + 1e-5),
        digamma_int(2) + math.log(2 + 1e-5),
        digamma_int(3) + math.log(6 + 1e-5),
    ]
    assert r.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # With j = i included (VCSE code), the first neighbour is the sample itself: eps = 0, n_q = 0.
    r = cal_ql.sera_reward(states, q, 1, include_self=True)
    assert r.tolist() == pytest.approx([digamma_int(1) + math.log(1e-5)] * 3, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("include_self", [False, True])
def test_sera_reward_against_brute_force_knn_with_ties(cal_ql, include_self):
    rng = np.random.default_rng(0)
    # Integer grid states and integer q: many equal distances and equal q values (ties), and
    # duplicated states (zero distances).
    states = rng.integers(0, 3, size=(24, 3)).astype(np.float32)
    states[5] = states[3]
    q = rng.integers(0, 4, size=24).astype(np.float32)
    for k in (1, 2, 5, 10):
        r = cal_ql.sera_reward(torch.as_tensor(states), torch.as_tensor(q), k, include_self)
        assert r.tolist() == pytest.approx(brute_force_sera(states, q, k, include_self), rel=1e-5, abs=1e-5)
    states, q = rng.normal(size=(40, 5)).astype(np.float32), rng.normal(size=40).astype(np.float32)
    r = cal_ql.sera_reward(torch.as_tensor(states), torch.as_tensor(q), 7, include_self)
    assert r.tolist() == pytest.approx(brute_force_sera(states, q, 7, include_self), rel=1e-4, abs=1e-4)


def tiny_agent(cal_ql, **overrides):
    cfg = replace(cal_ql.Config(), actor_hidden_dims=(16,), critic_hidden_dims=(16, 16), cql_n_actions=3, **overrides)
    torch.manual_seed(0)
    agent = cal_ql.CalQLAgent(4, 2, cfg, torch.device("cpu"))
    buffer = cal_ql.ReplayBuffer(8, 4, 2, torch.device("cpu"))
    rows = torch.randn(8, sum(buffer.sizes))
    rows[:, 4:6].clamp_(-0.9, 0.9)
    rows[:, -2] = (torch.rand(8) < 0.3).float()
    buffer.extend(rows)
    return agent, buffer


def test_calibrated_critic_loss_equals_cql_when_the_bound_is_low(cal_ql):
    agent, buffer = tiny_agent(cal_ql)
    buffer.rows[:, -1] = -1e6
    torch.manual_seed(1)
    calibrated = agent.losses(buffer.rows, buffer.split, conservative=True, calibrate=True)
    torch.manual_seed(1)
    plain = agent.losses(buffer.rows, buffer.split, conservative=True, calibrate=False)
    assert calibrated["critic"].item() == plain["critic"].item() and calibrated["bound_rate"] == 0
    buffer.rows[:, -1] = 1e3  # a bound above every Q raises the CQL term
    torch.manual_seed(1)
    raised = agent.losses(buffer.rows, buffer.split, conservative=True, calibrate=True)
    assert (
        raised["cql"] > plain["cql"]
        and raised["bellman"].item() == plain["bellman"].item()
        and raised["bound_rate"] == 1
    )


def test_loose_finetuning_loss_has_no_cql_term(cal_ql, monkeypatch):
    agent, buffer = tiny_agent(cal_ql, cql_lagrange=True)
    torch.manual_seed(1)
    conservative = agent.losses(buffer.rows, buffer.split, conservative=True, calibrate=True)

    def no_cql(*args, **kwargs):
        raise AssertionError("the loose update must not compute the CQL term")

    monkeypatch.setattr(cal_ql, "cql_logsumexp", no_cql)
    torch.manual_seed(1)
    loose = agent.losses(buffer.rows, buffer.split, conservative=False, calibrate=True)
    assert "cql" not in loose and "cql_alpha" not in loose
    assert loose["critic"] is loose["bellman"]
    assert conservative["critic"].item() == pytest.approx(conservative["bellman"].item() + conservative["cql"].item())
    # Bellman loss by hand: y = r + gamma (1 - d) max over the sampled next actions of the twin min.
    obs, act, rew, next_obs, done, _ = buffer.split(buffer.rows)
    torch.manual_seed(1)
    agent.actor(obs)  # the actor-loss sample comes first
    with torch.no_grad():
        next_actions, _ = agent.actor(next_obs.repeat(3, 1))
        next_v = agent.target_critic(next_obs.repeat(3, 1), next_actions).view(2, 3, -1).min(0).values.max(0).values
        y = rew + 0.99 * (1 - done) * next_v
        expected = (agent.critic(obs, act) - y).pow(2).mean(1).sum()
    assert loose["bellman"].item() == pytest.approx(expected.item(), rel=1e-6)
    logged = agent.update(buffer.rows, buffer.split, conservative=False, calibrate=True)
    assert "cql_loss" not in logged and "cql_alpha_loss" not in logged


def test_lagrange_multiplier_grows_when_the_gap_exceeds_the_target(cal_ql):
    agent, buffer = tiny_agent(cal_ql, cql_lagrange=True, cql_target_gap=-100.0)
    before = agent.log_cql_alpha.item()
    logged = agent.update(buffer.rows, buffer.split, conservative=True, calibrate=True)
    assert logged["cql_gap"] > -100 and agent.log_cql_alpha.item() > before
    # The multiplier's own loss does not train the critics, nor the CQL loss the multiplier.
    out = agent.losses(buffer.rows, buffer.split, conservative=True, calibrate=True)
    assert out["cql"].grad_fn is not None
    grads = torch.autograd.grad(out["cql"], [agent.log_cql_alpha], allow_unused=True)
    assert grads[0] is None


def test_sera_bonus_only_on_the_online_rows(cal_ql):
    agent, buffer = tiny_agent(cal_ql, sera=True, sera_k=2, sera_lambda=0.5)
    bonus, r_int = cal_ql.sera_bonus(agent.critic, buffer.rows, 3, buffer.split, agent.cfg)
    obs, act = buffer.split(buffer.rows[3:])[:2]
    expected = cal_ql.sera_reward(obs, agent.critic(obs, act).min(0).values, 2, False)
    assert (
        bonus[:3].tolist() == [0, 0, 0]
        and torch.allclose(r_int, expected)
        and torch.allclose(bonus[3:], 0.5 * expected)
    )
    # The bonus enters the TD target as a reward: the Bellman loss changes, by the bonus alone.
    torch.manual_seed(1)
    with_bonus = agent.losses(buffer.rows, buffer.split, conservative=False, calibrate=True, bonus=bonus)
    shifted = buffer.rows.clone()
    shifted[:, 6] += bonus  # the reward column (obs 4 + action 2)
    torch.manual_seed(1)
    assert agent.losses(shifted, buffer.split, conservative=False, calibrate=True)["bellman"].item() == pytest.approx(
        with_bonus["bellman"].item()
    )
