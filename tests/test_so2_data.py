"""Datasets, scores, config resolution and the Q diagnostics of algorithms/so2.py."""

import itertools
import json
import math
import socket
import subprocess
import sys
from dataclasses import replace

import minari
import numpy as np
import pytest

from conftest import REPO


def test_normalized_score_uses_d4rl_constants(so2):
    assert so2.normalized_score("walker2d", 1.629008) == pytest.approx(0.0)
    assert so2.normalized_score("walker2d", 4592.3) == pytest.approx(100.0)
    assert so2.normalized_score("hopper", [-20.272305, 3234.3]) == pytest.approx([0.0, 100.0])
    # halfcheetah: (5927.41 - (-280.18)) / 12415.18 = 50%
    assert so2.normalized_score("halfcheetah", 5927.410523) == pytest.approx(50.0, abs=1e-4)


def test_ant_scores_on_the_measured_ant_v5_references(so2):
    """ant: this project's Ant-v5 references (D4RL's are Ant-v2's): random = the mean return of the
    ant-random set's episodes (make_dataset's log), expert = the shipped ant-expert's return on the
    100 held-out episodes that configs/sweeps/sac_ant_expert.yaml fixed (seeds 10,000-10,099)."""
    low, high = so2.ENVS["ant"][1]
    log = (REPO / "results" / "datasets" / "make_dataset_log.txt").read_text()
    assert f"local/ant/random-v0: 7351 episodes, 1000000 steps, mean return {low:.1f} " in log
    assert f"reward sums per episode): mean return\n# {low:.3f}, std 148.277" in log
    heldout = [
        json.loads(line) for line in (REPO / "results" / "policies" / "heldout_eval.jsonl").read_text().splitlines()
    ]
    expert = [r for r in heldout if r["policy"] == "ant-expert" and (r["episodes"], r["seed"]) == (100, 10_000)]
    assert [r["return"] for r in expert] == [high]
    # 50% of the way: (1124.376 - (-79.548)) / (2328.3 - (-79.548)) = 1203.924 / 2407.848
    assert so2.normalized_score("ant", 1124.376) == pytest.approx(50.0)


