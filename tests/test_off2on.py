"""algorithms/off2on.py: the density-ratio loss and the balanced-replay priorities on hand-checkable
inputs, the priority draw, the moment-matched mixture against a direct computation, the mixture
policy's log-prob against torch's tanh-transformed Normal, each agent's pretraining on its own
batch, SO2's perturbed target and update count (--so2), and end-to-end runs (Off2On + SO2 as in
the resume tests; plain Off2On from --pretrained)."""

import copy
import math

import pytest
import torch

from conftest import RESUME_ARGS, check_summary, finished_run, load_run_file, load_script, read_metrics

off2on = load_script("algorithms/off2on.py")


def test_density_ratio_loss_by_hand_and_its_minimiser():
    w_offline, w_online = torch.tensor([1.0, 3.0]), torch.tensor([1.0, 0.5])
    # offline: -(log(2/2) + log(2/4)) / 2 = log(2) / 2; online: -(log(2/2) + log(1/1.5)) / 2 = log(1.5) / 2
    expected = math.log(2) / 2 + math.log(1.5) / 2
    assert math.isclose(off2on.density_ratio_loss(w_offline, w_online).item(), expected, rel_tol=1e-6)
    # Two points x1, x2: offline batch x1, x2, x2, x2 and online batch x1, x1, x1, x2, so
    # d_on / d_off is 3 at x1 and 1/3 at x2; the loss is stationary exactly there.
    for w1, w2, stationary in [(3.0, 1.0 / 3.0, True), (1.0, 1.0, False)]:
        w = torch.tensor([w1, w2], requires_grad=True)
        loss = off2on.density_ratio_loss(w[[0, 1, 1, 1]], w[[0, 0, 0, 1]])
        (grad,) = torch.autograd.grad(loss, w)
        assert (grad.abs().max().item() < 1e-6) == stationary, grad


def test_priorities_by_hand():
    # T = 5: dataset rows' w^(1/5) = 1 and 2, mean 1.5; rows' w^(1/5) = 0, 1, 2, 1e4
    w = torch.tensor([0.0, 1.0, 32.0, 1e20])
    p = off2on.priorities(w, torch.tensor([1.0, 32.0]), 5.0)
    assert torch.allclose(p, torch.tensor([0.001, 1 / 1.5, 2 / 1.5, 1000.0]))


def test_initial_priority_gives_the_first_epoch_its_share():
    for fraction in (0.5, 0.75):
        top = off2on.initial_max_priority(1000, fraction, 50)
        assert math.isclose(50 * top / (1000 * 1.0 + 50 * top), fraction)
    assert off2on.initial_max_priority(1000, 0.5, 50) == 20.0


def test_stratified_draw_follows_the_priorities():
    # priorities 1, 0, 3: the first of four equal slices of the total lands on row 0, the other
    # three on row 2; a zero-priority row is never drawn.
    cumulative = torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64).cumsum(0)
    torch.manual_seed(0)
    assert off2on.stratified_draw(cumulative, 4).tolist() == [0, 2, 2, 2]
    # three slices of 10/3 across priorities 1, 2, 7: where a slice's draw lands is random, and
    # the frequencies are the priorities' shares
    counts = torch.zeros(3)
    cumulative = torch.tensor([1.0, 2.0, 7.0], dtype=torch.float64).cumsum(0)
    for _ in range(10_000):
        counts += torch.bincount(off2on.stratified_draw(cumulative, 3), minlength=3)
    assert torch.allclose(counts / counts.sum(), torch.tensor([0.1, 0.2, 0.7]), atol=0.01)


