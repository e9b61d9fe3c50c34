"""Ship the actor of a finished algorithms/sac.py run as a behaviour policy with its manifest entry.

  python scripts/export_policy.py runs/hopper__sac__0__1795263860 hopper-medium --band 35 70 --torch-threads 1

Copies the actor of <run>/final.pt to results/policies/<name>.pt and records in results/policies/manifest.json:
the training config (so medium-replay can be regenerated), env steps, wall time, the final
deterministic evaluation of the run, the score band the policy is documented to reach, the
command that trained it, the thread count it ran with, and the hardware. Policies that could not
be trained are recorded with --missing "why" instead of a run folder. With --at-step STEP FILE it
ships FILE, the actor the run had at STEP, and records the run that ends there (see that option).
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import tyro

from common import load_algorithm

POLICIES = Path(__file__).resolve().parent.parent / "results" / "policies"


@dataclass
class Args:
    run: tyro.conf.Positional[str]
    """Folder of the finished sac.py run (or '-' with --missing)."""
    name: tyro.conf.Positional[str]
    """Policy name <env>-<quality>, e.g. hopper-medium."""
    band: tuple[float, float] = (0.0, 100.0)
    """Normalised-score band the policy is documented to reach (checked by scripts/eval_policy.py)."""
    torch_threads: int = 1
    """torch threads the run used (OMP_NUM_THREADS); medium-replay regeneration needs the same."""
    missing: Optional[str] = None
    """Record the policy as not shipped, with this reason, instead of exporting a run."""
    at_step: Optional[tuple[int, str]] = None
    """STEP FILE: ship the actor the run had at env step STEP instead of its final one, from FILE (a
    copy of the actor in the run's checkpoint.pt when it was written at STEP; sac.py overwrites
    that file). The experts' rule for a final policy outside its band (configs/sweeps/
    sac_experts.yaml). It is the final actor of the same command with --total-steps STEP
    (total_steps only ends the loop; tests/test_sac.py's stop-then-resume test), which the manifest
    records; wall_time_s stays the whole run's."""


def cpu_model() -> str:
    """The CPU's model name where Linux gives it: deterministic rollouts, and so the policy a
    command trains, differ between CPU types."""
    cpuinfo = Path("/proc/cpuinfo")
    names = (
        [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        if cpuinfo.exists()
        else []
    )
    return f"{names[0] if names else platform.machine()} CPU"


def main(args: Args) -> None:
    POLICIES.mkdir(parents=True, exist_ok=True)
    manifest_path = POLICIES / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if args.missing is not None:
        manifest[args.name] = {"file": None, "status": args.missing}
    else:
        run = Path(args.run)
        config = torch.load(run / "checkpoint.pt", weights_only=False)["config"]
        summary = json.loads((run / "summary.json").read_text())
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        if args.at_step is None:
            last, actor = (
                records[-1],
                torch.load(run / "final.pt", map_location="cpu", weights_only=False)["agent"]["actor"],
            )
        else:
            step, actor_file = args.at_step
            at_step = [r for r in records if r["env_steps"] == step]
            if not at_step or step % config["checkpoint_every"]:
                print(
                    f"export_policy.py: error: step {step} is not a checkpoint step with an evaluation in {run}",
                    file=sys.stderr,
                )
                sys.exit(2)
            last = at_step[0]
            actor = torch.load(actor_file, map_location="cpu", weights_only=False)
            config = {**config, "total_steps": step}
        torch.save(actor, POLICIES / f"{args.name}.pt")
        # Every training field that differs from sac.py's defaults, so the command reproduces the run.
        sac = load_algorithm("sac")
        defaults = asdict(sac.Config())
        flags = "".join(
            f" --{k.replace('_', '-')} {v}"
            for k, v in config.items()
            if v != defaults[k]
            and k not in ("env", "seed", "resume", "config", "run_name", "out_dir", "track", "device")
        )
        manifest[args.name] = {
            "file": f"{args.name}.pt",
            "env": config["env"],
            "training_env_steps": last["env_steps"],
            "seed": config["seed"],
            "eval_episodes": config["eval_episodes"],
            "eval_return": round(last["return"], 1),
            # On today's reference returns, not the ones logged when the run trained (ant's changed).
            "eval_normalized_score": round(float(sac.normalized_score(config["env"], last["return"])), 1),
            "score_band": list(args.band),
            "wall_time_s": summary["wall_time_s"],
            "torch_threads": args.torch_threads,
            "command": f"OMP_NUM_THREADS={args.torch_threads} python algorithms/sac.py --env {config['env']} --seed {config['seed']}{flags}",
            "hardware": f"{cpu_model()}, {summary['device']}, torch {summary['versions']['torch']}",
            "sac_config": {**config, "out_dir": "runs", "resume": None, "config": None, "run_name": None},
        }
        if args.at_step is not None:
            manifest[args.name]["note"] = (
                f"the actor at env step {step} of a {summary['env_steps']}-step run whose final policy "
                "missed the band (the rule of configs/sweeps/sac_experts.yaml); wall_time_s is that whole run's"
            )
    manifest_path.write_text(json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")
    print(json.dumps({args.name: manifest[args.name]}, indent=2))


if __name__ == "__main__":
    main(tyro.cli(Args))
