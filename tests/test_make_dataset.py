"""scripts/make_dataset.py on tiny sizes, with stand-in policies in a temporary policy folder."""

import json
from dataclasses import asdict, replace
from pathlib import Path

import minari
import numpy as np
import pytest
import torch

from conftest import load_run_file, load_script


@pytest.fixture(scope="module")
def md():
    return load_script("scripts/make_dataset.py")


@pytest.fixture(scope="module")
def policy_dir(md, tmp_path_factory):
    """hopper-medium: the final actor of a tiny seeded SAC run (so medium-replay can be
    regenerated from its config); hopper-expert: a randomly initialised actor."""
    folder = tmp_path_factory.mktemp("policies")
    sac = md.sac
    cfg = replace(
        sac.Config(),
        env="hopper",
        total_steps=300,
        learning_starts=100,
        eval_every=150,
        eval_episodes=1,
        hidden_dim=32,
        batch_size=32,
        out_dir=str(folder / "runs"),
    )
    torch.set_num_threads(1)
    run_dir = sac.train(cfg, None)
    torch.save(load_run_file(run_dir / "final.pt")["agent"]["actor"], folder / "hopper-medium.pt")
    torch.manual_seed(1)
    torch.save(sac.Actor(11, 3, (32, 32)).state_dict(), folder / "hopper-expert.pt")
    torch.save(sac.Actor(45, 24, (32, 32)).state_dict(), folder / "pen-medium.pt")  # pen: 45 obs, 24 actions
    common = {
        "sac_config": {**asdict(cfg), "hidden_dim": 32},
        "torch_threads": 1,
        "command": "test",
        "eval_normalized_score": 1.0,
    }
    manifest = {
        "hopper-medium": {"file": "hopper-medium.pt", **common},
        "hopper-expert": {"file": "hopper-expert.pt", **common},
        "pen-medium": {"file": "pen-medium.pt", **common},
        "walker2d-expert": {"file": None, "status": "not trained: a stand-in entry without a file"},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


def args(md, name, policy_dir, **kw):
    return md.Args(name, **{"steps": 400, "seed": 0, "workers": 1, "policy_dir": policy_dir, **kw})


def check_dataset(dataset_id, steps, ref):
    dataset = minari.load_dataset(dataset_id)
    assert dataset.total_steps == steps
    assert dataset.storage.metadata["ref_min_score"] == pytest.approx(ref[0])
    assert dataset.storage.metadata["ref_max_score"] == pytest.approx(ref[1])
    episodes = list(dataset.iterate_episodes())
    for ep in episodes:
        assert ep.observations.shape == (len(ep.actions) + 1, 11) and ep.actions.shape[1] == 3
        assert ep.actions.dtype == np.float32 and np.abs(ep.actions).max() <= 1.0
        # Exactly one ending per episode, at its last step: a termination or a truncation.
        assert ep.terminations.sum() + ep.truncations.sum() == 1 and (ep.terminations[-1] or ep.truncations[-1])
    return episodes


def test_random_is_so2_generator(md, policy_dir, capsys):
    assert md.make(args(md, "hopper-random", policy_dir)) == "local/hopper/random-n400-v0"
    assert "local/hopper/random-n400-v0: " in capsys.readouterr().out
    arrays, _ = md.so2.load_dataset("hopper", "random", 400)
    assert len(arrays["rewards"]) == 400


def test_medium_shape_metadata_and_workers_independence(md, policy_dir, tmp_path, monkeypatch, capsys):
    dataset_id = md.make(args(md, "hopper-medium", policy_dir, workers=2))
    assert dataset_id == "local/hopper/medium-n400-v0"
    episodes = check_dataset(dataset_id, 400, (-20.272305, 3234.3))
    summary = capsys.readouterr().out
    assert f"{len(episodes)} episodes, 400 steps" in summary and "normalised" in summary
    # One process or two: the same data (fixed shards), and again the same for the same seed.
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "one"))
    md.make(args(md, "hopper-medium", policy_dir, workers=1))
    again = list(minari.load_dataset(dataset_id).iterate_episodes())
    assert len(again) == len(episodes)
    for a, b in zip(episodes, again):
        assert np.array_equal(a.observations, b.observations) and np.array_equal(a.actions, b.actions)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "other-seed"))
    md.make(args(md, "hopper-medium", policy_dir, seed=1))
    other = next(minari.load_dataset(dataset_id).iterate_episodes())
    assert not np.array_equal(other.actions, episodes[0].actions)


