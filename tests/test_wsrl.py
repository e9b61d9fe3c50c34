"""WSRL (algorithms/wsrl.py): the subset-min target, the CQL-ensemble pretraining update and the
online SAC updates against direct computations on tiny inputs, the LayerNorm networks, and in tiny
runs the warm-up without updates and an online buffer that never holds a dataset row."""

import copy
import math

import pytest
import torch

from conftest import RESUME_ARGS, load_run_file, load_script, read_metrics, rows_in


def resume_arg(flag: str) -> int:
    """The integer value of a flag of wsrl.py's tiny resume-test run (the run traced below)."""
    args = RESUME_ARGS["wsrl"]
    return int(args[args.index(flag) + 1])


@pytest.fixture(scope="module")
def wsrl():
    return load_script("algorithms/wsrl.py")


def tiny_agent(wsrl, **overrides):
    cfg = wsrl.Config(num_critics=4, hidden_dim=8, cql_n_actions=3, **overrides)
    torch.manual_seed(0)
    agent = wsrl.WSRLAgent(3, 2, cfg, torch.device("cpu"))
    with torch.no_grad():  # distinct members and non-trivial LayerNorm parameters
        for p in agent.critic.parameters():
            p.add_(0.3 * torch.randn_like(p))
        agent.target_critic.load_state_dict(agent.critic.state_dict())
        for p in agent.target_critic.parameters():
            p.add_(0.1 * torch.randn_like(p))
    buffer = wsrl.ReplayBuffer(6, 3, 2, torch.device("cpu"))
    rows = torch.rand(6, sum(buffer.sizes))
    rows[:, 3:5] = rows[:, 3:5] * 2 - 1  # actions in [-1, 1]
    rows[:, -1] = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 0.0])  # two terminal rows
    buffer.extend(rows)
    return agent, buffer


def test_td_target_is_the_max_over_next_actions_of_the_subset_min(wsrl):
    reward, done = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0])
    # [K=2 members, n=3 next actions, B=2]
    next_q = torch.tensor([[[3.0, 1.0], [6.0, 2.0], [0.0, 9.0]], [[4.0, 1.0], [5.0, 8.0], [7.0, 0.0]]])
    y = wsrl.td_target(reward, done, next_q, 0.9)
    # row 0: min over members per action = 3, 5, 0 -> max 5; row 1 is terminal: its reward only
    assert torch.allclose(y, torch.tensor([1 + 0.9 * 5.0, 0.5]))
    # Online (n = 1): the plain min over the subset, no entropy term.
    assert torch.allclose(wsrl.td_target(reward, done, next_q[:, :1], 0.9), torch.tensor([1 + 0.9 * 3.0, 0.5]))


def member_mlp(critic, k: int, obs, act):
    """Member k of the vectorized critic, written out: Dense -> LayerNorm -> ReLU twice, Dense(1)."""
    x = torch.cat([obs, act], -1)
    for i in range(2):
        x = x @ critic.weights[i][k] + critic.biases[i][k]
        x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)
        x = torch.relu(x * critic.norm_scales[i][k] + critic.norm_shifts[i][k])
    return (x @ critic.weights[2][k] + critic.biases[2][k]).squeeze(-1)


def test_critic_members_are_layer_normed_mlps_and_the_actor_has_layer_norm(wsrl):
    agent, buffer = tiny_agent(wsrl)
    obs, act = buffer.split(buffer.rows)[:2]
    q = agent.critic(obs, act)
    for k in range(4):
        assert torch.allclose(q[k], member_mlp(agent.critic, k, obs, act), atol=1e-5)
    members = torch.tensor([2, 2])  # drawn with replacement, a member may come twice
    assert torch.allclose(agent.critic(obs, act, members), q[[2, 2]])
    nn = torch.nn
    assert [type(m) for m in agent.actor.trunk] == [nn.Linear, nn.LayerNorm, nn.ReLU] * 2  # norm before ReLU
    assert all(m.eps == 1e-6 for m in agent.actor.trunk if isinstance(m, nn.LayerNorm))


