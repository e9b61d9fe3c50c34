"""Helpers shared by the scripts and tests: a file of the repository imported as a module, and update timing."""

import importlib.util
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def load_script(relative: str):
    """Import a standalone file of the repository (algorithms/so2.py, scripts/report.py, ...) as the module
    named after it. The algorithm files are scripts, not a package: this is the one way scripts/ and tests/
    import them, e.g. load_script("algorithms/so2.py").RECORD_KEYS."""
    path = REPO / relative
    if path.stem not in sys.modules:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module  # dataclasses resolve their module while it executes
        spec.loader.exec_module(module)
    return sys.modules[path.stem]


def load_algorithm(name: str):
    """algorithms/<name>.py as the module <name>."""
    return load_script(f"algorithms/{name}.py")


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
