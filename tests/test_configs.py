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
