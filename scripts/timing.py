"""Shared timing helper of the benchmark scripts."""

import time

import torch


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
