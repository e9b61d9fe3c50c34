"""algorithms/odt.py: trajectories and hindsight returns-to-go, the pretraining set and the replay's
order (FIFO from the worst), segment sampling, the tanh-Gaussian likelihood and entropy, the loss's
masks, LAMB and the warm-up by hand, the temperature step, the causal mask, the rollout window, and
the online loop's update count and null Q diagnostics in an end-to-end run."""

import copy
import json
import math

import numpy as np
import pytest
import torch

from conftest import (
    RESUME_ARGS,
    assert_main_refuses,
    check_summary,
    finished_run,
    load_run_file,
    load_script,
    read_metrics,
)

odt = load_script("algorithms/odt.py")
CPU = torch.device("cpu")


def flat(rewards, terminals, timeouts, obs_dim=2, act_dim=1):
    n = len(rewards)
    return {
        "observations": np.arange(n * obs_dim, dtype=np.float32).reshape(n, obs_dim),
        "actions": np.linspace(-1, 1, n * act_dim, dtype=np.float32).reshape(n, act_dim),
        "rewards": np.array(rewards, np.float32),
        "terminals": np.array(terminals, np.float32),
        "timeouts": np.array(timeouts, np.float32),
    }


def test_trajectories_end_at_terminations_truncations_and_the_data_end():
    arrays = flat([1, 2, 3, 4, 5, 6], terminals=[0, 1, 0, 0, 0, 0], timeouts=[0, 0, 0, 1, 0, 0])
    trajectories = odt.split_trajectories(arrays)
    assert [t["rewards"].tolist() for t in trajectories] == [[1, 2], [3, 4], [5, 6]]
    assert np.array_equal(trajectories[1]["observations"], arrays["observations"][2:4])
    # the last row ending an episode gives no empty trajectory after it
    assert len(odt.split_trajectories(flat([1, 2], [0, 1], [0, 0]))) == 1


def test_rows_hold_normalised_states_clamped_actions_and_hindsight_returns_to_go():
    mean, std = odt.state_normalisation({"observations": np.array([[0.0, 1.0], [2.0, 1.0]], np.float32)})
    assert mean.tolist() == [1.0, 1.0] and std.tolist() == pytest.approx([1.0 + 1e-6, 1e-6])  # population std
    stats = (np.array([1.0, 2.0], np.float32), np.array([2.0, 4.0], np.float32))
    assert odt.padding_row(stats, 1).tolist() == [-0.5, -0.5, 0.0, 0.0]  # a zero state, normalised
    rows = odt.trajectory_rows([[3, 2], [1, 6], [5, 10]], [[1.0], [0.5], [-1.0]], [1.0, 2.0, 3.0], stats)
    assert torch.allclose(rows[:, :2], torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]))
    assert rows[0, 2].item() == pytest.approx(1 - 1e-6) and rows[2, 2].item() == pytest.approx(-1 + 1e-6)
    assert rows[:, 3].tolist() == [6.0, 5.0, 3.0]  # sums of the rewards received from each step on


def test_pretraining_set_is_ascending_without_the_worst_and_the_replay_replaces_the_worst_first():
    returns = [5.0, -1.0, 9.0, 2.0, 7.0]
    trajectories = [{"rewards": np.array([r], np.float32)} for r in returns]
    ranked = odt.ranked_trajectories(trajectories)
    assert [float(t["rewards"][0]) for t in ranked] == [2.0, 5.0, 7.0, 9.0]  # -1 dropped, as the release
    offline = odt.TrajectoryReplay(100, torch.zeros(1), CPU)
    for t in ranked:
        offline.add(torch.tensor([[float(t["rewards"][0])]]))
    replay = offline.seeded(3)  # finetune()'s replay: the highest returns, ascending
    assert [t.item() for t in replay.trajectories] == [5.0, 7.0, 9.0]
    replay.add(torch.tensor([[100.0]]))
    replay.add(torch.tensor([[200.0]]))
    assert [t.item() for t in replay.trajectories] == [100.0, 200.0, 9.0]  # 5 (the worst), then 7 went
    small = odt.TrajectoryReplay(3, torch.zeros(1), CPU)
    small.add(torch.tensor([[1.0]]))
    small.add(torch.tensor([[2.0]]))
    assert [t.item() for t in small.trajectories] == [1.0, 2.0]  # not full: appended