def test_mixture_moments_against_a_direct_computation():
    torch.manual_seed(0)
    mu, std = torch.randn(4, 3, 2), torch.rand(4, 3, 2) + 0.1
    mean, mix_std = off2on.mixture_moments(mu, std)
    for b in range(3):
        for a in range(2):
            m, s = mu[:, b, a].double(), std[:, b, a].double()
            direct_mean = m.mean()
            # law of total variance: mean of the variances + variance of the means
            direct_var = (s**2).mean() + ((m - direct_mean) ** 2).mean()
            assert math.isclose(mean[b, a].item(), direct_mean.item(), rel_tol=1e-5, abs_tol=1e-6)
            assert math.isclose(mix_std[b, a].item() ** 2, direct_var.item(), rel_tol=1e-5)
    # and the moments of samples drawn from the mixture itself
    k = torch.randint(0, 4, (400_000,))
    samples = mu[k, 0, 0] + std[k, 0, 0] * torch.randn(400_000)
    assert abs(samples.mean().item() - mean[0, 0].item()) < 0.01
    assert abs(samples.std().item() - mix_std[0, 0].item()) < 0.01
    # equal members with a tiny std: the std is clipped at e^-20 (release)
    _, tiny = off2on.mixture_moments(torch.zeros(3, 1, 1), torch.full((3, 1, 1), 1e-12))
    assert math.isclose(tiny.item(), math.exp(-20), rel_tol=1e-4)


def make_agent(**overrides):
    cfg = off2on.Config(hidden_dims=(8,), num_agents=3, batch_size=4, weight_batch_size=3, **overrides)
    torch.manual_seed(0)
    return off2on.Off2OnAgent(3, 2, cfg, torch.device("cpu")), cfg


def test_mixture_policy_acts_with_the_mixture_and_its_log_prob():
    agent, _ = make_agent()
    obs = torch.rand(5, 3)
    with torch.no_grad():
        mu, std = agent.actor.agents(obs)
        mean, mix_std = off2on.mixture_moments(mu, std)
        assert torch.equal(agent.actor(obs, deterministic=True)[0], torch.tanh(mu.mean(0)))
        torch.manual_seed(3)
        action, log_prob = agent.actor(obs)
    # torch's own tanh-transformed Normal gives the same density (away from the +-1 edges)
    squashed = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, mix_std), [torch.distributions.TanhTransform()]
    )
    assert torch.allclose(log_prob, squashed.log_prob(action).sum(-1), atol=1e-4)


SPLIT = off2on.ReplayBuffer(1, 3, 2, torch.device("cpu")).split  # rows of the agents above -> fields


def online_agent_and_rows():
    """An agent gone online, a batch of 4 rows and a density-ratio batch of 3 + 3 rows."""
    agent, cfg = make_agent()
    agent.go_online()
    torch.manual_seed(1)
    return agent, cfg, torch.rand(4, 10) * 2 - 1, torch.rand(6, 10) * 2 - 1


def test_each_agent_pretrains_on_its_own_batch():
    """Changing agent 1's batch changes nothing in agents 0 and 2 after a CQL step."""
    agent, cfg = make_agent(cql_n_actions=2)
    torch.manual_seed(1)
    rows = torch.rand(3, 4, 10) * 2 - 1
    other = rows.clone()
    other[1] = torch.rand(4, 10)
    results = []
    for batch in (rows, other):
        copy_ = copy.deepcopy(agent)
        torch.manual_seed(7)  # the same noise draws in both
        copy_.pretrain_update(batch, SPLIT, bc=False)
        results.append(copy_)
    a, b = results
    for name in ("actor", "critic"):
        pairs = list(zip(getattr(a, name).parameters(), getattr(b, name).parameters()))
        others, agent_1 = ([0, 2], [1]) if name == "actor" else ([0, 1, 4, 5], [2, 3])  # critics 2k, 2k + 1
        assert all(torch.equal(pa[others], pb[others]) for pa, pb in pairs), name
        # (Adam's first step moves every parameter by +-lr, so only some of agent 1's differ)
        assert any(not torch.equal(pa[agent_1], pb[agent_1]) for pa, pb in pairs), name
    assert torch.equal(a.log_alphas[[0, 2]], b.log_alphas[[0, 2]])


def tanh_gaussian(mu, std, noise):
    """Action and log-prob of one agent's policy, written with torch.distributions."""
    u = mu + std * noise
    log_prob = torch.distributions.Normal(mu, std).log_prob(u).sum(-1) - torch.log(1 - torch.tanh(u) ** 2).sum(-1)
    return torch.tanh(u), log_prob


