"""algorithms/iql.py: the IQL rule on hand-checkable inputs (expectile loss, clipped advantage
weights, the cosine schedule, the reward scale), the released update order, the two traps of the
released finetuning code and of CORL's port (online rewards unscaled, online learning rate ~0), and
end-to-end runs (IQL + SERA with a mixing ratio; uniform sampling from --pretrained)."""

import copy
import math

import gymnasium as gym
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

iql = load_script("algorithms/iql.py")


def test_expectile_loss_by_hand():
    # diff = Q - V: +2 weighs 0.7, -1 weighs 0.3: (0.7 * 4 + 0.3 * 1) / 2
    assert math.isclose(float(iql.expectile_loss(torch.tensor([2.0, -1.0]), 0.7)), 1.55, rel_tol=1e-6)
    # expectile 0.5 is half the mean squared error
    assert math.isclose(float(iql.expectile_loss(torch.tensor([2.0, -1.0]), 0.5)), 1.25, rel_tol=1e-6)


def test_advantage_weights_are_clipped():
    weights = iql.advantage_weights(torch.tensor([0.0, 0.1, 10.0]), torch.zeros(3), 3.0, 100.0)
    assert torch.allclose(weights, torch.tensor([1.0, math.exp(0.3), 100.0]))  # exp(30) -> 100


def test_cosine_schedule_of_the_offline_policy_learning_rate():
    assert iql.cosine_lr(3e-4, 1, 1000) == 3e-4  # optax counts from 0
    assert math.isclose(iql.cosine_lr(3e-4, 501, 1000), 1.5e-4)
    assert iql.cosine_lr(3e-4, 1001, 1000) < 1e-20


def test_reward_transform_is_the_released_rule():
    """(scale, bias): 1000 / episode return range for halfcheetah, hopper, walker2d; AntMaze
    reward - 1 (train_finetune.py); others raw."""
    arrays = {
        "rewards": np.array([1.0, 2.0, 5.0, -1.0], dtype=np.float32),
        "terminals": np.array([0, 1, 0, 0], dtype=np.float32),  # episode 1 ends by termination
        "timeouts": np.array([0, 0, 1, 0], dtype=np.float32),  # episode 2 by a time limit; 3 is cut
    }
    scale, bias = iql.reward_transform(arrays, "hopper", None)
    assert math.isclose(scale, 1000.0 / (5.0 - (-1.0))) and bias == 0.0
    assert iql.reward_transform(arrays, "hopper", False) == (1.0, 0.0)
    # the released rule scales halfcheetah, hopper and walker2d only
    assert iql.reward_transform(arrays, "ant", None) == iql.reward_transform(arrays, "pen", None) == (1.0, 0.0)
    assert math.isclose(iql.reward_transform(arrays, "ant", True)[0], 1000.0 / 6.0)
    assert iql.reward_transform(arrays, "antmaze", None) == (1.0, -1.0)
    with pytest.raises(iql.ConfigError, match="--scale-rewards False"):
        iql.reward_transform({**arrays, "rewards": np.array([1, 0, 1, 1], dtype=np.float32)}, "hopper", None)


def test_q_diagnostics_compare_q_with_returns_of_the_rewards_the_critic_learns():
    """A critic that predicts the discounted return of reward * scale + bias exactly has no bias
    (the shared Evaluator; iql.py and cal_ql.py train on transformed rewards)."""
    cfg = iql.Config(gamma=0.5, kendall_windows=1)
    evaluator = iql.Evaluator("hopper", [], cfg, torch.device("cpu"), reward_scale=2.0, reward_bias=-1.0)
    episode = {"obs": [np.zeros(3)] * 3, "act": [np.zeros(2)] * 3, "rew": [1.0, 3.0, 2.0], "terminated": True}
    # transformed rewards 1, 5, 3: returns 1 + 0.5 (5 + 0.5 * 3) = 4.25, 5 + 1.5 = 6.5, 3
    true = torch.tensor([4.25, 6.5, 3.0])
    critic = lambda obs, act: true.expand(2, -1)  # noqa: E731
    out = evaluator.q_diagnostics(type("Agent", (), {"critic": staticmethod(critic)}), [episode])
    assert abs(out["q_bias"]) < 1e-6 and abs(out["q_bias_min"]) < 1e-6 and math.isclose(out["q_true"], 13.75 / 3)
    assert out["kendall_tau"] == 1.0


