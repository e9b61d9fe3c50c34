"""Helpers shared by the scripts: an algorithm file imported as a module, and update timing."""

import importlib.util
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def load_algorithm(name: str):
    """Import algorithms/<name>.py (a standalone script, not a package) as the module <name>."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "algorithms" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve their module while it executes
        spec.loader.exec_module(module)
    return sys.modules[name]


def time_updates(fn, steps: int, device: torch.device) -> float:
    """Milliseconds per call of fn, after 5 warm-up calls, synchronising the GPU around the loop."""
    for _ in range(5):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / steps
