"""AntMaze in every offline-to-online file (the shared block, each release's reward), on a tiny
local dataset in the layout of Minari's D4RL/antmaze/umaze-v1 (dict observations with the goal,
sparse reward, continuing episodes, an evaluation spec with Minari's mirrored umaze map): the
evaluation env is D4RL's (training walls, fixed reset and goal, the episode ends at the goal), a
dataset step with reward 1 is a terminal, the released reward transforms, and tiny end-to-end runs
scored as a success rate."""

import numpy as np
import pytest

from conftest import (
    TINY,
    TRAIN_MAP,
    assert_one_line_error,
    finished_run,
    load_run_file,
    load_script,
    read_metrics,
    run_script,
    tiny_args,
)


def test_evaluation_env_is_d4rls_umaze_and_ends_at_the_goal(cal_ql, antmaze_umaze):
    """The umaze evaluation: the training walls (not Minari's mirrored eval map), the goal in the
    training map's goal cell and the start in its reset cell, and the episode ends at the goal."""
    env = cal_ql.make_env("antmaze", antmaze_umaze)
    maze = env.unwrapped.spec.kwargs
    assert not maze["continuing_task"]
    walls = [[cell == 1 for cell in row] for row in TRAIN_MAP]
    assert [[cell == 1 for cell in row] for row in maze["maze_map"]] == walls  # not Minari's mirrored map
    env.reset(seed=0)
    ant = env.unwrapped
    cell = ant.maze.cell_rowcol_to_xy
    assert np.linalg.norm(ant.goal - cell(np.array([1, 1]))) < 1.5  # TRAIN_MAP's g; its r is 8 away
    assert np.linalg.norm(ant.data.qpos[:2] - cell(np.array([3, 1]))) < 1.5
    ant.data.qpos[:2] = ant.goal  # put the ant on the goal
    _, reward, terminated, truncated, info = env.step(np.zeros(8, dtype=np.float32))
    assert (reward, terminated, truncated, info["success"]) == (1.0, True, False, True)


def test_env_state_restores_an_antmaze_episode_and_its_goal(cal_ql, antmaze_umaze):
    """A checkpointed AntMaze episode restored into a fresh env reset to another goal goes on with
    the same observations, and the next reset draws the same goal and start."""
    rng = np.random.default_rng(0)
    env, fresh = cal_ql.make_env("antmaze", antmaze_umaze), cal_ql.make_env("antmaze", antmaze_umaze)
    env.reset(seed=1), fresh.reset(seed=2)
    for _ in range(10):
        env.step(rng.uniform(-1, 1, 8))
    cal_ql.restore_env_state(fresh, cal_ql.env_state(env))
    for _ in range(10):
        action = rng.uniform(-1, 1, 8)
        assert np.array_equal(env.step(action)[0], fresh.step(action)[0])
    assert np.array_equal(env.reset()[0], fresh.reset()[0])


def test_goal_steps_are_terminals(cal_ql, antmaze_umaze):
    arrays, dataset_id = cal_ql.load_dataset("antmaze", "umaze", 1_000_000)
    goal = arrays["rewards"] > 0
    assert dataset_id == antmaze_umaze and goal.any() and not goal.all()
    assert np.array_equal(arrays["terminals"] > 0, goal)
    # sorted keys: achieved_goal, desired_goal, observation; a goal step ends within 0.45 of the goal
    distance = np.linalg.norm(arrays["next_observations"][:, 0:2] - arrays["next_observations"][:, 2:4], axis=1)
    assert np.array_equal(distance <= 0.45, goal)
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


# The releases' AntMaze reward transforms, (scale, bias) of reward * scale + bias: RLPD's
# train_finetuning.py, PEX's util.py / main_online.py and CORL's finetune/awac.py subtract 1;
# WSRL's antmaze launch scripts use 10 and -5.
RULES = {"rlpd": (1.0, -1.0), "pex": (1.0, -1.0), "awac": (1.0, -1.0), "wsrl": (10.0, -5.0)}
STORED = {**RULES, "iql": (1.0, -1.0)}  # iql.py's rule is reward_transform (test_iql.py)
OBS, ACT = 2 + 2 + 27, 8


@pytest.mark.parametrize("name", list(RULES))
def test_reward_rule_is_the_releases(name):
    algo = load_script(f"algorithms/{name}.py")
    assert algo.reward_rule("antmaze") == RULES[name] and algo.reward_rule("hopper") == (1.0, 0.0)


@pytest.mark.parametrize("name", [name for name in TINY if name != "sac"])
def test_every_file_end_to_end_scores_the_success_rate(name, antmaze_umaze, tmp_path, datasets_root):
    """A tiny run of every offline-to-online file on the local umaze set (cal_ql.py and iql.py with
    their AntMaze configs): it finishes, and each evaluation's return is a success rate."""
    args = tiny_args(name, "antmaze-umaze")
    if name in ("cal_ql", "iql"):
        args = ["--config", f"configs/{name}/antmaze.yaml", *args]
    run_dir, _ = finished_run(f"algorithms/{name}.py", [*args, "--eval-episodes", "2"], tmp_path, datasets_root)
    if name in STORED:  # the online rows hold the release's transform of the 0/1 rewards
        scale, bias = STORED[name]
        online = load_run_file(run_dir / "checkpoint.pt")["loop"]["online"]
        rewards = online["rows"][:, OBS + ACT]  # rows [obs | action | reward | next_obs | done]
        assert bias in set(rewards.tolist()) <= {bias, scale + bias}  # a failed step stores the bias
    records = read_metrics(run_dir)
    assert records
    for r in records:  # a return is 0 or 1 per episode: the score is 100 x the success rate
        assert 0.0 <= r["return"] <= 1.0 and r["normalized_score"] == pytest.approx(100 * r["return"])


def test_so2_without_published_antmaze_values_is_a_one_line_error(antmaze_umaze, tmp_path, datasets_root):
    args = [*TINY["so2"], "--out-dir", str(tmp_path / "runs")]  # TINY's so2 flags: no --eta
    args[args.index("--env") + 1] = "antmaze-umaze"
    assert_one_line_error(run_script("algorithms/so2.py", args, datasets_root), "pass --num-critics and --eta")


def test_odt_reward_scale_is_the_releases_per_domain():
    """online-dt's main.py: reward_scale = 1.0 if "antmaze" in the env name else 0.001; a flag wins."""
    odt = load_script("algorithms/odt.py")

    def scale(*argv):
        return odt.resolve_config(odt.parse_args([*argv, "--eval-rtg", "1", "--online-rtg", "2"])[0]).reward_scale

    assert scale("--env", "antmaze-umaze") == 1.0
    assert scale("--env", "hopper-medium") == 0.001
    assert scale("--env", "antmaze-umaze", "--reward-scale", "0.5") == 0.5


def test_umaze_random_is_made_offline_by_a_run(tmp_path, datasets_root):
    """The README's AntMaze command without the hub: a missing antmaze-umaze-random set is made by
    make_dataset.py on the spot, then the run scores the success rate."""
    args = [*tiny_args("cal_ql", "antmaze-umaze-random"), "--random-dataset-steps", "1000", "--eval-episodes", "2"]
    run_dir, result = finished_run(
        "algorithms/cal_ql.py", ["--config", "configs/cal_ql/antmaze.yaml", *args], tmp_path, datasets_root
    )
    assert "antmaze-umaze-random is not on disk; generating it" in result.stderr
    records = read_metrics(run_dir)
    assert records and all(0.0 <= r["return"] <= 1.0 for r in records)
