"""Adroit pen and door (gymnasium-robotics) as D4RL defines them: pen's 100-step episodes and its
end when the pen drops, door's reward, D4RL's reference scores; every offline-to-online file end to
end on locally made pen and door random sets; exact resume of a pen episode after kill -9."""

import gymnasium as gym
import numpy as np
import pytest

from conftest import (
    REPO,
    RESUME_ARGS,
    TINY,
    check_summary,
    finished_run,
    kill_and_resume,
    load_script,
    read_metrics,
    same_run,
    tiny_args,
)

# D4RL's reference returns (random, expert): d4rl/infos.py, pen-human-v0 and door-human-v0.
D4RL_REFERENCES = {"pen": (96.262799, 3076.833), "door": (-56.512833, 2880.569)}


def test_normalized_score_uses_d4rl_adroit_constants(so2):
    assert so2.normalized_score("pen", list(D4RL_REFERENCES["pen"])) == pytest.approx([0.0, 100.0])
    # door: (1412.0280835 - (-56.512833)) / (2880.569 - (-56.512833)) = 50%
    assert so2.normalized_score("door", 1412.0280835) == pytest.approx(50.0)


def test_pen_ends_after_100_steps_or_when_the_pen_drops(so2):
    """D4RL's pen (mj_envs pen_v0): 100 steps, done when the pen's height is below 0.075; the
    gymnasium-robotics env alone runs 200 steps and never terminates."""
    env, rng = so2.make_env("pen"), np.random.default_rng(0)
    ends = []
    for seed in range(4):
        env.reset(seed=seed)
        heights, steps, terminated, truncated = [], 0, False, False
        while not (terminated or truncated):
            _, reward, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 24))
            heights.append(env.unwrapped.data.xpos[env.unwrapped.obj_body_id][2])
            steps += 1
        assert terminated == (heights[-1] < 0.075) and not any(h < 0.075 for h in heights[:-1])
        assert truncated == (steps == 100 and not terminated) and steps <= 100
        ends.append(terminated)
    assert any(ends) and not all(ends)  # both ends happen with random actions (seeds 0-3)
    assert gym.make("AdroitHandPen-v1").spec.max_episode_steps == 200


def test_door_reward_is_d4rls(so2):
    """mj_envs door_v0: -0.1 |palm - handle| - 0.1 (angle - 1.57)^2 - 1e-5 |qvel|^2 + 2 [angle > 0.2]
    + 8 [angle > 1.0] + 10 [angle > 1.35]; gymnasium-robotics 1.4.2 adds the first term instead."""
    env, raw = so2.make_env("door"), gym.make("AdroitHandDoor-v1")
    env.reset(seed=3), raw.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(20):
        action = rng.uniform(-1, 1, 28)
        reward, raw_reward = env.step(action)[1], raw.step(action)[1]
        u = env.unwrapped
        distance = np.linalg.norm(u.data.site_xpos[u.grasp_site_id] - u.data.site_xpos[u.handle_site_id])
        angle = u.data.qpos[u.door_hinge_addrs]
        bonus = 2 * (angle > 0.2) + 8 * (angle > 1.0) + 10 * (angle > 1.35)
        expected = -0.1 * distance - 0.1 * (angle - 1.57) ** 2 - 1e-5 * np.sum(u.data.qvel**2) + bonus
        assert reward == pytest.approx(expected, abs=1e-12)
        assert raw_reward - reward == pytest.approx(0.2 * distance, abs=1e-12) and distance > 0.01


END_TO_END = [(name, env) for env in ("pen", "door") for name in TINY]


@pytest.mark.parametrize("name,env", END_TO_END, ids=lambda x: x)
def test_end_to_end(name, env, tmp_path, datasets_root):
    """A tiny run of an algorithm file on pen or door (the offline-to-online files on the locally
    made <env>-random set): it finishes, and its evaluations are normalised with D4RL's constants."""
    run_dir, _ = finished_run(f"algorithms/{name}.py", tiny_args(name, f"{env}-random"), tmp_path, datasets_root)
    records = read_metrics(run_dir)
    assert records
    if name not in ("sac", "rlpd"):  # the two files without a pretraining
        check_summary(run_dir, records)
    low, high = D4RL_REFERENCES[env]
    for r in records:
        assert r["normalized_score"] == pytest.approx(100 * (r["return"] - low) / (high - low), rel=1e-6)


def test_pen_kill_9_mid_episode_then_resume_equals_uninterrupted(tmp_path, datasets_root):
    """so2.py on pen-random, killed twice in finetuning (inside a 100-step pen episode whose goal
    pose was drawn at its reset) and resumed: the same metrics.jsonl and networks as a run without
    kills."""
    args = [a.replace("walker2d-random", "pen-random") for a in RESUME_ARGS["so2"]]
    args[args.index("--pretrain-steps") + 1] = "100"
    reference, _ = finished_run("algorithms/so2.py", args, tmp_path / "reference", datasets_root)
    run_dir = kill_and_resume("algorithms/so2.py", args, tmp_path / "killed", datasets_root, {"finetune": 2}, seed=7)
    same_run(reference, run_dir)


@pytest.mark.parametrize("env_name", ["pen", "door"])
def test_env_state_restores_an_adroit_episode_bit_for_bit(so2, env_name):
    """A checkpointed episode restored into a fresh env that was reset to another goal continues
    with the same float64 observations and rewards: the goal pose in the model, and pen's lengths
    computed at its reset, are part of the state."""
    rng = np.random.default_rng(0)
    env, fresh = so2.make_env(env_name), so2.make_env(env_name)
    env.reset(seed=1), fresh.reset(seed=2)
    for _ in range(10):
        env.step(rng.uniform(-1, 1, env.action_space.shape))
    so2.restore_env_state(fresh, so2.env_state(env))
    for _ in range(10):
        action = rng.uniform(-1, 1, env.action_space.shape)
        (obs, reward, *_), (obs_fresh, reward_fresh, *_) = env.step(action), fresh.step(action)
        assert np.array_equal(obs, obs_fresh) and reward == reward_fresh


@pytest.mark.parametrize("path", sorted((REPO / "algorithms").glob("*.py")), ids=lambda p: p.stem)
def test_every_file_makes_d4rls_adroit(path):
    """make_env of every algorithm file (cal_ql.py has its own, above its banner) gives pen and door
    with D4RL's episode ends and reward, and pen with 100 steps."""
    algo = load_script(f"algorithms/{path.name}")
    make = (lambda base: algo.make_env(base, "")) if path.stem == "cal_ql" else algo.make_env
    pen, door = make("pen"), make("door")
    assert isinstance(pen, algo.D4RLAdroit) and isinstance(door, algo.D4RLAdroit)
    assert (pen.spec.max_episode_steps, door.spec.max_episode_steps) == (100, 200)
