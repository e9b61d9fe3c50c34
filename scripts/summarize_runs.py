"""Print a markdown table of runs (so2.py / cal_ql.py / sac.py output folders) from their files.

  python scripts/summarize_runs.py results/so2_cpu_walker2d_random/*/

One row per run folder: env, seed, the first finetuning evaluation (pretrained score), final and
best score, final Q bias and Kendall tau, wall time and device, read from summary.json,
metrics.jsonl and config.yaml, so a results table is regenerated from the runs, never typed.
"""

import json
import sys
from pathlib import Path

import yaml


def row(run: Path) -> str:
    summary = json.loads((run / "summary.json").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    online = [r for r in records if r["phase"] != "pretrain"]
    variant = f"sigma={config.get('sigma')}, utd={config.get('utd')}" if "sigma" in config else "-"
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    return " | ".join([
        run.name, variant, str(summary["seed"]), fmt(online[0]["normalized_score"]), fmt(online[-1]["normalized_score"]),
        fmt(max(r["normalized_score"] for r in online)), fmt(online[-1]["q_bias"]), fmt(online[-1]["kendall_tau"]),
        f"{summary['wall_time_s']:.0f} s", summary["device_name"],
    ])


def main(folders: list[str]) -> None:
    print("| run | variant | seed | score at start of finetuning | final score | best score | final q_bias | final kendall_tau | wall time | device |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for folder in folders:
        print("| " + row(Path(folder)) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