def test_mujoco_deprecation_warning_shows_once_and_others_pass():
    """HalfCheetah's 'settotalmass is deprecated' prints once however many envs are made; any other
    MuJoCo warning (here an unstable simulation) still reaches stderr."""
    code = (
        "import sys, numpy, mujoco; sys.path.insert(0, 'scripts'); from common import load_algorithm; "
        "so2 = load_algorithm('so2'); envs = [so2.make_env('halfcheetah') for _ in range(3)]; "
        "env = envs[0].unwrapped; env.data.qvel[:] = numpy.inf; mujoco.mj_step(env.model, env.data)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("'settotalmass' is deprecated") == 1
    assert "Nan, Inf or huge value in QVEL" in result.stderr


@pytest.mark.parametrize(
    "name,expected",
    [
        ("walker2d-random", ("walker2d", "random")),
        ("hopper-medium-replay", ("hopper", "medium-replay")),
        ("pen-human", ("pen", "human")),
        ("door-random", ("door", "random")),
    ],
)
def test_parse_env_name(so2, name, expected):
    assert so2.parse_env_name(name) == expected


@pytest.mark.parametrize(
    "name", ["walker-random", "walker2d-human", "pen-medium-replay", "walker2d", "hopper-medium-v2"]
)
def test_unknown_env_is_a_config_error(so2, name):
    with pytest.raises(so2.ConfigError, match="unknown env"):
        so2.parse_env_name(name)


def test_dataset_ids(so2):
    assert so2.dataset_ids("walker2d", "random", 1_000_000) == ("local/walker2d/random-v0", [])
    assert so2.dataset_ids("walker2d", "random", 5000) == ("local/walker2d/random-n5000-v0", [])
    assert so2.dataset_ids("hopper", "medium", 1_000_000) == ("local/hopper/medium-v0", ["mujoco/hopper/medium-v0"])
    assert so2.dataset_ids("hopper", "medium-replay", 1_000_000) == ("local/hopper/medium-replay-v0", [])
    assert so2.dataset_ids("door", "cloned", 1_000_000) == ("local/door/cloned-v0", ["D4RL/door/cloned-v2"])
    assert so2.dataset_ids("pen", "random", 3000) == ("local/pen/random-n3000-v0", [])  # made here, not on the hub


def episode(obs, terminated):
    T = len(obs) - 1
    return {
        "observations": np.asarray(obs, dtype=np.float64),
        "actions": np.full((T, 1), 0.5),
        "rewards": np.arange(T, dtype=np.float64),
        "terminations": np.array([False] * (T - 1) + [terminated]),
        "truncations": np.array([False] * (T - 1) + [not terminated]),
    }


def test_flatten_terminations_vs_truncations(so2):
    terminated = episode([[0.0], [1.0], [2.0]], terminated=True)
    truncated = episode([[10.0], [11.0], [12.0], [13.0]], terminated=False)
    flat = so2.flatten_episodes([terminated, truncated])
    assert {k: v.dtype for k, v in flat.items()} == dict.fromkeys(flat, np.float32)
    assert flat["observations"][:, 0].tolist() == [0, 1, 10, 11, 12]
    # The truncated episode's last next-state is its real final observation, not a reset.
    assert flat["next_observations"][:, 0].tolist() == [1, 2, 11, 12, 13]
    # Only the termination is terminal: truncation keeps bootstrapping.
    assert flat["terminals"].tolist() == [0, 1, 0, 0, 0]
    assert flat["rewards"].tolist() == [0, 1, 0, 1, 2]
    assert flat["timeouts"].tolist() == [0, 0, 0, 0, 1]


def test_resolve_config_reads_the_ensemble_table(so2):
    cfg = so2.resolve_config(replace(so2.Config(), env="hopper-medium"))
    assert (cfg.num_critics, cfg.eta) == (50, 1.0)
    cfg = so2.resolve_config(replace(so2.Config(), env="walker2d-medium-expert"))
    assert (cfg.num_critics, cfg.eta) == (10, 5.0)
    cfg = so2.resolve_config(replace(so2.Config(), env="hopper-medium", num_critics=7, eta=0.0))
    assert (cfg.num_critics, cfg.eta) == (7, 0.0)


@pytest.mark.parametrize(
    "field,value",
    [
        ("sigma", -0.1),
        ("utd", 0),
        ("noise_clip", -1.0),
        ("num_critics", 1),
        ("warmup_steps", 10**9),
        ("eval_episodes", 0),
        ("gamma", 1.5),
    ],
)
def test_invalid_values_are_config_errors(so2, field, value):
    with pytest.raises(so2.ConfigError):
        so2.resolve_config(replace(so2.Config(), **{field: value}))


def test_config_file_with_flag_override(so2):
    cfg, _ = so2.parse_args(["--config", str(so2.REPO_ROOT / "configs" / "so2_cpu.yaml"), "--utd", "3"])
    assert cfg.hidden_dim == 128 and cfg.pretrain_steps == 10_000  # from the file
    assert cfg.utd == 3  # the flag wins
    with pytest.raises(so2.ConfigError, match="cannot use config file"):
        so2.parse_args(["--config", "/nonexistent.yaml"])


def brute_force_tau_b(x, y):
    concordant = discordant = ties_x = ties_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        if sx == 0 and sy == 0:
            continue
        if sx == 0:
            ties_x += 1
        elif sy == 0:
            ties_y += 1
        elif sx == sy:
            concordant += 1
        else:
            discordant += 1
    return (concordant - discordant) / math.sqrt(
        (concordant + discordant + ties_x) * (concordant + discordant + ties_y)
    )


def test_kendall_tau_against_brute_force(so2):
    rng = np.random.default_rng(0)
    for n in (2, 5, 17, 40):
        x, y = rng.normal(size=n), rng.normal(size=n)
        assert so2.kendall_tau(x, y) == pytest.approx(brute_force_tau_b(x, y))
        tied_x, tied_y = np.round(x), np.round(y)  # many ties
        if np.ptp(tied_x) > 0 and np.ptp(tied_y) > 0:
            assert so2.kendall_tau(tied_x, tied_y) == pytest.approx(brute_force_tau_b(tied_x, tied_y))
    assert so2.kendall_tau(np.arange(5.0), np.arange(5.0) * 3) == pytest.approx(1.0)
    assert so2.kendall_tau(np.arange(5.0), -np.arange(5.0)) == pytest.approx(-1.0)
    assert math.isnan(so2.kendall_tau(np.ones(4), np.arange(4.0)))


def test_windowed_kendall_tau(so2):
    # Ranked perfectly inside each of 4 windows, even though the windows are offset.
    q_true = np.arange(20.0)
    q_est = q_true + np.repeat([100.0, -50.0, 0.0, 7.0], 5)
    assert so2.windowed_kendall_tau(q_est, q_true, 4) == pytest.approx([1.0] * 4)
    reversed_half = np.concatenate([np.arange(10.0), -np.arange(10.0)])
    assert so2.windowed_kendall_tau(reversed_half, q_true, 2) == pytest.approx([1.0, -1.0])


def test_discounted_returns(so2):
    assert so2.discounted_returns(np.array([1.0, 1.0, 1.0]), 0.5).tolist() == [1.75, 1.5, 1.0]


def test_random_dataset_generation_and_cache(so2, tmp_path, monkeypatch):
    arrays, dataset_id = so2.load_dataset("hopper", "random", 700)
    assert dataset_id == "local/hopper/random-n700-v0"
    dataset = minari.load_dataset(dataset_id)  # a real Minari dataset, with D4RL reference scores
    assert dataset.total_steps == 700 == len(arrays["rewards"])
    assert dataset.storage.metadata["ref_min_score"] == pytest.approx(-20.272305)
    assert dataset.storage.metadata["ref_max_score"] == pytest.approx(3234.3)
    episodes = list(dataset.iterate_episodes())
    for ep in episodes:
        assert ep.terminations.sum() + ep.truncations.sum() == 1  # exactly one ending, at the end
        assert ep.terminations[-1] or ep.truncations[-1]
    assert arrays["terminals"].sum() == sum(ep.terminations.sum() for ep in episodes)
    assert arrays["terminals"].sum() + arrays["timeouts"].sum() == len(episodes)
    assert arrays["observations"].shape == (700, 11) and arrays["actions"].shape == (700, 3)
    assert np.abs(arrays["actions"]).max() <= 1.0
    # The second load reads the flat cache, equal to flattening the episodes again.
    cached = so2.read_flat_cache(dataset_id)
    rebuilt = so2.flatten_episodes(
        {
            "observations": e.observations,
            "actions": e.actions,
            "rewards": e.rewards,
            "terminations": e.terminations,
            "truncations": e.truncations,
        }
        for e in episodes
    )
    for key in rebuilt:
        assert np.array_equal(cached[key], rebuilt[key])
    assert not any(p.name.startswith(".tmp") for p in so2_root(so2).iterdir())
    # Same seed, same dataset: regenerate in a fresh root.
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    again, _ = so2.load_dataset("hopper", "random", 700)
    for key in arrays:
        assert np.array_equal(arrays[key], again[key])


def so2_root(so2):
    return so2.dataset_path()


def test_stale_cache_is_rebuilt(so2):
    arrays, dataset_id = so2.load_dataset("hopper", "random", 700)
    path = so2_root(so2) / dataset_id / "flat_cache.npz"
    with open(path, "wb") as f:
        np.savez(f, key=np.array("stale"), observations=np.zeros((1, 11)))
    assert so2.read_flat_cache(dataset_id) is None
    again, _ = so2.load_dataset("hopper", "random", 700)
    assert np.array_equal(again["observations"], arrays["observations"])


def test_missing_dataset_offline_is_a_config_error(so2):
    with pytest.raises(so2.ConfigError, match="unavailable offline"):
        so2.load_dataset("walker2d", "medium", 1_000_000)
    with pytest.raises(
        so2.ConfigError,
        match="unavailable offline; generate it with: python scripts/make_dataset.py walker2d-medium-replay",
    ):
        so2.load_dataset("walker2d", "medium-replay", 1_000_000)


def test_missing_adroit_and_antmaze_sets_name_their_remedy(so2, monkeypatch):
    """pen-medium is made here (the make_dataset.py command); AntMaze and Adroit's human sets come
    from the hub only, so their message names the hub ids and no command."""
    with pytest.raises(
        so2.ConfigError, match="unavailable offline; generate it with: python scripts/make_dataset.py pen-medium"
    ):
        so2.load_dataset("pen", "medium", 1_000_000)

    def offline(*args):
        raise OSError("no network")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    for base, quality, hub_id in [
        ("antmaze", "umaze", "D4RL/antmaze/umaze-v1"),
        ("door", "human", "D4RL/door/human-v2"),
    ]:
        with pytest.raises(so2.ConfigError) as error:
            so2.load_dataset(base, quality, 1_000_000)
        assert hub_id in str(error.value) and "make_dataset" not in str(error.value)