def test_segments_are_left_padded_runs_of_one_trajectory_drawn_by_length():
    pad = torch.tensor([-7.0, -7.0])
    replay = odt.TrajectoryReplay(10, pad, CPU)
    short = torch.tensor([[1.0, 10.0]])
    long = torch.tensor([[2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])
    replay.add(short)
    replay.add(long)
    torch.manual_seed(0)
    rows, mask = replay.sample(40_000, 2)
    assert torch.equal(mask.bool(), (rows != pad).all(-1))  # padding rows exactly where the mask is 0
    assert torch.equal(mask[:, 1], torch.ones(40_000))  # padding is on the left
    last = rows[:, 1, 0]
    # the segment's last step: the short trajectory's one step (p = 1/4, by length), else the long
    # one's start + 1 (start 0, 1) or its end (start 2, a 1-step segment): 1/4 each
    frequencies = [(last == v).float().mean().item() for v in (1.0, 3.0, 4.0)]
    assert all(abs(f - 0.25) < 0.01 for f in frequencies[:2]) and abs(frequencies[2] - 0.5) < 0.01
    two = mask.sum(1) == 2
    assert torch.equal(rows[two, 0, 0] + 1, rows[two, 1, 0])  # consecutive steps of the long trajectory
    one = mask.sum(1) == 1
    assert set(rows[one, 1, 0].tolist()) == {1.0, 4.0}  # 1-step segments: the short one, or the long one's end


def test_log_likelihood_and_entropy_are_torchs_tanh_gaussian():
    torch.manual_seed(0)
    mu, log_std = torch.randn(4, 3), torch.rand(4, 3) - 1
    action = torch.tensor([0.999, -0.5, 0.0]).expand(4, 3)
    reference = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mu, log_std.exp()), [torch.distributions.TanhTransform(cache_size=1)]
    )
    assert torch.allclose(odt.action_log_likelihood(mu, log_std, action), reference.log_prob(action).sum(-1), atol=1e-4)
    torch.manual_seed(1)
    entropy = odt.sampled_entropy(mu, log_std)
    torch.manual_seed(1)
    sample = reference.rsample()  # the same normal draw, squashed
    assert torch.allclose(entropy, -reference.log_prob(sample).sum(-1), atol=1e-3)


def test_loss_averages_the_likelihood_over_real_steps_and_the_entropy_over_all():
    torch.manual_seed(0)
    mu, log_std = torch.randn(2, 3, 1, requires_grad=True), torch.zeros(2, 3, 1) - 0.5
    actions = torch.rand(2, 3, 1) * 1.8 - 0.9
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    temperature = torch.tensor(0.5, requires_grad=True)
    torch.manual_seed(3)
    loss, nll, entropy = odt.odt_loss(mu, log_std, actions, mask, temperature)
    log_lik = odt.action_log_likelihood(mu, log_std, actions)
    assert nll.item() == pytest.approx(-(log_lik[0, 1] + log_lik[0, 2] + log_lik[1, 2]).item() / 3, rel=1e-6)
    torch.manual_seed(3)
    assert entropy.item() == pytest.approx(odt.sampled_entropy(mu, log_std).sum().item() / 6, rel=1e-6)
    assert loss.item() == pytest.approx(nll.item() - 0.5 * entropy.item(), rel=1e-6)
    changed = actions.clone()
    changed[1, 0] = -0.3  # a padded step's action does not enter the likelihood
    torch.manual_seed(3)
    assert odt.odt_loss(mu, log_std, changed, mask, temperature)[1].item() == pytest.approx(nll.item(), rel=1e-7)
    loss.backward()
    assert temperature.grad is None  # the temperature enters the loss detached


