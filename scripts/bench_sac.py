"""Throughput of algorithms/sac.py on this machine, for planning its 1M-step runs.

1. Its update (batch 256, twin 2x256 critics; a batch drawn from a full-size buffer per update, as
   in training) at 1 and 2 torch threads, with the file's Adam (torch's default, which on CPU is
   the per-parameter loop, not foreach) and with fused Adam; the fused one is also checked for
   equal results (largest parameter difference after 50 updates from the same state and batches).
2. The whole training step (env step, policy, buffer, update), measured on the real script as the
   difference between two run lengths (start-up, the final evaluation and checkpoints cancel out),
   one run alone and two runs at once, each with OMP_NUM_THREADS=1 or 2.

  python scripts/bench_sac.py --steps 300 --loop-steps 1500

Prints JSON lines {"what": "update" | "fused_vs_file" | "loop", ...}. Time ratios within one run of
this script; the machine must be otherwise idle for the thread and two-run numbers to mean much.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import tyro

from common import REPO, load_algorithm, time_updates

sac = load_algorithm("sac")
OBS_DIM, ACT_DIM = 17, 6  # halfcheetah / walker2d
CPU = torch.device("cpu")


@dataclass
class Args:
    steps: int = 300
    """Timed updates per setting (after 5 warm-up updates), best of 3 interleaved rounds."""
    loop_steps: int = 1500
    """Training steps that separate the short and the long script run (the long one makes twice as many)."""
    env: str = "hopper"
    """Environment of the training-loop runs."""


def make_agent(fused: bool):
    torch.manual_seed(0)
    agent = sac.SACAgent(OBS_DIM, ACT_DIM, sac.Config(), CPU)
    if fused:
        for name, params, lr in (
            ("actor_optim", agent.actor.parameters(), agent.cfg.actor_lr),
            ("critic_optim", agent.critic.parameters(), agent.cfg.critic_lr),
            ("alpha_optim", [agent.log_alpha], agent.cfg.alpha_lr),
        ):
            setattr(agent, name, torch.optim.Adam(params, lr=lr, fused=True))
    return agent


def make_buffer():
    """A full-size buffer of random rows: batches are drawn from 1M rows, as late in training."""
    buffer = sac.ReplayBuffer(1_000_000, OBS_DIM, ACT_DIM, CPU)
    rows = torch.randn(1_000_000, sum(buffer.sizes))
    rows[:, OBS_DIM : OBS_DIM + ACT_DIM].clamp_(-0.99, 0.99)
    rows[:, -1] = (torch.rand(1_000_000) < 0.01).float()
    buffer.extend(rows)
    return buffer


def update_times(args: Args, buffer) -> None:
    agents = {fused: make_agent(fused) for fused in (False, True)}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        best = {}
        for _ in range(3):  # interleaved rounds: drift in machine load hits both alike
            for fused, agent in agents.items():
                ms = time_updates(lambda a=agent: a.update(buffer.sample((256,)), buffer.split), args.steps, CPU)
                best[fused] = min(ms, best.get(fused, float("inf")))
        for fused in (False, True):
            line = {"what": "update", "threads": threads, "optimizer": "fused" if fused else "default (file)"}
            line |= {"ms_per_update": round(best[fused], 2), "ratio_to_file": round(best[fused] / best[False], 3)}
            print(json.dumps(line), flush=True)
    torch.set_num_threads(1)


def fused_difference(buffer) -> None:
    """Largest parameter difference after 50 updates from the same state on the same batches."""
    agent, fused = make_agent(False), make_agent(True)
    fused.load_state_dict(copy.deepcopy(agent.state_dict()))
    torch.manual_seed(1)
    batches = [buffer.sample((256,)) for _ in range(50)]
    for batch in batches:
        torch.manual_seed(2)
        agent.update(batch, buffer.split)
        torch.manual_seed(2)
        fused.update(batch, buffer.split)
    diff = max(
        (a - b).abs().max().item()
        for name in ("actor", "critic")
        for a, b in zip(getattr(agent, name).parameters(), getattr(fused, name).parameters())
    )
    print(json.dumps({"what": "fused_vs_file", "updates": 50, "max_abs_param_diff": diff}), flush=True)


def start_run(total: int, threads: int, out: str, args: Args) -> subprocess.Popen:
    command = [
        sys.executable, str(REPO / "algorithms" / "sac.py"), "--env", args.env, "--total-steps", str(total),
        "--learning-starts", "500", "--eval-every", str(10 * total), "--eval-episodes", "1",
        "--checkpoint-every", str(10 * total), "--out-dir", out, "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def timed_runs(total: int, runs: int, threads: int, args: Args) -> float:
    """Seconds until `runs` simultaneous runs of `total` steps have all finished."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        processes = [start_run(total, threads, out, args) for _ in range(runs)]
        for p in processes:
            if p.wait() != 0:
                raise SystemExit(f"bench_sac.py: error: sac.py failed: {p.stderr.read()[-500:]}")
        return time.perf_counter() - start


def loop_times(args: Args) -> None:
    short, long = 500 + args.loop_steps, 500 + 2 * args.loop_steps
    for threads in (1, 2):
        for runs in (1, 2):
            seconds = timed_runs(long, runs, threads, args) - timed_runs(short, runs, threads, args)
            ms = 1000 * seconds / args.loop_steps
            line = {"what": "loop", "threads_per_run": threads, "runs_at_once": runs}
            line |= {"ms_per_env_step": round(ms, 2), "env_steps_per_s_total": round(runs * 1000 / ms, 1)}
            print(json.dumps(line), flush=True)


def main(args: Args) -> None:
    torch.set_num_threads(1)
    buffer = make_buffer()
    update_times(args, buffer)
    fused_difference(buffer)
    loop_times(args)


if __name__ == "__main__":
    main(tyro.cli(Args))
