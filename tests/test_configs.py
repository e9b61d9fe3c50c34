"""The locomotion config of each baseline file names a source for every default: it loads, resolves,
and differs from the file's Config defaults in its dataset only."""

from dataclasses import replace

import pytest

from conftest import REPO, load_script


@pytest.mark.parametrize("name", ["td3_bc", "iql", "awac", "pex", "off2on", "odt", "rlpd", "wsrl"])
def test_locomotion_config_is_the_defaults_with_their_sources(name):
    algo = load_script(f"algorithms/{name}.py")
    cfg, _ = algo.parse_args(["--config", str(REPO / "configs" / name / "locomotion.yaml")])
    cfg = algo.resolve_config(cfg)
    defaults = algo.Config()
    same_env = algo.resolve_config(replace(defaults, env=cfg.env))  # odt.py fills in its env's targets
    assert {f for f in vars(defaults) if getattr(cfg, f) != getattr(same_env, f)} == {"config"}
    assert cfg.env == "hopper-medium" != defaults.env


DOMAIN_CONFIGS = sorted([*REPO.glob("configs/*/adroit.yaml"), *REPO.glob("configs/*/antmaze.yaml")])


@pytest.mark.parametrize("path", DOMAIN_CONFIGS, ids=lambda p: f"{p.parent.name}-{p.stem}")
def test_domain_configs_load_and_resolve(path):
    """Each configs/<algo>/{adroit,antmaze}.yaml is a valid config of its file, for a set of its
    domain, and names a source for every value it sets."""
    algo = load_script(f"algorithms/{path.parent.name}.py")
    cfg = algo.resolve_config(algo.parse_args(["--config", str(path)])[0])
    base = algo.parse_env_name(cfg.env)[0]
    assert base in algo.ADROIT if path.stem == "adroit" else base == "antmaze"
    fields = [line for line in path.read_text().splitlines() if line and not line.startswith(("#", " "))]
    assert [line for line in fields if "#" not in line and not line.startswith("env:")] == []
