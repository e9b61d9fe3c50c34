"""Cost of the run-folder machinery of algorithms/so2.py at paper size, against the training it protects.

Prints one JSON line per measurement:
  {"what": "checkpoint" | "resume" | "finite_check", ...}
- checkpoint: size and write time of checkpoint.pt in finetuning (agent with N critics, optimisers,
  targets, the online rows, the running episode, RNG states, evaluation records), and that time
  as a percentage of the training between two checkpoints (checkpoint_every env steps, each of
  `utd` critic updates plus one actor update, timed here on the same device);
- resume: reading the checkpoint back, hashing the dataset (fingerprint) and rebuilding the mixed
  FIFO buffer from the seeded shuffle plus the online rows;
- finite_check: the per-update divergence flag (watch) against one critic update, and one check
  (flags and all parameters read, one host sync) as done at evaluations and checkpoints.
The dataset is synthetic (random rows of the walker2d sizes); nothing is trained.

  python scripts/bench_checkpoint.py --num-critics 10 --dataset-rows 1000000 --online-rows 100000
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import tyro

from common import load_algorithm, time_updates

so2 = load_algorithm("so2")


@dataclass
class Args:
    num_critics: int = 10
    """Ensemble size N (paper: 10 for halfcheetah / walker2d)."""
    dataset_rows: int = 1_000_000
    """Transitions in the (synthetic) dataset."""
    online_rows: int = 100_000
    """Online transitions in the checkpoint (the paper's 100k-step budget, at its end)."""
    batch_size: int = 2560
    """Finetuning batch (256 online + 2304 mixed)."""
    utd: int = 10
    """Critic updates per env step."""
    checkpoint_every: int = 10_000
    """Env steps between two checkpoints (the algorithm files' default)."""
    device: str = "cpu"
    """Torch device."""
    steps: int = 5
    """Timed updates per round (3 rounds, best kept)."""


def main(args: Args) -> None:
    device = torch.device(args.device)
    torch.manual_seed(0)
    obs_dim, act_dim = 17, 6
    cfg = replace(
        so2.Config(), num_critics=args.num_critics, eta=1.0, online_steps=args.online_rows, out_dir=tempfile.mkdtemp()
    )
    agent = so2.SO2Agent(obs_dim, act_dim, cfg, device)
    sizes = [obs_dim, act_dim, 1, obs_dim, 1]
    rng = np.random.default_rng(0)
    arrays = {
        "observations": rng.standard_normal((args.dataset_rows, obs_dim), dtype=np.float32),
        "actions": rng.uniform(-1, 1, (args.dataset_rows, act_dim)).astype(np.float32),
        "rewards": rng.standard_normal(args.dataset_rows, dtype=np.float32),
        "next_observations": rng.standard_normal((args.dataset_rows, obs_dim), dtype=np.float32),
        "terminals": np.zeros(args.dataset_rows, np.float32),
        "timeouts": np.zeros(args.dataset_rows, np.float32),
    }
    dataset = so2.dataset_rows(arrays)
    online = so2.ReplayBuffer(args.online_rows, obs_dim, act_dim, device)
    online.extend(torch.randn(args.online_rows, sum(sizes)))
    env = so2.make_env("walker2d")
    env.reset(seed=0)
    agent.new_optimisers(cfg.finetune_lr)
    batch = online.sample((args.batch_size,))
    agent.finetune_critic_step(batch, online.split, 0.2)  # Adam state exists, as in a real checkpoint
    agent.actor_and_alpha_step(online.split(batch)[0], 0.2)
    records = [
        {"phase": "finetune", "step": 10 * k, "env_steps": k, **dict.fromkeys(so2.RECORD_KEYS[3:], 0.0)}
        for k in range(0, args.online_rows, 1000)
    ]
    run_dir = so2.new_run_dir(cfg)
    data_info = {"id": "synthetic", "fingerprint": "not computed"}
    run = so2.Run(cfg, run_dir, device, agent, None, data_info, obs_dim, act_dim, None, records)
    loop = {
        "online": online.state_dict(),
        "env": so2.env_state(env),
        "obs": env.reset()[0],
        "alpha": 0.2,
        "updates": 0,
        "critic_loss": torch.tensor(0.0),
        "actor_loss": torch.tensor(0.0),
    }

    saves = []
    for _ in range(3):
        start = time.perf_counter()
        run.save("checkpoint", "finetune", args.online_rows, loop)
        saves.append(time.perf_counter() - start)
    size_mb = (run_dir / "checkpoint.pt").stat().st_size / 2**20
    update_ms = time_updates(lambda: agent.finetune_critic_step(batch, online.split, 0.2), args.steps, device)
    actor_ms = time_updates(lambda: agent.actor_and_alpha_step(online.split(batch)[0], 0.2), args.steps, device)
    between_s = args.checkpoint_every * (args.utd * update_ms + actor_ms) / 1000
    print(
        json.dumps(
            {
                "what": "checkpoint",
                "num_critics": args.num_critics,
                "online_rows": args.online_rows,
                "device": str(device),
                "size_mb": round(size_mb, 1),
                "write_s": round(min(saves), 3),
                "training_between_checkpoints_s": round(between_s, 1),
                "overhead_percent": round(100 * min(saves) / between_s, 4),
            }
        ),
        flush=True,
    )

    start = time.perf_counter()
    checkpoint = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    so2.dataset_fingerprint(arrays)
    fingerprint_s = time.perf_counter() - start
    start = time.perf_counter()
    mixed = so2.ReplayBuffer(len(dataset), obs_dim, act_dim, device)
    mixed.extend(dataset[torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))])
    mixed.extend(checkpoint["loop"]["online"]["rows"])
    rebuild_s = time.perf_counter() - start
    print(
        json.dumps(
            {
                "what": "resume",
                "dataset_rows": args.dataset_rows,
                "load_s": round(load_s, 3),
                "fingerprint_s": round(fingerprint_s, 3),
                "rebuild_mixed_buffer_s": round(rebuild_s, 3),
            }
        ),
        flush=True,
    )

    loss = agent.finetune_critic_step(batch, online.split, 0.2)
    update_ms = min(
        time_updates(lambda: agent.finetune_critic_step(batch, online.split, 0.2), args.steps, device) for _ in range(3)
    )
    watch_ms = min(time_updates(lambda: run.watch({"critic_loss": loss}), 1000, device) for _ in range(3))
    start = time.perf_counter()
    run.check("finetune", 0)
    check_ms = 1000 * (time.perf_counter() - start)
    print(
        json.dumps(
            {
                "what": "finite_check",
                "ms_per_update": round(update_ms, 3),
                "ms_per_watch": round(watch_ms, 4),
                "watch_percent_of_update": round(100 * watch_ms / update_ms, 3),
                "ms_per_check": round(check_ms, 3),
            }
        ),
        flush=True,
    )
    Path(run_dir / "checkpoint.pt").unlink()


if __name__ == "__main__":
    main(tyro.cli(Args))
