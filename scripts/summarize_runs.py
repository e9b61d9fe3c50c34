"""Print a markdown table of runs (so2.py / cal_ql.py / sac.py output folders) from their files.

  python scripts/summarize_runs.py results/so2_cpu_walker2d_random/*/

One row per run folder: variant, seed, the first finetuning evaluation (pretrained score), final and
best score, final Q bias and Kendall tau, wall time and device, read from summary.json and
config.yaml (the run-folder contract of the README), so a results table is regenerated from the
runs, never typed.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro
import yaml


@dataclass
class Args:
    folders: tyro.conf.Positional[tuple[str, ...]]
    """Run folders, each with summary.json and config.yaml."""


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def row(run: Path) -> str:
    summary = json.loads((run / "summary.json").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    variant = f"sigma={config.get('sigma')}, utd={config.get('utd')}" if "sigma" in config else "-"
    scores = [
        summary[k] for k in ("pretrained_score", "final_score", "best_score", "final_q_bias", "final_kendall_tau")
    ]
    return " | ".join(
        [
            run.name,
            variant,
            str(summary["seed"]),
            *map(fmt, scores),
            f"{summary['wall_time_s']:.0f} s",
            summary["device_name"],
        ]
    )


def main(args: Args) -> None:
    missing = [f for f in args.folders if not (Path(f) / "summary.json").is_file()]
    if missing:
        print(f"summarize_runs.py: error: no summary.json in {', '.join(missing)}", file=sys.stderr)
        sys.exit(2)
    print(
        "| run | variant | seed | score at start of finetuning | final score | best score | final q_bias | final kendall_tau | wall time | device |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for folder in args.folders:
        try:
            print("| " + row(Path(folder)) + " |")
        except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:
            print(f"summarize_runs.py: skipped damaged run {folder}: {type(exc).__name__}: {exc}", file=sys.stderr)


if __name__ == "__main__":
    main(tyro.cli(Args))