def test_lamb_two_steps_by_hand():
    """Two parameters, one starting at zero (trust ratio 1 while its norm is 0), two steps each."""
    params = [torch.nn.Parameter(torch.tensor([3.0, 4.0])), torch.nn.Parameter(torch.zeros(2))]
    lamb = odt.Lamb(params, lr=0.1, weight_decay=0.01)
    hand = [{"w": p.detach().double().numpy().copy(), "m": np.zeros(2), "v": np.zeros(2)} for p in params]
    for t, g in enumerate([np.array([1.0, -2.0]), np.array([0.5, 0.5])], start=1):
        for p in params:
            p.grad = torch.tensor(g, dtype=torch.float32)
        lamb.step()
        for h, p in zip(hand, params):
            h["m"], h["v"] = 0.9 * h["m"] + 0.1 * g, 0.999 * h["v"] + 0.001 * g**2
            update = (h["m"] / (1 - 0.9**t)) / (np.sqrt(h["v"] / (1 - 0.999**t)) + 1e-8) + 0.01 * h["w"]
            w_norm, u_norm = np.linalg.norm(h["w"]), np.linalg.norm(update)
            ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            h["w"] = h["w"] - 0.1 * ratio * update
            assert np.allclose(p.detach().numpy(), h["w"], rtol=1e-5, atol=1e-7)
    assert params[1].detach().numpy()[0] < 0 < params[1].detach().numpy()[1]  # moved against g_1 = (1, -2)
    # without weight decay there is no trust ratio (the release's lamb.py): bias-corrected Adam
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    w.grad = torch.tensor([1.0, -2.0])
    odt.Lamb([w], lr=0.1, weight_decay=0.0).step()
    assert torch.allclose(w.detach(), torch.tensor([2.9, 4.1]), atol=1e-6)  # m_hat / sqrt(v_hat) = sign(g)


def make_agent(**overrides):
    # reward_scale as resolve_config sets it outside AntMaze
    cfg = odt.Config(
        embed_dim=8, n_layers=1, n_heads=2, context_length=4, dropout=0.0, **{"reward_scale": 0.001} | overrides
    )
    torch.manual_seed(0)
    return odt.ODTAgent(3, 2, cfg, CPU), cfg


def batch(agent, n=5):
    k = agent.cfg.context_length
    rows = torch.cat([torch.randn(n, k, 3), torch.rand(n, k, 2) * 1.8 - 0.9, torch.randn(n, k, 1) * 100], -1)
    return rows, torch.ones(n, k)


def test_update_warms_the_learning_rate_up_across_phases_and_steps_the_temperature():
    agent, cfg = make_agent(warmup_steps=4, lr=1e-3)
    assert odt.warmup_factor(0, 4) == 0.25 and odt.warmup_factor(3, 4) == 1.0 and odt.warmup_factor(9, 4) == 1.0
    rows, mask = batch(agent)
    lrs = []
    for _ in range(5):
        lrs.append(agent.update(rows, mask)["lr"])
        assert agent.actor_optim.param_groups[0]["lr"] == lrs[-1]  # the rate the step used
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    # the step used gradients clipped to norm 0.25 (unclipped, this batch's are far larger)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in agent.actor.parameters()]))
    assert norm.item() == pytest.approx(0.25, rel=1e-4)
    resumed, _ = make_agent(warmup_steps=4, lr=1e-3)
    resumed.load_state_dict(agent.state_dict())  # the count travels in the state (pretrain.pt, checkpoints)
    assert resumed.updates == 5 and resumed.update(rows, mask)["lr"] == pytest.approx(1e-3)
    # Adam's first step moves log T by -lr * sign(T (H - target)): down when the entropy is above target
    fresh, cfg = make_agent()
    before = fresh.log_temperature.item()
    out = fresh.update(rows, mask)
    direction = math.copysign(1.0, out["entropy"].item() - fresh.target_entropy)
    assert fresh.log_temperature.item() == pytest.approx(before - cfg.temperature_lr * direction, abs=1e-6)
    assert fresh.target_entropy == -2 and out["alpha"].item() == pytest.approx(cfg.init_temperature)