def test_cql_critic_loss_against_a_loop_over_agents_and_critics():
    k, b, n, a_dim = 3, 4, 2, 2
    agent, cfg = make_agent(cql_n_actions=n)
    with torch.no_grad():  # Q that varies with the action (the init's last layers are near 0)
        for p in [*agent.critic.parameters(), *agent.target_critic.parameters()]:
            p.normal_(0.0, 0.5)
    torch.manual_seed(1)
    rows = torch.rand(k, b, 10) * 2 - 1
    rows[..., 8] = (torch.rand(k, b) < 0.3).float()  # some terminations
    torch.manual_seed(7)
    out = copy.deepcopy(agent).pretrain_update(rows, SPLIT, bc=False)
    # the update's draws in its order: the policy sample at s (temperature and policy losses), the
    # next action and the CQL policy actions (at s, then at s'), the random actions
    torch.manual_seed(7)
    torch.randn(k, b, a_dim)
    noise = torch.randn(k, (1 + 2 * n) * b, a_dim)
    random_actions = torch.empty(k, n * b, a_dim).uniform_(-1.0, 1.0)
    obs, act, rew, next_obs, done = SPLIT(rows)
    expected = 0.0
    with torch.no_grad():
        for i in range(k):
            states = torch.cat([next_obs[i], obs[i], obs[i], next_obs[i], next_obs[i]])  # s', n x s, n x s'
            mu, std = (t[i] for t in agent.actor.agents(states))
            actions, log_probs = tanh_gaussian(mu, std, noise[i])
            target = agent.target_critic(next_obs[i], actions[:b])  # every network on agent i's pairs
            y = rew[i] + cfg.gamma * (1 - done[i]) * torch.minimum(target[2 * i], target[2 * i + 1])
            for m in (2 * i, 2 * i + 1):
                q_data = agent.critic(obs[i], act[i])[m]
                values = []  # per sample, the 3n terms of the importance-sampled logsumexp
                for j in range(n):
                    values.append(
                        agent.critic(obs[i], random_actions[i, j * b : (j + 1) * b])[m] - a_dim * math.log(0.5)
                    )
                    rows_s, rows_next = slice(b + j * b, b + (j + 1) * b), slice(b + (n + j) * b, b + (n + j + 1) * b)
                    values.append(agent.critic(obs[i], actions[rows_s])[m] - log_probs[rows_s])
                    values.append(agent.critic(obs[i], actions[rows_next])[m] - log_probs[rows_next])
                logsumexp = torch.logsumexp(torch.stack(values), dim=0)
                expected += (q_data - y).pow(2).mean() + cfg.cql_alpha * (logsumexp.mean() - q_data.mean())
    assert torch.allclose(out["critic_loss"], expected, rtol=1e-5)


def online_target(agent, rows, sigma, seed):
    """The TD target y [2K, B] as the header writes it, with the update's noise draws."""
    obs, act, rew, next_obs, done = SPLIT(rows)
    torch.manual_seed(seed)
    with torch.no_grad():
        next_action, next_log_pi = agent.actor(next_obs)
        if sigma > 0:
            next_action = off2on.perturb_action(next_action, torch.randn_like(next_action), sigma, 0.6)
        q = agent.target_critic(next_obs, next_action).view(3, 2, -1)
        alpha = agent.log_alpha.exp()
        y = rew + agent.cfg.gamma * (1 - done) * (q.min(1).values - alpha * next_log_pi)
        return y.repeat_interleave(2, dim=0), agent.critic(obs, act)


def test_so2_perturbs_the_next_action_of_the_target():
    agent, cfg, rows, weight_rows = online_agent_and_rows()
    rows[:, 8] = 0.0  # not done: the target bootstraps
    losses = {}
    for sigma in (0.0, 0.3):
        updated = copy.deepcopy(agent)
        torch.manual_seed(5)
        out, new_priorities = updated.online_update(rows, weight_rows, SPLIT, policy_step=False, sigma=sigma)
        y, q = online_target(agent, rows, sigma, seed=5)
        assert torch.allclose(out["critic_loss"], (q - y).pow(2).mean(1).sum())
        assert "actor_loss" not in out and "alpha_loss" not in out  # no policy step
        assert all(torch.equal(p, p0) for p, p0 in zip(updated.actor.parameters(), agent.actor.parameters()))
        with torch.no_grad():
            obs, act = SPLIT(torch.cat([weight_rows, rows]))[:2]
            w = agent.weight_net(obs, act)
        assert torch.allclose(new_priorities, off2on.priorities(w[6:], w[:3], 5.0))  # pre-step network
        losses[sigma] = out["critic_loss"]
    assert not torch.allclose(losses[0.0], losses[0.3])


