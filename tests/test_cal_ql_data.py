"""Dataset names, configs and config resolution of algorithms/cal_ql.py."""

import sys
from dataclasses import replace

import numpy as np
import pytest

from conftest import REPO


@pytest.mark.parametrize(
    "name,expected",
    [
        ("walker2d-random", ("walker2d", "random")),
        ("hopper-medium-replay", ("hopper", "medium-replay")),
        ("pen-human", ("pen", "human")),
        ("door-cloned", ("door", "cloned")),
        ("antmaze-medium-diverse", ("antmaze", "medium-diverse")),
    ],
)
def test_parse_env_name(cal_ql, name, expected):
    assert cal_ql.parse_env_name(name) == expected


@pytest.mark.parametrize(
    "name", ["walker-random", "walker2d-human", "pen-medium-replay", "antmaze-medium", "hopper-medium-v2"]
)
def test_unknown_env_is_a_config_error(cal_ql, name):
    with pytest.raises(cal_ql.ConfigError, match="unknown env"):
        cal_ql.parse_env_name(name)


def test_dataset_ids_resolve_like_so2(cal_ql, so2):
    for base, quality in [
        ("walker2d", "random"),
        ("hopper", "medium"),
        ("hopper", "medium-replay"),
        ("door", "cloned"),
        ("pen", "expert"),
    ]:
        for steps in (1_000_000, 5000):
            assert cal_ql.dataset_ids(base, quality, steps) == so2.dataset_ids(base, quality, steps)
    assert cal_ql.dataset_ids("antmaze", "large-play", 1_000_000) == (
        "local/antmaze/large-play-v0",
        ["D4RL/antmaze/large-play-v1"],
    )


def test_random_dataset_is_the_one_so2_generates(cal_ql, so2, tmp_path, monkeypatch):
    # Both files store *-random data under the same id, so they must generate the same data.
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "ours"))
    ours, ours_id = cal_ql.load_dataset("hopper", "random", 300)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "theirs"))
    theirs, theirs_id = so2.load_dataset("hopper", "random", 300)
    assert ours_id == theirs_id == "local/hopper/random-n300-v0"
    for key in theirs:
        assert np.array_equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("base", ["pen", "antmaze"])
def test_robotics_envs_need_gymnasium_robotics(cal_ql, base, monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium_robotics", None)  # as if it were not installed
    with pytest.raises(cal_ql.ConfigError, match="pip install gymnasium-robotics"):
        cal_ql.make_env(base, "D4RL/antmaze/umaze-v1")


@pytest.mark.parametrize("name", ["antmaze", "adroit", "locomotion"])
def test_domain_configs_load(cal_ql, name):
    cfg = cal_ql.resolve_config(cal_ql.parse_args(["--config", str(REPO / "configs" / "cal_ql" / f"{name}.yaml")])[0])
    assert cfg.mixing_ratio == 0.5 and cfg.utd == 1 and cfg.calibrate and cfg.calibrate_online
    if name == "antmaze":
        assert (cfg.cql_alpha, cfg.cql_lagrange, cfg.cql_target_gap) == (5.0, True, 0.8)
        assert (cfg.reward_scale, cfg.reward_bias, cfg.sparse_fail_reward) == (10.0, -5.0, 0.0)
        assert cfg.critic_hidden_dims == (256, 256, 256, 256) and cfg.pretrain_steps == 1_000_000
    if name == "adroit":
        assert (
            cfg.cql_alpha == 1.0 and cfg.actor_hidden_dims == (512, 512) and cfg.critic_hidden_dims == (512, 512, 512)
        )
        assert cfg.pretrain_steps == 20_000


def test_config_file_with_flag_override(cal_ql):
    cfg, _ = cal_ql.parse_args(
        [
            "--config",
            str(REPO / "configs" / "cal_ql" / "adroit.yaml"),
            "--cql-alpha",
            "3",
            "--critic-hidden-dims",
            "64",
            "64",
        ]
    )
    assert cfg.actor_hidden_dims == (512, 512)  # from the file
    assert cfg.cql_alpha == 3.0 and cfg.critic_hidden_dims == (64, 64)  # the flags win
    with pytest.raises(cal_ql.ConfigError, match="cannot use config file"):
        cal_ql.parse_args(["--config", "/nonexistent.yaml"])


@pytest.mark.parametrize(
    "field,value",
    [
        ("utd", 0),
        ("mixing_ratio", 1.0),
        ("mixing_ratio", -0.1),
        ("cql_n_actions", 0),
        ("gamma", 1.0),
        ("eval_episodes", 0),
        ("actor_hidden_dims", ()),
        ("critic_hidden_dims", (0,)),
        ("cql_alpha", -1.0),
    ],
)
def test_invalid_values_are_config_errors(cal_ql, field, value):
    with pytest.raises(cal_ql.ConfigError):
        cal_ql.resolve_config(replace(cal_ql.Config(), **{field: value}))


def test_sera_k_must_fit_the_online_rows(cal_ql):
    cfg = replace(cal_ql.Config(), sera=True, batch_size=32, mixing_ratio=0.5)  # 16 online rows
    assert cal_ql.resolve_config(replace(cfg, sera_k=15)).sera_k == 15
    assert cal_ql.resolve_config(replace(cfg, sera_k=16, sera_include_self=True)).sera_k == 16
    with pytest.raises(cal_ql.ConfigError, match="sera_k must be in"):
        cal_ql.resolve_config(replace(cfg, sera_k=16))