def test_actions_see_only_the_past_and_real_steps_never_see_padding():
    agent, cfg = make_agent()
    torch.manual_seed(1)
    rows, mask = batch(agent, n=1)
    mask[0, 0] = 0.0  # the first step is padding
    rtg, obs, act = agent.inputs(rows)
    agent.actor.eval()
    mu = agent.actor(rtg, obs, act, mask)[0]
    future = act.clone()
    future[0, 2:] += 1.0  # the actions of steps 2, 3 (the state token of step 2 precedes its action)
    assert torch.allclose(agent.actor(rtg, obs, future, mask)[0][0, 1:3], mu[0, 1:3], atol=1e-6)  # real steps 1, 2
    assert not torch.allclose(agent.actor(rtg, obs, future, mask)[0][0, 3], mu[0, 3])
    padded = obs.clone()
    padded[0, 0] += 5.0
    assert torch.allclose(agent.actor(rtg, padded, act, mask)[0][0, 1:], mu[0, 1:], atol=1e-5)


def test_padded_queries_attend_as_in_the_release_and_the_log_std_stays_in_range():
    """The release replaces future scores by -1e4 and adds -1e4 at padded keys: a padded step (no
    real key before it) attends to later real steps too, which reaches the entropy term."""
    agent, cfg = make_agent()
    torch.manual_seed(2)
    rows, mask = batch(agent, n=1)
    mask[0, :2] = 0.0
    rtg, obs, act = agent.inputs(rows)
    agent.actor.eval()
    mu, log_std = agent.actor(rtg, obs, act, mask)
    later = obs.clone()
    later[0, 3] += 5.0
    assert not torch.allclose(agent.actor(rtg, later, act, mask)[0][0, 0], mu[0, 0])
    huge = agent.actor(rtg * 1e4, obs * 1e4, act, mask)[1]
    assert log_std.min() >= -5 and huge.min() >= -5 and huge.max() <= 2 and (huge.max() - huge.min()) > 1


def test_exploration_samples_and_evaluation_is_deterministic(datasets_root):
    agent, cfg = make_agent()
    torch.manual_seed(0)
    rows, mask = batch(agent, n=1)
    rtg, obs, act = agent.inputs(rows)
    mu = agent.actor(rtg, obs, act, mask)[0][:, -1]
    assert torch.allclose(agent.act(rtg, obs, act, mask, deterministic=True), torch.tanh(mu), atol=1e-6)
    samples = torch.stack([agent.act(rtg, obs, act, mask, deterministic=False) for _ in range(20)])
    assert samples.std(0).min() > 1e-3
    envs = [odt.make_env("hopper") for _ in range(2)]
    cfg = odt.resolve_config(
        odt.Config(env="hopper-random", embed_dim=8, n_layers=1, n_heads=2, context_length=4, eval_context_length=2)
    )
    agent = odt.ODTAgent(11, 3, cfg, CPU)  # dropout 0.1: evaluation turns it off
    evaluate = odt.Evaluator("hopper", envs, cfg, CPU, (np.zeros(11, np.float32), np.ones(11, np.float32)))
    torch.manual_seed(1)
    first = evaluate(agent)
    torch.manual_seed(2)
    assert evaluate(agent) == first
    assert 1 <= first["episode_length"] <= 1000 and first["episode_length"] * 2 == int(first["episode_length"] * 2)


