"""AntMaze in algorithms/cal_ql.py, on a tiny local dataset in the layout of Minari's
D4RL/antmaze/umaze-v1 (dict observations with the goal, sparse reward, continuing episodes, an
evaluation spec with Minari's mirrored umaze map): the evaluation env is D4RL's (training walls,
fixed reset and goal, the episode ends at the goal), a dataset step with reward 1 is a terminal,
the released reward transform, and a tiny end-to-end run scored as a success rate."""

import copy

import gymnasium as gym
import minari
import numpy as np
import pytest
from minari.data_collector import EpisodeBuffer

from conftest import TINY, finished_run, read_metrics

# Minari's umaze training map and its evaluation map (mirrored walls: Minari issue #304).
TRAIN_MAP = [[1, 1, 1, 1, 1], [1, "g", 0, 0, 1], [1, 1, 1, 0, 1], [1, "r", 0, 0, 1], [1, 1, 1, 1, 1]]
MINARI_EVAL_MAP = [[1, 1, 1, 1, 1], [1, 0, 0, "r", 1], [1, 0, 1, 1, 1], [1, 0, 0, "g", 1], [1, 1, 1, 1, 1]]


@pytest.fixture(scope="session")
def antmaze_umaze(datasets_root):
    """local/antmaze/umaze-v0: 6 episodes of 60 random-action steps recorded as Minari records its
    AntMaze sets (continuing_task=True, reset_target=False); half start in the goal cell, so some
    steps reach the goal and earn reward 1."""
    import gymnasium_robotics

    gym.register_envs(gymnasium_robotics)
    env = gym.make("AntMaze_UMaze-v4", maze_map=TRAIN_MAP, continuing_task=True, reset_target=False)
    eval_spec = copy.deepcopy(env.spec)
    eval_spec.kwargs["maze_map"] = MINARI_EVAL_MAP
    rng, episodes = np.random.default_rng(0), []
    for i in range(6):
        options = {"reset_cell": np.array([1, 1]), "goal_cell": np.array([1, 1])} if i % 2 == 0 else None
        obs, _ = env.reset(seed=i, options=options)
        steps = [(obs, None, None)]
        for _ in range(60):
            action = rng.uniform(-1, 1, 8).astype(np.float32)
            obs, reward, *_ = env.step(action)
            steps.append((obs, action, reward))
        episodes.append(
            EpisodeBuffer(
                id=i,
                observations={k: np.stack([o[k] for o, _, _ in steps]) for k in obs},
                actions=np.stack([a for _, a, _ in steps[1:]]),
                rewards=np.array([r for _, _, r in steps[1:]]),
                terminations=np.zeros(60, dtype=bool),
                truncations=np.arange(60) == 59,
            )
        )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(datasets_root))
        minari.create_dataset_from_buffers(
            "local/antmaze/umaze-v0",
            episodes,
            env=env,
            eval_env=eval_spec,
            algorithm_name="random actions",
            author="tests",
            author_email="n/a",
            code_permalink="tests/test_antmaze.py",
            description="a tiny set in the layout of Minari's D4RL/antmaze/umaze-v1",
        )
    rewards = np.concatenate([e.rewards for e in episodes])
    assert 0 < rewards.sum() < len(rewards)  # the set has goal steps and others
    return "local/antmaze/umaze-v0"


def test_evaluation_env_is_d4rls_umaze_and_ends_at_the_goal(cal_ql, antmaze_umaze):
    env = cal_ql.make_env("antmaze", antmaze_umaze)
    maze = env.unwrapped.spec.kwargs
    assert maze["maze_map"] == cal_ql.UMAZE_EVAL and not maze["continuing_task"]
    walls = [[cell == 1 for cell in row] for row in TRAIN_MAP]
    assert [[cell == 1 for cell in row] for row in maze["maze_map"]] == walls  # not Minari's mirrored map
    env.reset(seed=0)
    ant = env.unwrapped
    assert np.linalg.norm(ant.goal - ant.data.qpos[:2]) > 0.45
    ant.data.qpos[:2] = ant.goal  # put the ant on the goal
    _, reward, terminated, truncated, info = env.step(np.zeros(8, dtype=np.float32))
    assert (reward, terminated, truncated, info["success"]) == (1.0, True, False, True)


def test_goal_steps_are_terminals(cal_ql, antmaze_umaze):
    arrays, dataset_id = cal_ql.load_dataset("antmaze", "umaze", 1_000_000)
    goal = arrays["rewards"] > 0
    assert dataset_id == antmaze_umaze and goal.any() and not goal.all()
    assert np.array_equal(arrays["terminals"] > 0, goal)
    assert not (arrays["timeouts"][goal] > 0).any() and arrays["observations"].shape[1] == 2 + 2 + 27


def test_released_reward_transform_and_return_to_go(cal_ql):
    """configs/cal_ql/antmaze.yaml: r x 10 - 5 (nakamotoo/Cal-QL scripts/run_antmaze.sh,
    replay_buffer.py); the return-to-go of [0, 0, 1 (goal, terminal)] by hand."""
    cfg = cal_ql.parse_args(["--config", "configs/cal_ql/antmaze.yaml"])[0]
    arrays = {
        "observations": np.zeros((3, 2), np.float32),
        "actions": np.zeros((3, 1), np.float32),
        "rewards": np.array([0.0, 0.0, 1.0], np.float32),
        "next_observations": np.zeros((3, 2), np.float32),
        "terminals": np.array([0.0, 0.0, 1.0], np.float32),
        "timeouts": np.zeros(3, np.float32),
    }
    rows = cal_ql.transition_rows(arrays, cfg).numpy()
    g2 = 5.0
    g1 = -5.0 + 0.99 * g2
    assert rows[:, 2 + 1] == pytest.approx([-5.0, -5.0, 5.0])
    assert rows[:, -1] == pytest.approx([-5.0 + 0.99 * g1, g1, g2], abs=1e-5)


def test_cal_ql_end_to_end_scores_the_success_rate(antmaze_umaze, tmp_path, datasets_root):
    args = list(TINY["cal_ql"])
    args[args.index("--env") + 1] = "antmaze-umaze"
    args += ["--config", "configs/cal_ql/antmaze.yaml", "--eval-episodes", "2", "--mc-tail-steps", "5"]
    run_dir, _ = finished_run("algorithms/cal_ql.py", args, tmp_path, datasets_root)
    records = read_metrics(run_dir)
    assert records
    for r in records:  # a return is 0 or 1 per episode: the score is 100 x the success rate
        assert 0.0 <= r["return"] <= 1.0 and r["normalized_score"] == pytest.approx(100 * r["return"])