def test_policy_step_trains_the_mixture_on_the_mean_of_the_twin_minima():
    agent, cfg, rows, weight_rows = online_agent_and_rows()
    assert math.isclose(agent.log_alpha.exp().item(), 1.0)  # reset to 1 online
    with torch.no_grad():
        agent.log_alpha.fill_(math.log(0.5))
    updated = copy.deepcopy(agent)
    torch.manual_seed(5)
    out, _ = updated.online_update(rows, weight_rows, SPLIT, policy_step=True, sigma=0.0)
    torch.manual_seed(5)
    with torch.no_grad():
        obs = SPLIT(rows)[0]
        action, log_pi = agent.actor(obs)
        q = agent.critic(obs, action).view(3, 2, -1)
        q_mean_of_minima = torch.stack([torch.minimum(q[i, 0], q[i, 1]) for i in range(3)]).mean(0)
    assert torch.allclose(out["actor_loss"], (0.5 * log_pi - q_mean_of_minima).mean())
    assert torch.allclose(out["alpha_loss"], -(math.log(0.5) * (log_pi - 2.0)).mean())  # target entropy -|A|
    assert not all(torch.equal(p, p0) for p, p0 in zip(updated.actor.parameters(), agent.actor.parameters()))


@pytest.fixture(scope="module")
def so2_run(tmp_path_factory, datasets_root):
    """Off2On + SO2 (2 updates per env step) with the resume tests' tiny budget."""
    return finished_run("algorithms/off2on.py", RESUME_ARGS["off2on"], tmp_path_factory.mktemp("runs"), datasets_root)[
        0
    ]


def test_end_to_end_with_so2(so2_run):
    records = read_metrics(so2_run)
    check_summary(so2_run, records)
    online = [r for r in records if r["phase"] == "finetune"]
    # epochs of 50 env steps; so2_utd = 2 updates per env step, the first epoch twice as many
    # (--first-epoch-multiplier 2); evaluations after the epochs that pass a multiple of 60
    assert [(r["env_steps"], r["step"]) for r in online] == [
        (0, 0),
        (100, 300),
        (150, 400),
        (200, 500),
        (250, 600),
        (300, 700),
    ]
    assert all(0 < r["online_share"] <= 1 and r["w_online"] >= 0 for r in online[1:])
    pretrained = load_run_file(so2_run / "pretrain.pt")["agent"]
    final = load_run_file(so2_run / "final.pt")["agent"]
    assert final["online"] and not pretrained["online"]
    # the priorities at the end: one per dataset row and online row, clipped, none above the
    # running maximum, which started at the first epoch's share and only grows
    loop = load_run_file(so2_run / "checkpoint.pt")["loop"]
    priority, top = loop["priority"], loop["max_priority"].item()
    assert len(priority) == 1500 + 300 and top >= off2on.initial_max_priority(1500, 0.5, 50)
    assert priority.min() >= 0.001 and priority.max() <= top
    refreshed = priority[priority != 1.0]  # dataset rows that were drawn, and every online row
    assert ((refreshed <= 1000.0) | (refreshed == top)).all()
    assert not all(torch.equal(final["actor"][k], pretrained["actor"][k]) for k in pretrained["actor"])


def test_plain_off2on_from_the_pretraining(so2_run, tmp_path, datasets_root):
    assert RESUME_ARGS["off2on"][-3:] == ["--so2", "--so2-utd", "2"]
    args = RESUME_ARGS["off2on"][:-3] + ["--pretrained", str(so2_run / "pretrain.pt"), "--online-steps", "120"]
    run_dir, result = finished_run("algorithms/off2on.py", args, tmp_path, datasets_root)
    assert "Off2On (2 agents), device" in result.stderr and "finetune from step 0" in result.stderr
    records = read_metrics(run_dir)
    first = next(r for r in read_metrics(so2_run) if r["phase"] == "finetune")
    assert records[0]["return"] == first["return"]  # the same mixture policy at the start
    # one update per env step, the first epoch of 50 twice; the last epoch is cut at 120
    assert [(r["env_steps"], r["step"]) for r in records] == [(0, 0), (100, 150), (120, 170)]