def test_rollout_window_keeps_the_last_steps_and_the_return_to_go_left():
    cfg = odt.Config(context_length=4, eval_context_length=2, reward_scale=0.01)
    stats = (np.zeros(1, np.float32), np.full(1, 2.0, np.float32))
    window = odt.Window(2, 1, 1, cfg, stats, target=100.0, device=CPU)
    window.observe(np.array([[2.0], [4.0]]))
    rtg, obs, act, mask = window.inputs([0, 1])
    assert mask.tolist() == [[0, 0, 0, 1]] * 2 and rtg[:, -1, 0].tolist() == pytest.approx([1.0, 1.0])
    window.record([0, 1], np.array([[0.5], [-0.5]]), np.array([10.0, 30.0]))
    window.observe(np.array([[6.0], [8.0]]))
    window.record([1], np.array([[0.25]]), np.array([20.0]))  # env 0 has ended
    window.observe(np.array([[6.0], [10.0]]))
    rtg, obs, act, mask = window.inputs([1])
    assert mask.tolist() == [[0, 0, 1, 1]]
    assert obs[0, :, 0].tolist() == [0.0, 0.0, 4.0, 5.0]  # the last two states, normalised
    assert act[0, :, 0].tolist() == [0.0, 0.0, 0.25, 0.0]  # the current step's action is not known yet
    assert rtg[0, :, 0].tolist() == pytest.approx([0.0, 0.0, 0.7, 0.5])  # (100 - 30) / 100, (100 - 50) / 100


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, datasets_root):
    return finished_run("algorithms/odt.py", RESUME_ARGS["odt"], tmp_path_factory.mktemp("runs"), datasets_root)


def test_end_to_end_updates_per_episode_and_no_q_diagnostics(tiny_run):
    run_dir, result = tiny_run
    records = read_metrics(run_dir)
    check_summary(run_dir, records)
    assert "ODT has no Q function" in result.stderr
    assert all(r[k] is None for r in records for k in odt.NO_Q)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_q_bias"] is None and summary["final_kendall_tau"] is None
    online = [r for r in records if r["phase"] == "finetune"]
    assert [r["env_steps"] for r in online] == list(range(0, 301, 60))
    checkpoint = load_run_file(run_dir / "checkpoint.pt")
    loop, seeded = checkpoint["loop"], 84  # walker2d-random, 1,500 steps: 85 trajectories, the worst dropped
    added = loop["replay"]["trajectories"][seeded:]
    # every finished online episode brought 10 updates; the one that reached the budget brought none
    assert len(added) >= 2 and loop["updates"] == 10 * len(added) and loop["owed"] == 0
    assert sum(len(t) for t in added) < 300 and checkpoint["agent"]["updates"] == 300 + loop["updates"]
    assert online[-1]["step"] == loop["updates"]


def test_deepcopy_of_the_agent_leaves_it_alone():
    """time_phases() times updates on a copy: the run's agent must not move."""
    agent, _ = make_agent()
    before = copy.deepcopy(agent.state_dict())
    clone = copy.deepcopy(agent)
    clone.update(*batch(clone))
    after = agent.state_dict()
    assert torch.equal(before["log_temperature"], after["log_temperature"]) and after["updates"] == 0
    assert all(torch.equal(before["actor"][k], after["actor"][k]) for k in before["actor"])


@pytest.mark.parametrize("path", sorted((odt.REPO_ROOT / "configs" / "odt").glob("*.yaml")), ids=lambda p: p.name)
def test_every_odt_config_resolves(path):
    cfg, _ = odt.parse_args(["--config", str(path)])
    cfg = odt.resolve_config(cfg)
    base = cfg.env.partition("-")[0]
    assert path.stem in (base, "locomotion") and (cfg.eval_rtg, cfg.online_rtg) == odt.RTG_TARGETS[base]


def test_env_without_published_targets_needs_both_flags(tmp_path, capsys):
    argv = ["--env", "ant-random", "--out-dir", str(tmp_path / "runs")]
    assert_main_refuses(odt, argv, capsys, "ODT has no published return-to-go targets for ant; pass --eval-rtg")
    assert not (tmp_path / "runs").exists()
    cfg = odt.resolve_config(odt.Config(env="ant-random", eval_rtg=1.0, online_rtg=2.0))
    assert (cfg.eval_rtg, cfg.online_rtg) == (1.0, 2.0)