def test_update_order_value_then_policy_then_critics():
    """The policy weights use the V just updated, and the critics regress on that V at s'."""
    cfg = iql.Config(hidden_dims=(8,), batch_size=4)
    torch.manual_seed(0)
    agent = iql.IQLAgent(3, 2, cfg, torch.device("cpu"))
    split = iql.ReplayBuffer(1, 3, 2, torch.device("cpu")).split
    rows = torch.rand(4, 10) * 2 - 1
    rows[:, 9] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    obs, act, rew, next_obs, done = split(rows)
    expected = copy.deepcopy(agent)
    q = expected.target_critic(obs, act).min(0).values.detach()
    value_loss = iql.expectile_loss(q - expected.value(obs), cfg.expectile)
    expected.value_optim.zero_grad()
    value_loss.backward()
    expected.value_optim.step()
    with torch.no_grad():
        new_v, new_next_v = expected.value(obs), expected.value(next_obs)
    out = agent.update(rows, split)
    assert torch.allclose(out["adv_weight"], iql.advantage_weights(q, new_v, cfg.temperature, 100.0).mean())
    assert torch.allclose(out["value_loss"], value_loss.detach())
    y = rew + cfg.gamma * (1 - done) * new_next_v
    before = copy.deepcopy(expected.critic)
    assert torch.allclose(out["critic_loss"], (before(obs, act) - y).pow(2).mean(1).sum().detach())


@pytest.fixture(scope="module")
def sera_run(tmp_path_factory, datasets_root):
    """IQL + SERA (mixing ratio 0.5) with the resume tests' tiny budget."""
    return finished_run("algorithms/iql.py", RESUME_ARGS["iql"], tmp_path_factory.mktemp("runs"), datasets_root)[0]


def test_end_to_end_with_sera_and_a_non_zero_online_learning_rate(sera_run):
    records = read_metrics(sera_run)
    check_summary(sera_run, records)
    pretrain = [r for r in records if r["phase"] == "pretrain"]
    online = [r for r in records if r["phase"] == "finetune"]
    assert [r["step"] for r in pretrain] == [100, 200, 300]
    # the cosine decay ends near 0 offline; online the policy learns at actor_lr (CORL's trap: ~0)
    assert pretrain[-1]["actor_lr"] < 1e-7 < pretrain[0]["actor_lr"]
    assert all(r["actor_lr"] == 3e-4 for r in online[1:])
    # mixing 0.5 of 32: updates begin once 16 online rows exist, one per env step
    assert [(r["env_steps"], r["step"]) for r in online] == [(e, max(e - 15, 0)) for e in range(0, 301, 60)]
    assert all(r["sera_reward"] is not None for r in online[1:])


def test_online_rewards_are_scaled_exactly_as_the_datasets(sera_run):
    """Replaying the stored online actions in a fresh env from the run's seed gives the env's raw
    rewards; each stored reward is that reward times the dataset's scale (the released finetuning
    code stores them unscaled)."""
    checkpoint = load_run_file(sera_run / "checkpoint.pt")
    cfg = iql.Config(**checkpoint["config"])
    arrays, _ = iql.load_dataset("walker2d", "random", cfg.random_dataset_steps)
    scale, _ = iql.reward_transform(arrays, "walker2d", None)
    assert scale > 1.5  # a scale that a missing multiplication would show
    obs_, act, rew, _, done = iql.ReplayBuffer(1, 17, 6, torch.device("cpu")).split(
        checkpoint["loop"]["online"]["rows"]
    )
    env = gym.make("Walker2d-v5")
    env.reset(seed=cfg.seed)
    for k in range(len(rew)):
        _, reward, terminated, truncated, _ = env.step(act[k].numpy())
        assert float(done[k]) == float(terminated)
        assert rew[k].item() == np.float32(reward * scale), k
        if terminated or truncated:
            env.reset()


