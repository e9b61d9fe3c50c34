"""Shared fixtures: the algorithm scripts imported as modules, and an isolated Minari root."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def load_script(relative: str):
    """Import a standalone script (algorithms/so2.py, ...) as a module."""
    path = REPO / relative
    name = path.stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve their module while it executes
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def so2():
    return load_script("algorithms/so2.py")


@pytest.fixture(scope="session")
def cal_ql():
    return load_script("algorithms/cal_ql.py")


@pytest.fixture(scope="session")
def datasets_root(tmp_path_factory):
    """One Minari root for the whole session: tiny datasets are generated once and shared."""
    return tmp_path_factory.mktemp("minari")


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, datasets_root):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(datasets_root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a download attempt fails at once, not after retries
    monkeypatch.setenv("WANDB_MODE", "offline")


def script_env(datasets_root) -> dict[str, str]:
    """Environment for subprocess runs of the scripts. One torch thread: two threads of a child
    competing with pytest and other children for 2 cores are many times slower, not faster."""
    return {**os.environ, "MINARI_DATASETS_PATH": str(datasets_root), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
