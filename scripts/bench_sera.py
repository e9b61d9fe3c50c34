"""Time one finetuning update of algorithms/cal_ql.py with and without SERA.

Prints one JSON line:
  {"batch_size", "online_rows", "sera_k", "device", "ms_per_update", "ms_per_update_sera",
   "sera_overhead_ms", "sera_overhead_pct", "ms_sera_reward"}
Both measure the same Cal-QL update (CQL term with calibration, max backup, actor, alpha) on the
same synthetic mixed batch (mixing ratio 0.5); the SERA one also computes the intrinsic reward of
the online half with the frozen critic and the k-NN on the device, exactly as finetuning does.
Rounds of the two are interleaved so that drift in machine load hits both alike; best of rounds.
ms_sera_reward times the SERA computation alone (frozen-critic forward, k-NN, reward), which is
the overhead without the noise of two full updates.

  python scripts/bench_sera.py --batch-size 256 --device cpu --steps 50
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace

import torch
import tyro

from common import load_algorithm, time_updates

cal_ql = load_algorithm("cal_ql")


@dataclass
class Args:
    batch_size: int = 256
    """Transitions per update (half from the dataset, half online: the released code's mix)."""
    device: str = "cpu"
    """Torch device."""
    steps: int = 50
    """Timed updates per method and round (after 5 warm-up updates)."""
    rounds: int = 3
    """Interleaved rounds; the best round of each method is reported."""
    hidden_dim: int = 256
    """Width of the 2 hidden layers of actor and critics (released code: 256-256)."""
    sera_k: int = 10
    """k of the k-NN."""
    obs_dim: int = 17
    """Observation size (17: Walker2d / HalfCheetah)."""
    act_dim: int = 6
    """Action size (6: Walker2d / HalfCheetah)."""


def main(args: Args) -> None:
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = replace(
        cal_ql.Config(),
        actor_hidden_dims=(args.hidden_dim,) * 2,
        critic_hidden_dims=(args.hidden_dim,) * 2,
        sera=True,
        sera_k=args.sera_k,
    )
    agent = cal_ql.CalQLAgent(args.obs_dim, args.act_dim, cfg, device)
    frozen = copy.deepcopy(agent.critic).requires_grad_(False)
    buffer = cal_ql.ReplayBuffer(4096, args.obs_dim, args.act_dim, device)
    rows = torch.randn(4096, sum(buffer.sizes))
    rows[:, args.obs_dim : args.obs_dim + args.act_dim].clamp_(-0.99, 0.99)  # actions inside the bounds
    rows[:, -2] = (torch.rand(4096) < 0.05).float()
    buffer.extend(rows)
    batch = buffer.sample((args.batch_size,))
    n_offline = args.batch_size // 2

    def plain():
        agent.update(batch, buffer.split, conservative=True, calibrate=True)

    def with_sera():
        bonus, _ = cal_ql.sera_bonus(frozen, batch, n_offline, buffer.split, cfg)
        agent.update(batch, buffer.split, conservative=True, calibrate=True, bonus=bonus)

    def sera_only():
        cal_ql.sera_bonus(frozen, batch, n_offline, buffer.split, cfg)

    plain_ms, sera_ms, reward_ms = [], [], []
    for _ in range(args.rounds):
        plain_ms.append(time_updates(plain, args.steps, device))
        sera_ms.append(time_updates(with_sera, args.steps, device))
        reward_ms.append(time_updates(sera_only, args.steps, device))
    plain_best, sera_best = min(plain_ms), min(sera_ms)
    print(
        json.dumps(
            {
                "batch_size": args.batch_size,
                "online_rows": args.batch_size - n_offline,
                "sera_k": args.sera_k,
                "device": str(device),
                "ms_per_update": round(plain_best, 3),
                "ms_per_update_sera": round(sera_best, 3),
                "sera_overhead_ms": round(sera_best - plain_best, 3),
                "sera_overhead_pct": round(100 * (sera_best - plain_best) / plain_best, 1),
                "ms_sera_reward": round(min(reward_ms), 3),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