def test_existing_dataset_is_not_overwritten(md, policy_dir):
    md.make(args(md, "hopper-expert", policy_dir, steps=100))
    with pytest.raises(md.so2.ConfigError, match="already exists"):
        md.make(args(md, "hopper-expert", policy_dir, steps=100))


def test_medium_expert_concatenates(md, policy_dir):
    dataset_id = md.make(args(md, "hopper-medium-expert", policy_dir, steps=200))
    episodes = check_dataset(dataset_id, 400, (-20.272305, 3234.3))
    medium = list(minari.load_dataset("local/hopper/medium-n200-v0").iterate_episodes())
    expert = list(minari.load_dataset("local/hopper/expert-n200-v0").iterate_episodes())
    assert len(episodes) == len(medium) + len(expert)
    # Episode by episode: the same boundaries, transitions and termination / truncation flags.
    for got, want in zip(episodes, medium + expert, strict=True):
        for key in ("observations", "actions", "rewards", "terminations", "truncations"):
            assert np.array_equal(getattr(got, key), getattr(want, key)), key
    assert len(medium) > 1 and len(expert) > 1, "too few episodes to test the boundaries"


def test_medium_replay_regenerates_the_seeded_run(md, policy_dir, capsys):
    dataset_id = md.make(args(md, "hopper-medium-replay", policy_dir, steps=None))
    assert dataset_id == "local/hopper/medium-replay-v0"
    check_dataset(dataset_id, 300, (-20.272305, 3234.3))
    assert "its final actor equals the shipped medium policy" in capsys.readouterr().err


def test_medium_replay_from_run_reads_the_same_buffer(md, policy_dir, tmp_path):
    run_dir = next((Path(policy_dir) / "runs").iterdir())  # the tiny SAC run behind hopper-medium
    regenerated, _ = md.replay_episodes(args(md, "hopper-medium-replay", policy_dir, steps=None), "hopper")
    read, note = md.replay_episodes(
        args(md, "hopper-medium-replay", policy_dir, steps=None, from_run=str(run_dir)), "hopper"
    )
    assert note.startswith("read from the final checkpoint") and len(read) == len(regenerated)
    for a, b in zip(read, regenerated):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    # A run whose final actor is not the shipped policy is refused.
    checkpoint = load_run_file(run_dir / "checkpoint.pt")
    next(iter(checkpoint["agent"]["actor"].values())).add_(1.0)
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    with pytest.raises(md.so2.ConfigError, match="is not the shipped hopper-medium policy"):
        md.replay_episodes(args(md, "hopper-medium-replay", policy_dir, steps=None, from_run=str(tmp_path)), "hopper")
    with pytest.raises(md.so2.ConfigError, match="--from-run: no "):
        md.replay_episodes(
            args(md, "hopper-medium-replay", policy_dir, steps=None, from_run=str(tmp_path / "none")), "hopper"
        )
    # Only for full-size medium-replay: the run's whole buffer is the dataset.
    for name, steps in [("hopper-medium", None), ("hopper-medium-replay", 100)]:
        with pytest.raises(md.so2.ConfigError, match="--from-run is for full-size medium-replay datasets only"):
            md.make(args(md, name, policy_dir, steps=steps, from_run=str(run_dir)))


def test_full_replay_buffer_is_read_oldest_first(md):
    # capacity 4, six rows added: rows 0-1 were overwritten by the 5th and 6th, ptr = 2.
    full = {"rows": torch.tensor([[5.0], [6.0], [3.0], [4.0]]), "ptr": 2}
    assert md.buffer_in_insertion_order(full)[:, 0].tolist() == [3, 4, 5, 6]
    partial = {"rows": torch.tensor([[1.0], [2.0]]), "ptr": 2}
    assert md.buffer_in_insertion_order(partial)[:, 0].tolist() == [1, 2]


