"""Keep a copy of the actor of every checkpoint a running algorithms/sac.py run writes.

  python scripts/keep_actors.py runs/sweeps/sac_experts/walker2d/expert/seed0/<run folder>

sac.py overwrites <run>/checkpoint.pt every --checkpoint-every env steps, but the experts' rule
(configs/sweeps/sac_experts.yaml) may ship the actor of an earlier checkpoint
(export_policy.py --at-step STEP FILE). Started beside the training, this polls checkpoint.pt, writes
the actor of each new one to <run>/actors/step_<STEP>.pt (the FILE that --at-step takes), and
returns once the run has written final.pt. It reads a checkpoint only when its modification time
changes, so it costs the training next to nothing; checkpoints are replaced atomically, so it never
reads a half-written one.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro


@dataclass
class Args:
    run: tyro.conf.Positional[str]
    """Folder of the running sac.py run (the one its progress line and config.yaml are in)."""
    poll_s: float = 120.0
    """Seconds between looks at checkpoint.pt; keep it well under the time between two checkpoints."""


def keep(run: Path) -> None:
    """Copy the actor of run/checkpoint.pt to run/actors/step_<step>.pt unless kept already."""
    checkpoint = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    target = run / "actors" / f"step_{checkpoint['step']}.pt"
    if not target.exists():
        target.parent.mkdir(exist_ok=True)
        tmp = target.with_suffix(".tmp")
        torch.save(checkpoint["agent"]["actor"], tmp)
        tmp.replace(target)
        print(f"kept {target}", flush=True)


def main(args: Args) -> None:
    run = Path(args.run)
    if not (run / "config.yaml").exists():
        print(f"keep_actors.py: error: '{run}' is not a run folder (no config.yaml)", file=sys.stderr)
        sys.exit(2)
    if not args.poll_s >= 0:
        print(f"keep_actors.py: error: --poll-s must be a number of seconds >= 0, got {args.poll_s}", file=sys.stderr)
        sys.exit(2)
    seen = None
    while True:
        # Looked at before the checkpoint, so the checkpoint written just before final.pt is kept too.
        finished = (run / "final.pt").exists()
        stamp = (run / "checkpoint.pt").stat().st_mtime_ns if (run / "checkpoint.pt").exists() else None
        if stamp is not None and stamp != seen:
            keep(run)
            seen = stamp
        if finished:
            return
        time.sleep(args.poll_s)


if __name__ == "__main__":
    main(tyro.cli(Args))