def test_orthogonal_init_with_the_released_gains(wsrl):
    """flax orthogonal kernels: W^T W = gain^2 I over the smaller side; the last hidden layer 1e-2."""
    torch.manual_seed(0)
    critic = wsrl.VectorizedCritic(5, 3, 16, num_critics=2)
    actor = wsrl.Actor(5, 3, 16)
    for w, gain in zip(critic.weights, (2**0.5, 1e-2, 2**0.5)):
        for member in w:
            small = member.T @ member if member.shape[0] >= member.shape[1] else member @ member.T
            assert torch.allclose(small, gain**2 * torch.eye(len(small)), atol=1e-5 * max(gain**2, 1))
    for layer, gain in ((actor.trunk[0], 2**0.5), (actor.trunk[3], 1e-2), (actor.mu, 2**0.5), (actor.log_std, 2**0.5)):
        w = layer.weight.detach()  # [out, in]: orthonormal columns or rows, scaled by the gain
        small = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
        assert torch.allclose(small, gain**2 * torch.eye(len(small)), atol=1e-5 * max(gain**2, 1))
    assert all(float(b.detach().abs().max()) == 0 for b in critic.biases)


def test_subsets_are_drawn_with_replacement(wsrl):
    agent, _ = tiny_agent(wsrl, num_min_qs=3)
    torch.manual_seed(0)
    draws = [tuple(agent.subset(torch.device("cpu")).tolist()) for _ in range(200)]
    assert any(len(set(d)) < 3 for d in draws) and {m for d in draws for m in d} == {0, 1, 2, 3}


def test_pretrain_step_losses_against_a_direct_computation(wsrl):
    """The CQL update's TD loss, penalty and policy losses, recomputed by hand from the same randoms
    (the penalty on its own random members only), and all three from the pre-update parameters."""
    agent, buffer = tiny_agent(wsrl)
    before = copy.deepcopy(agent)
    torch.manual_seed(1)
    losses = agent.pretrain_step(buffer.rows, buffer.split)

    a, n, gamma = before, 3, 0.99
    obs, act, rew, next_obs, done = buffer.split(buffer.rows)
    torch.manual_seed(1)
    states = torch.cat([next_obs.expand(n, -1, -1), obs.expand(n, -1, -1), next_obs.expand(n, -1, -1)])
    actions, log_pis = a.actor(states.reshape(-1, 3))
    actions, log_pis = actions.view(3 * n, 6, 2).detach(), log_pis.view(3 * n, 6).detach()
    target_members = torch.randint(0, 4, (2,))
    next_q = torch.stack([a.target_critic(next_obs, actions[j])[target_members] for j in range(n)], 1)  # [2, n, B]
    y = rew + gamma * (1 - done) * next_q.min(0).values.max(0).values
    q_data = a.critic(obs, act)
    td = ((q_data - y) ** 2).mean()
    penalty_members = torch.randint(0, 4, (2,))
    random_actions = torch.empty(n, 6, 2).uniform_(-1, 1)
    log_density = torch.cat([torch.full((n, 6), 2 * math.log(0.5)), log_pis[2 * n :], log_pis[n : 2 * n]])
    all_actions = torch.cat([random_actions, actions[2 * n :], actions[n : 2 * n]])  # uniform, at s', at s
    q_ood = torch.stack([a.critic(obs, all_actions[j]) for j in range(3 * n)], 1)[penalty_members]  # [2, 3n, B]
    ood = torch.logsumexp(q_ood - log_density, dim=1)
    cql = (ood - q_data[penalty_members]).mean()
    new_action, log_pi = a.actor(obs)
    alpha = 1.0  # init_temperature, before the step
    actor_loss = (alpha * log_pi - a.critic(obs, new_action).min(0).values).mean()

    assert losses["critic_loss"].item() == pytest.approx((td + 5.0 * cql).item(), rel=1e-5)
    assert losses["cql_loss"].item() == pytest.approx(cql.item(), rel=1e-5)
    assert losses["actor_loss"].item() == pytest.approx(actor_loss.item(), rel=1e-5)
    # Each loss reached its own parameters only, with the gradient of the hand-computed loss; the
    # temperature's is sigmoid(theta) (entropy at s' + |A|).
    critic_grad = torch.autograd.grad(td + 5.0 * cql, a.critic.weights[1], retain_graph=True)[0]
    assert torch.allclose(agent.critic.weights[1].grad, critic_grad, rtol=1e-4, atol=1e-7)
    actor_grad = torch.autograd.grad(actor_loss, a.actor.mu.weight)[0]
    assert torch.allclose(agent.actor.mu.weight.grad, actor_grad, rtol=1e-4, atol=1e-7)
    theta0 = math.log(math.expm1(1.0))
    expected = torch.sigmoid(torch.tensor(theta0)).item() * (-log_pis[:n].mean().item() + 2.0)
    assert agent.alpha_param.grad.item() == pytest.approx(expected, rel=1e-5)
    # ... then the target's Polyak step.
    new, old, online = agent.target_critic.weights[0], a.target_critic.weights[0], agent.critic.weights[0]
    assert torch.allclose(new, old + 0.005 * (online - old), atol=1e-7)