def test_rows_to_episodes_hand_example(md):
    # obs_dim 1, act_dim 1: rows [obs, act, rew, next_obs, done]
    rows = np.array(
        [
            [0.0, 0.1, 1.0, 1.0, 0.0],
            [1.0, 0.1, 1.0, 2.0, 1.0],  # termination
            [5.0, 0.1, 1.0, 6.0, 0.0],
            [6.0, 0.1, 1.0, 7.0, 0.0],  # next row does not start at 7: a time-limit reset
            [9.0, 0.1, 1.0, 8.0, 0.0],  # end of the buffer
        ],
        dtype=np.float32,
    )
    episodes = md.rows_to_episodes(rows, 1, 1)
    assert [e["observations"][:, 0].tolist() for e in episodes] == [[0, 1, 2], [5, 6, 7], [9, 8]]
    assert [e["terminations"].tolist() for e in episodes] == [[False, True], [False, False], [False]]
    assert [e["truncations"].tolist() for e in episodes] == [[False, False], [False, True], [True]]


def test_missing_policy_is_a_one_line_error(md, policy_dir):
    with pytest.raises(md.so2.ConfigError, match="no walker2d-expert behaviour policy .not trained"):
        md.make(args(md, "walker2d-expert", policy_dir))
    with pytest.raises(md.so2.ConfigError, match="no halfcheetah-medium behaviour policy"):
        md.make(args(md, "halfcheetah-medium", policy_dir))


def test_pen_medium_rolls_out_a_policy_in_d4rls_pen(md, policy_dir):
    """pen-medium: a shipped policy's rollouts in the algorithm files' pen (episodes of at most 100
    steps that end early only by a termination, the pen's drop), with D4RL's pen reference scores."""
    target = md.make(args(md, "pen-medium", policy_dir, steps=4000))  # 2 shards x 16 envs x 125 steps
    dataset = minari.load_dataset(target)
    assert target == "local/pen/medium-n4000-v0" and dataset.total_steps == 4000
    assert dataset.storage.metadata["ref_min_score"] == pytest.approx(96.262799)
    lengths = [len(ep.actions) for ep in dataset.iterate_episodes() if not ep.truncations[-1] or len(ep.actions) == 100]
    assert max(lengths) == 100 and min(lengths) < 100  # full-length episodes and drops


@pytest.mark.parametrize("name,hub", [("pen-human", "D4RL/pen/human-v2"), ("antmaze-umaze", "D4RL/antmaze/umaze-v1")])
def test_hub_only_sets_are_refused(md, policy_dir, name, hub):
    with pytest.raises(md.so2.ConfigError, match=f"comes from the Minari hub \\({hub}\\)"):
        md.make(args(md, name, policy_dir))


def test_antmaze_umaze_random_in_the_hubs_layout(md, policy_dir, capsys):
    """antmaze-umaze-random: 700-step episodes of random actions, every other one starting in the
    goal cell, as Minari's umaze-v1 (dict observations, reward 1 within 0.45 of the goal, no
    terminations, one truncation per episode) with Minari's evaluation map: the training walls
    mirrored left to right. Made again, it is reused with the same summary."""
    target = md.make(args(md, "antmaze-umaze-random", policy_dir, steps=1400))
    made = capsys.readouterr().out
    assert md.make(args(md, "antmaze-umaze-random", policy_dir, steps=1400)) == target
    assert (
        capsys.readouterr().out
        == made
        == f"{target}: 2 episodes, 1400 steps, mean return 17.5 (std 17.5), 1 episodes with a goal step\n"
    )
    dataset = minari.load_dataset(target)
    assert target == "local/antmaze/umaze-random-n1400-v0" and dataset.total_steps == 1400
    episodes = list(dataset.iterate_episodes())
    assert [len(e.actions) for e in episodes] == [700, 700]
    start = [np.linalg.norm(e.observations["achieved_goal"][0] - e.observations["desired_goal"][0]) for e in episodes]
    assert start[0] < 3 < 7 < start[1]  # the goal cell vs the reset cell two rows away (8 m)
    for e in episodes:
        distance = np.linalg.norm(e.observations["achieved_goal"][1:] - e.observations["desired_goal"][1:], axis=1)
        assert np.array_equal(e.rewards, (distance <= 0.45).astype(float)) and not e.terminations.any()
        assert e.truncations[-1] and e.truncations.sum() == 1
    assert episodes[0].rewards.any()
    train, evaluation = (json.loads(dataset.storage.metadata[k])["kwargs"] for k in ("env_spec", "eval_env_spec"))
    walls = [[cell == 1 for cell in row] for row in train["maze_map"]]
    assert [[cell == 1 for cell in row] for row in evaluation["maze_map"]] == [row[::-1] for row in walls] != walls
    assert train["continuing_task"] and not train["reset_target"]