def test_uniform_sampling_from_the_pretraining(sera_run, tmp_path, datasets_root):
    args = [a for a in RESUME_ARGS["iql"] if a not in ("--sera", "--sera-k", "3", "--mixing-ratio", "0.5")]
    args += ["--pretrained", str(sera_run / "pretrain.pt"), "--online-steps", "60"]
    run_dir, result = finished_run("algorithms/iql.py", args, tmp_path, datasets_root)
    assert "finetune from step 0" in result.stderr
    records = read_metrics(run_dir)
    first = next(r for r in read_metrics(sera_run) if r["phase"] == "finetune")
    assert records[0]["return"] == first["return"]  # the pretrained policy
    assert [(r["env_steps"], r["step"]) for r in records] == [(0, 0), (60, 60)]  # an update per env step


def test_sample_union_draws_dataset_and_online_rows_in_proportion():
    cpu = torch.device("cpu")
    dataset, online = iql.ReplayBuffer(300, 1, 1, cpu), iql.ReplayBuffer(100, 1, 1, cpu)
    dataset.extend(torch.zeros(300, 5))
    online.extend(torch.ones(100, 5))
    torch.manual_seed(0)
    batch = iql.sample_union(dataset, online, 20_000)
    assert set(batch[:, 0].tolist()) == {0.0, 1.0}
    assert abs(batch[:, 0].mean().item() - 0.25) < 0.01  # 100 of 400 rows are online
    empty = iql.ReplayBuffer(10, 1, 1, cpu)
    assert iql.sample_union(dataset, empty, 50).sum() == 0  # before the first online step


def test_pretraining_of_another_dataset_is_refused(sera_run, tmp_path, capsys, datasets_root):
    """Its critic learned another reward scale; one line, before any training."""
    iql.load_dataset("walker2d", "random", 1000)  # the other dataset exists (made once)
    capsys.readouterr()
    args = [*RESUME_ARGS["iql"], "--random-dataset-steps", "1000", "--pretrained", str(sera_run / "pretrain.pt")]
    assert_main_refuses(iql, [*args, "--out-dir", str(tmp_path)], capsys, "its values would not fit this reward scale")
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_resume_inside_pretraining_keeps_the_cosine_schedule_length(sera_run, tmp_path, capsys):
    checkpoint = load_run_file(sera_run / "checkpoint.pt")
    checkpoint.update(phase="pretrain", step=100)  # as if stopped at step 100 of 300
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    assert_main_refuses(
        iql, ["--resume", str(tmp_path), "--pretrain-steps", "400"], capsys, "pretrain_steps cannot change"
    )


def test_evaluation_records_the_mean_episode_length():
    """The shared Evaluator's episode_length is the mean number of steps of its episodes: a hopper
    whose zero action lets it fall ends early, and each episode's length equals a rollout done by hand."""
    cfg = iql.Config(hidden_dims=(8,), kendall_windows=1, mc_tail_steps=0)
    envs = [iql.make_env("hopper") for _ in range(2)]
    zero = lambda obs, deterministic: (torch.zeros(len(obs), 3),)  # noqa: E731
    agent = type(
        "Agent", (), {"actor": staticmethod(zero), "critic": staticmethod(lambda o, a: torch.zeros(2, len(o)))}
    )
    result = iql.Evaluator("hopper", envs, cfg, torch.device("cpu"))(agent)
    lengths = []
    for seed in (cfg.seed * 1000 + 500, cfg.seed * 1000 + 501):  # the evaluator's fixed start states
        env, steps, done = iql.make_env("hopper"), 0, False
        env.reset(seed=seed)
        while not done:
            _, _, terminated, truncated, _ = env.step(np.zeros(3))
            steps, done = steps + 1, terminated or truncated
        lengths.append(steps)
    assert result["episode_length"] == np.mean(lengths) and 0 < result["episode_length"] < 1000