def test_online_critic_step_is_sac_on_the_subset_min_without_entropy(wsrl):
    agent, buffer = tiny_agent(wsrl)
    before = copy.deepcopy(agent)
    torch.manual_seed(2)
    loss = agent.critic_step(buffer.rows, buffer.split)
    obs, act, rew, next_obs, done = buffer.split(buffer.rows)
    torch.manual_seed(2)
    next_action, _ = before.actor(next_obs)
    members = torch.randint(0, 4, (2,))
    y = rew + 0.99 * (1 - done) * before.target_critic(next_obs, next_action)[members].min(0).values
    expected = ((before.critic(obs, act) - y) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    grad = torch.autograd.grad(expected, before.critic.weights[0])[0]
    assert torch.allclose(agent.critic.weights[0].grad, grad, rtol=1e-4, atol=1e-7)
    # The actor and the temperature got a zero gradient (fresh Adam moments: no move); the target
    # moved by tau.
    assert all(torch.equal(p, q) for p, q in zip(agent.actor.parameters(), before.actor.parameters()))
    assert torch.equal(agent.alpha_param, before.alpha_param) and agent.alpha_param.grad.item() == 0.0
    new, old, online = agent.target_critic.weights[0], before.target_critic.weights[0], agent.critic.weights[0]
    assert torch.allclose(new, old + 0.005 * (online - old), atol=1e-7)


def test_a_critic_step_moves_the_actor_by_its_adam_momentum_as_optax_does(wsrl):
    """The release steps every optimiser at every update, the ones without a loss on a zero gradient:
    after one full update, a critic-only step moves each actor weight by -lr m_hat / (sqrt(v_hat) + eps)."""
    agent, buffer = tiny_agent(wsrl)
    agent.pretrain_step(buffer.rows, buffer.split)  # non-zero Adam moments everywhere
    w = agent.actor.mu.weight
    state = agent.actor_optim.state[w]
    m, v, t = state["exp_avg"] * 0.9, state["exp_avg_sq"] * 0.999, state["step"].item() + 1
    before = w.detach().clone()
    expected = before - 1e-4 * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
    agent.critic_step(buffer.rows, buffer.split)
    assert (w.detach() - before).abs().max() > 1e-6  # it moved, with no actor loss in this update
    assert torch.allclose(w.detach(), expected, rtol=0, atol=1e-9)


def test_actor_and_temperature_step_on_all_rows(wsrl):
    agent, buffer = tiny_agent(wsrl)
    before = copy.deepcopy(agent)
    torch.manual_seed(3)
    actor_loss = agent.actor_and_temperature_step(buffer.rows, buffer.split)
    obs, next_obs = buffer.split(buffer.rows)[0], buffer.split(buffer.rows)[3]
    torch.manual_seed(3)
    next_log_pi = before.actor(next_obs)[1]
    action, log_pi = before.actor(obs)
    expected = (log_pi - before.critic(obs, action).min(0).values).mean()  # alpha 1 before the step
    assert actor_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    actor_grad = torch.autograd.grad(expected, before.actor.trunk[0].weight)[0]
    assert torch.allclose(agent.actor.trunk[0].weight.grad, actor_grad, rtol=1e-4, atol=1e-7)
    # The critics got a zero gradient (fresh Adam moments: no move); the temperature's gradient is
    # d/dtheta softplus(theta) (H - T) = sigmoid(theta) (H + |A|), H the entropy at s'.
    critic = agent.critic.state_dict()
    assert all(torch.equal(v, critic[k]) for k, v in before.critic.state_dict().items())
    theta0 = math.log(math.expm1(1.0))
    expected_grad = torch.sigmoid(torch.tensor(theta0)).item() * (-next_log_pi.mean().item() + 2.0)
    assert agent.alpha_param.grad.item() == pytest.approx(expected_grad, rel=1e-5)


@pytest.fixture(scope="module")
def traced_run(wsrl, tmp_path_factory, datasets_root):
    """The resume test's tiny run (pretraining 300, warm-up 50, utd 2), in this process, recording in
    order every online update: its kind, the online buffer's size and the rows it read."""
    seen = []
    critic_step, actor_step = wsrl.WSRLAgent.critic_step, wsrl.WSRLAgent.actor_and_temperature_step
    buffers = []
    add = wsrl.ReplayBuffer.add

    def record_add(buffer, *args):
        if not buffers or buffers[-1] is not buffer:
            buffers.append(buffer)
        return add(buffer, *args)

    def record(name, step):
        def wrapped(agent, batch, split):
            if buffers:  # the run's updates, not the start-of-run time estimate's (before any env step)
                seen.append((name, buffers[-1].size, batch.clone()))
            return step(agent, batch, split)

        return wrapped

    mp = pytest.MonkeyPatch()
    mp.setattr(wsrl.ReplayBuffer, "add", record_add)
    mp.setattr(wsrl.WSRLAgent, "critic_step", record("critic", critic_step))
    mp.setattr(wsrl.WSRLAgent, "actor_and_temperature_step", record("actor", actor_step))
    out = tmp_path_factory.mktemp("wsrl_traced")
    mp.setenv("MINARI_DATASETS_PATH", str(datasets_root))
    mp.setenv("HF_HUB_OFFLINE", "1")
    try:
        wsrl.main([*RESUME_ARGS["wsrl"], "--out-dir", str(out), "--checkpoint-every", "1000"])
    finally:
        mp.undo()
    (run_dir,) = out.iterdir()
    return run_dir, seen


def test_warm_up_makes_no_update_then_utd_critic_steps_per_env_step(traced_run):
    run_dir, seen = traced_run
    warmup, online, utd, batch = map(resume_arg, ("--warmup-steps", "--online-steps", "--utd", "--online-batch-size"))
    assert warmup >= batch  # so the warm-up, not the batch size, sets the first update
    # Per env step after the warm-up: utd critic updates on batch / utd rows each, then one actor and
    # temperature update on exactly those rows, all of them.
    steps = [seen[i : i + utd + 1] for i in range(0, len(seen), utd + 1)]
    assert [size for (_, size, _), *_ in steps] == list(range(warmup + 1, online + 1))
    for step in steps:
        assert [kind for kind, _, _ in step] == ["critic"] * utd + ["actor"]
        assert all(rows.shape[0] == batch // utd for _, _, rows in step[:utd])
        assert torch.equal(step[-1][2], torch.cat([rows for _, _, rows in step[:utd]]))
    # The policy the warm-up ran is the pretrained one: the evaluation at the end of the warm-up
    # equals the one at the start of finetuning.
    records = {r["env_steps"]: r for r in read_metrics(run_dir) if r["phase"] == "finetune"}
    same = ("normalized_score", "q_bias", "kendall_tau", "q_std_policy")
    assert all(records[0][k] == records[warmup][k] for k in same) and records[0]["step"] == records[warmup]["step"] == 0
    assert records[online]["normalized_score"] != records[0]["normalized_score"]


def test_the_online_buffer_never_holds_or_samples_a_dataset_row(traced_run, wsrl):
    run_dir, seen = traced_run
    online = load_run_file(run_dir / "checkpoint.pt")["loop"]["online"]["rows"]
    assert len(online) == resume_arg("--online-steps")
    arrays = wsrl.load_dataset("walker2d", "random", resume_arg("--random-dataset-steps"))[0]
    dataset = wsrl.dataset_rows(arrays)
    assert not rows_in(online, dataset).any()
    for _, _, rows in seen:
        assert rows_in(rows, online).all()


def test_adam_states_carry_over_and_every_optimiser_steps_at_every_update(traced_run):
    """Finetuning continues the pretraining's Adam states (the release loads its whole checkpoint),
    and all three optimisers step at each of the pretraining updates and at each of the utd + 1
    online updates per env step."""
    run_dir, _ = traced_run
    pretrain, warmup, online, utd = map(resume_arg, ("--pretrain-steps", "--warmup-steps", "--online-steps", "--utd"))
    steps = {}
    for name, file in (("pretrained", "pretrain.pt"), ("final", "final.pt")):
        agent = load_run_file(run_dir / file)["agent"]
        for optim in ("actor_optim", "critic_optim", "alpha_optim"):
            steps[name, optim] = {int(state["step"]) for state in agent[optim]["state"].values()}
    after = pretrain + (online - warmup) * (utd + 1)
    assert len(steps) == 6 and steps == {
        (name, optim): {pretrain if name == "pretrained" else after} for name, optim in steps
    }
