"""Curves, tables and aggregate statistics from run folders (a sweep's, or any list).

  python scripts/report.py runs/sweeps/so2_ablation_cpu --out results/so2_ablation_cpu --budgets 2000 5000 10000
  python scripts/report.py runs/sweeps/so2_halfcheetah_medium_cpu --auc 3000 30000 --paired so2:sacn pvu_only:sacn

Writes to --out:
  curves_env_steps.png   normalised score vs online env steps: mean over seeds with a 95% bootstrap
                         CI, one panel per dataset, one line per variant;
  curves_pretraining.png the pretraining curves (score against pretraining steps, mean over seeds with a
                         95% bootstrap CI) of the runs that pretrained, e.g. a sweep's shared pretrainings;
  curves_wall_clock.png  the same against wall-clock seconds of finetuning (each record placed at
                         env_steps / online_steps of the run's finetuning time: the runs log no
                         time per record, so a constant rate is assumed);
  q_diagnostics.png      q_bias, kendall_tau and q_std_policy over finetuning (the paper's Fig. 4b;
                         not written when no run logs them, as odt.py's);
  table.md               per dataset and variant: pretrained, final, best score, the mean of the
                         last --last evaluations, the --auc window mean, the score at each
                         budget and the final evaluation's mean episode length (n/a in records
                         older than that key), mean +- std over seeds with n, the seeds whose final
                         evaluation stands still (hopper, walker2d, ant: full-length episodes with a
                         return within 10% of the alive bonus alone, 1,000), and the finetuning
                         wall time;
  q_table.md             per dataset and variant: each run's mean of q_bias, q_bias_min, kendall_tau
                         and q_std_policy over its evaluations at or after --q-from online env steps,
                         then mean +- std over seeds (not written when no run logs them);
  aggregate.png, aggregate.json
                         IQM of the final scores over all datasets with stratified-bootstrap 95% CIs
                         and the probability of improvement of each variant over each other (rliable);
  paired.md, paired.json with --paired A:B: per dataset, variant A against variant B seed by seed
                         (runs of one seed share a pretraining in a sweep) on each metric (the --auc
                         window mean, the mean of the last --last evaluations, the final score): the
                         per-seed differences, wins out of n, the mean difference with a 95% bootstrap
                         CI and rliable's probability of improvement P(A > B) with its CI.
Runs are grouped by (env, variant): the variant is the run's --run-name (the sweep sets it), the
seed comes from its config. A run folder is any folder holding summary.json, config.yaml and
metrics.jsonl (the README's run-folder contract); folders are searched recursively. With
--reference ENV:LOW:HIGH (e.g. ant:-325.6:3879.7, D4RL's Ant-v2 constants; ENV is the part of the
dataset name before the first "-") that env's scores are recomputed from the logged returns, and
table.md, paired.md, paired.json and aggregate.json say so (summary.json keeps the logged scores).
"""

from __future__ import annotations

import json
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
# arch (rliable's bootstrap) warns that rliable still passes a RandomState; the results are the same.
warnings.filterwarnings("ignore", category=FutureWarning, module="arch")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402
import yaml  # noqa: E402

BOOTSTRAP_SAMPLES = 2000


@dataclass
class Args:
    runs: tyro.conf.Positional[tuple[str, ...]]
    """Run folders, or folders to search for them (e.g. a sweep's output folder)."""
    out: str = "results/report"
    """Folder for the figures and tables."""
    budgets: tuple[int, ...] = ()
    """Online env steps at which the table also gives the score (the last evaluation at or before)."""
    reps: int = 2000
    """Bootstrap resamples of rliable's interval estimates."""
    auc: Optional[tuple[int, int]] = None
    """FROM TO: each run's mean normalised score over its evaluations from FROM to TO online env steps
    (both included), a column of table.md and a metric of --paired (e.g. a study's pre-registered metric)."""
    last: int = 3
    """Each run's mean normalised score over its last `last` evaluations: a column of table.md and a
    metric of --paired."""
    paired: tuple[str, ...] = ()
    """Variant pairs A:B compared seed by seed (paired.md, paired.json), e.g. so2:sacn pvu_only:sacn."""
    q_from: int = 0
    """q_table.md averages each run's evaluations at or after this many online env steps (e.g. the
    end of the warm-up, so that only evaluations after Q updates on online data count)."""
    reference: tuple[str, ...] = ()
    """ENV:LOW:HIGH ..., e.g. ant:-325.6:3879.7 (D4RL's Ant-v2 constants; ENV: the part of the
    dataset name before the first "-", so ant covers ant-random, ant-medium, ...): that env's
    normalised scores, pretraining included, recomputed from each evaluation's mean return as
    100 (return - LOW) / (HIGH - LOW) instead of the ones the runs logged; the outputs say so."""


@dataclass
class Run:
    env: str
    variant: str
    seed: int
    steps: np.ndarray  # online env steps of the finetuning records
    records: list[dict]  # the finetuning records (none for a pretraining-only run)
    finetune_time_s: float
    summary: dict
    pretrain: list[dict]  # the pretraining records (none for a run that started from a pretrain.pt)


def find_runs(paths: tuple[str, ...]) -> list[Run]:
    folders = sorted(
        {
            p.parent
            for path in paths
            for p in (
                [Path(path) / "summary.json"]
                if (Path(path) / "summary.json").exists()
                else Path(path).rglob("summary.json")
            )
        }
    )
    runs = []
    for folder in folders:
        try:
            run = read_run(folder)
        except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:
            print(f"report.py: skipped damaged run {folder}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        if run is not None:
            runs.append(run)
    return runs


def read_run(folder: Path) -> Optional[Run]:
    """A finished run, or None (interrupted or diverged: not a result). A damaged or half-copied file
    raises."""
    summary = json.loads((folder / "summary.json").read_text())
    if summary.get("status") != "finished":
        return None
    config = yaml.safe_load((folder / "config.yaml").read_text())
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    online = [r for r in records if r["phase"] != "pretrain"]
    pretrain = [r for r in records if r["phase"] == "pretrain"]
    finetune_time = summary["wall_time_s"] - (summary.get("pretrain_time_s") or 0.0)
    steps = np.array([r["env_steps"] for r in online], dtype=float)
    variant = config.get("run_name") or "default"
    return Run(config["env"], variant, config["seed"], steps, online, finetune_time, summary, pretrain)


def renormalise(runs: list[Run], references: dict[str, tuple[float, float]]) -> None:
    """Each record's normalised score from its return, for the runs whose env has a reference here."""
    for run in runs:
        low, high = references.get(run.env.partition("-")[0], (None, None))
        for record in run.records + run.pretrain if low is not None else []:
            value = record["return"]  # null where the evaluation's return was not finite
            record["normalized_score"] = None if value is None else 100.0 * (value - low) / (high - low)


def parse_references(items: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    """--reference ENV:LOW:HIGH items -> {env: (low, high)}; ValueError on a malformed one."""
    references = {}
    for item in items:
        env, *bounds = item.split(":")
        try:
            low, high = map(float, bounds)
        except ValueError:  # not two numbers
            low = high = 0.0
        if not env or not np.isfinite([low, high]).all() or not high > low:
            raise ValueError(f"--reference {item} is not ENV:LOW:HIGH with finite LOW < HIGH")
        if env in references:
            raise ValueError(f"--reference {env} is given twice")
        references[env] = (low, high)
    return references


def bootstrap_ci(values: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean over seeds (values [seeds])."""
    if len(values) < 2:
        return float(values.mean()), float(values.mean())
    means = rng.choice(values, size=(BOOTSTRAP_SAMPLES, len(values)), replace=True).mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def on_grid(run: Run, key: str, grid: np.ndarray) -> np.ndarray:
    """A record key at the env steps of `grid` (the last record at or before each)."""
    values = np.array([np.nan if r[key] is None else r[key] for r in run.records], dtype=float)
    index = np.searchsorted(run.steps, grid, side="right") - 1
    return np.where(index >= 0, values[np.clip(index, 0, None)], np.nan)


def grouped(runs: list[Run]) -> dict[str, dict[str, list[Run]]]:
    groups: dict[str, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        groups[run.env][run.variant].append(run)
    return {env: dict(sorted(v.items())) for env, v in sorted(groups.items())}


def plot_curves(groups, key: str, x: str, path: Path, ylabel: str, rng: np.random.Generator) -> None:
    """Mean over seeds with a 95% bootstrap CI, one panel per dataset. x: env_steps or wall_clock."""
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    for ax, (env, variants) in zip(axes[0], groups.items()):
        for variant, runs in variants.items():
            grid = np.unique(np.concatenate([r.steps for r in runs]))
            values = np.stack([on_grid(r, key, grid) for r in runs])
            mean = np.nanmean(values, 0)
            ci = np.array(
                [
                    bootstrap_ci(col[~np.isnan(col)], rng) if (~np.isnan(col)).any() else (np.nan, np.nan)
                    for col in values.T
                ]
            )
            xs = grid if x == "env_steps" else grid / grid.max() * np.mean([r.finetune_time_s for r in runs])
            ax.plot(xs, mean, label=f"{variant} (n={len(runs)})")
            ax.fill_between(xs, ci[:, 0], ci[:, 1], alpha=0.2)
        ax.set_title(env)
        ax.set_xlabel(
            "online env steps" if x == "env_steps" else "finetuning wall-clock seconds (constant rate assumed)"
        )
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pretraining(runs: list[Run], path: Path, rng: np.random.Generator) -> None:
    """The pretraining curves (normalised score against pretraining steps): mean over seeds with a
    95% bootstrap CI, one panel per dataset."""
    envs = sorted({r.env for r in runs})
    fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 3.6), squeeze=False)
    for ax, env in zip(axes[0], envs):
        curves = [{rec["step"]: rec["normalized_score"] for rec in r.pretrain} for r in runs if r.env == env]
        grid = sorted(set().union(*curves))
        values = np.array([[c.get(step, np.nan) for step in grid] for c in curves], dtype=float)
        ci = np.array([bootstrap_ci(col[~np.isnan(col)], rng) for col in values.T])
        ax.plot(grid, np.nanmean(values, 0), marker="o", label=f"n={len(curves)}")
        ax.fill_between(grid, ci[:, 0], ci[:, 1], alpha=0.2)
        ax.set_title(f"{env}: pretraining")
        ax.set_xlabel("pretraining steps")
        ax.set_ylabel("normalised score")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_q_diagnostics(groups, path: Path, rng: np.random.Generator) -> None:
    keys = [
        ("q_bias", "normalised Q bias (mean Q - MC) / |MC|"),
        ("kendall_tau", "Kendall's tau (windows)"),
        ("q_std_policy", "ensemble std of Q at pi"),
    ]
    fig, axes = plt.subplots(len(keys), len(groups), figsize=(5 * len(groups), 3 * len(keys)), squeeze=False)
    for col, (env, variants) in enumerate(groups.items()):
        for row, (key, label) in enumerate(keys):
            ax = axes[row][col]
            for variant, runs in variants.items():
                grid = np.unique(np.concatenate([r.steps for r in runs]))
                values = np.stack([on_grid(r, key, grid) for r in runs])
                if np.isnan(values).all():  # a method without a Q function (odt.py) logs null
                    continue
                ci = np.array(
                    [bootstrap_ci(c[~np.isnan(c)], rng) if (~np.isnan(c)).any() else (np.nan, np.nan) for c in values.T]
                )
                ax.plot(grid, np.nanmean(values, 0), label=variant)
                ax.fill_between(grid, ci[:, 0], ci[:, 1], alpha=0.2)
            ax.set_title(f"{env}: {key}")
            ax.set_xlabel("online env steps")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    lines = {line.get_label(): line for ax in axes.flat for line in ax.get_lines()}  # any panel may lack Q
    axes[0][-1].legend(lines.values(), lines.keys(), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mean_std(values: list[float], digits: int = 1) -> str:
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(values) == 0:
        return "n/a"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.{digits}f}"


def metric_names(auc: Optional[tuple[int, int]], last: int) -> list[str]:
    return ([f"mean {auc[0]:,}-{auc[1]:,}"] if auc else []) + [f"last-{last} mean", "final"]


def run_metrics(run: Run, auc: Optional[tuple[int, int]], last: int) -> dict[str, float]:
    """A run's scalar scores, named by metric_names: the mean over the --auc window (when given; nan
    without an evaluation in it), the mean of its last `last` evaluations and its final score."""
    scores = np.array([r["normalized_score"] for r in run.records], dtype=float)
    window = scores[(run.steps >= auc[0]) & (run.steps <= auc[1])] if auc else None
    values = ([window.mean() if len(window) else np.nan] if auc else []) + [scores[-last:].mean(), scores[-1]]
    return dict(zip(metric_names(auc, last), map(float, values)))


def table(groups, budgets: tuple[int, ...], auc: Optional[tuple[int, int]], last: int) -> str:
    """Mean ± sample std over seeds (n given) of the pretrained, final, best, last-k mean, window mean
    and budget scores."""
    windows = metric_names(auc, last)[:-1]
    head = [
        "dataset",
        "variant",
        "n",
        "pretrained",
        "final",
        "best",
        *windows,
        *[f"at {b:,} steps" for b in budgets],
        "final episode length",
        "seeds standing still at the end",
        "finetuning wall time (s)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for env, variants in groups.items():
        for variant, runs in variants.items():
            scores = [[r["normalized_score"] for r in run.records] for run in runs]
            cells = [
                env,
                variant,
                str(len(runs)),
                mean_std([s[0] for s in scores]),
                mean_std([s[-1] for s in scores]),
                mean_std([max(s) for s in scores]),
                *[mean_std([run_metrics(run, auc, last)[w] for run in runs]) for w in windows],
            ]
            cells += [
                mean_std(
                    [
                        float(on_grid(run, "normalized_score", np.array([b]))[0]) if run.steps[0] <= b else None
                        for run in runs
                    ]
                )
                for b in budgets
            ]
            cells.append(mean_std([run.records[-1].get("episode_length") for run in runs], digits=0))
            still = sorted(run.seed for run in runs if stands_still(env, run.records[-1]))
            known = all("episode_length" in run.records[-1] for run in runs)  # older records lack it
            cells.append(", ".join(map(str, still)) or ("-" if known else "n/a"))
            cells.append(f"{np.mean([r.finetune_time_s for r in runs]):.0f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# Envs whose agent earns an alive bonus of 1 per step (gymnasium v5 Hopper, Walker2d, Ant): a policy that
# stands still until the 1,000-step time limit returns about 1,000 (hopper: about 31 normalised).
ALIVE_BONUS_RETURN = {"hopper": 1000.0, "walker2d": 1000.0, "ant": 1000.0}


def stands_still(env: str, record: dict) -> bool:
    """Full-length episodes whose return is within 10% of the alive bonus alone: standing, not moving."""
    bonus = ALIVE_BONUS_RETURN.get(env.split("-")[0])
    length = record.get("episode_length")
    return bonus is not None and length == 1000 and abs(record["return"] - bonus) < 0.1 * bonus


Q_KEYS = ("q_bias", "q_bias_min", "kendall_tau", "q_std_policy")


def q_table(groups, q_from: int) -> str:
    """Per run, the mean of each Q diagnostic over its evaluations at env steps >= q_from (null
    values skipped); then mean ± sample std of those run means over seeds."""
    head = ["dataset", "variant", "n", *Q_KEYS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for env, variants in groups.items():
        for variant, runs in variants.items():
            cells = [env, variant, str(len(runs))]
            for key in Q_KEYS:
                run_means = []
                for run in runs:
                    values = on_grid(run, key, run.steps)[run.steps >= q_from]
                    run_means.append(float(np.nanmean(values)) if np.isfinite(values).any() else None)
                cells.append(mean_std(run_means, digits=2))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def estimate(value, ci) -> dict:
    """A point estimate and its 95% interval from rliable, as plain floats."""
    return {"value": float(np.ravel(value)[0]), "ci95": [float(x) for x in np.ravel(ci)]}


def aggregate(groups, reps: int, path_png: Path) -> dict:
    """rliable: IQM of final scores over runs x datasets with stratified-bootstrap CIs, and the
    probability of improvement between variants. Variants need the same seeds count on every dataset."""
    from rliable import library as rly
    from rliable import metrics

    variants = sorted({v for env in groups.values() for v in env})
    complete = [v for v in variants if all(v in env for env in groups.values())]
    n = min(len(env[v]) for env in groups.values() for v in complete) if complete else 0
    if n == 0:
        return {}
    scores = {
        v: np.stack(
            [
                [run.records[-1]["normalized_score"] for run in sorted(env[v], key=lambda r: r.seed)[:n]]
                for env in groups.values()
            ],
            axis=1,
        )
        for v in complete
    }
    state = np.random.RandomState(0)
    iqm, iqm_ci = rly.get_interval_estimates(
        scores, lambda x: np.array([metrics.aggregate_iqm(x)]), reps=reps, random_state=state
    )
    pairs = {f"{a} > {b}": (scores[a], scores[b]) for a in complete for b in complete if a != b}
    poi, poi_ci = (
        rly.get_interval_estimates(pairs, metrics.probability_of_improvement, reps=reps, random_state=state)
        if pairs
        else ({}, {})
    )
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.5 * len(complete)))
    for i, v in enumerate(complete):
        ax.plot(np.ravel(iqm_ci[v]), [i, i], lw=6, alpha=0.5)
        ax.plot(np.ravel(iqm[v])[:1], [i], "k|", ms=14)
    ax.set_yticks(range(len(complete)), complete)
    ax.set_xlabel(f"IQM of final normalised score ({n} seeds x {len(groups)} datasets, 95% stratified-bootstrap CI)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)
    plt.close(fig)
    return {
        "runs_per_dataset": n, "datasets": list(groups),
        "iqm": {v: estimate(iqm[v], iqm_ci[v]) for v in complete},
        "probability_of_improvement": {k: estimate(poi[k], poi_ci[k]) for k in pairs},
    }  # fmt: skip


def paired(groups, pairs: list[tuple[str, str]], auc, last: int, reps: int) -> tuple[str, dict]:
    """Variant a against variant b on each dataset, over the seeds both have: per metric, the per-seed
    differences a - b, wins (a > b) out of n, the mean difference with a 95% percentile-bootstrap CI
    over seeds, and rliable's probability of improvement P(a > b) with its bootstrap CI."""
    from rliable import library as rly
    from rliable import metrics

    rng = np.random.default_rng(0)
    head = ["dataset", "a - b", "metric", "n", "per-seed a - b", "wins", "mean a - b [95% CI]", "P(a > b) [95% CI]"]
    lines, out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)], {}
    for env, variants in groups.items():
        for a, b in pairs:
            runs = {v: {r.seed: run_metrics(r, auc, last) for r in variants.get(v, [])} for v in (a, b)}
            seeds = sorted(runs[a].keys() & runs[b].keys())
            if not seeds:
                continue
            for metric in runs[a][seeds[0]]:
                x, y = (np.array([runs[v][s][metric] for s in seeds]) for v in (a, b))
                diff = x - y
                low, high = bootstrap_ci(diff, rng)
                poi, poi_ci = rly.get_interval_estimates(
                    {"p": (x[:, None], y[:, None])},
                    metrics.probability_of_improvement,
                    reps=reps,
                    random_state=np.random.RandomState(0),
                )
                entry = {
                    "seeds": seeds, "differences": diff.tolist(), "wins": int((diff > 0).sum()), "n": len(seeds),
                    "mean_difference": float(diff.mean()), "ci95": [low, high],
                    "probability_of_improvement": estimate(poi["p"], poi_ci["p"]),
                }  # fmt: skip
                out.setdefault(env, {}).setdefault(f"{a} - {b}", {})[metric] = entry
                p = entry["probability_of_improvement"]
                cells = [
                    env, f"{a} - {b}", metric, str(len(seeds)),
                    ", ".join(f"{s}: {d:+.1f}" for s, d in zip(seeds, diff)), f"{entry['wins']}/{len(seeds)}",
                    f"{diff.mean():+.2f} [{low:+.2f}, {high:+.2f}]",
                    f"{p['value']:.2f} [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}]",
                ]  # fmt: skip
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", out


def main(args: Args) -> None:
    pairs = [tuple(p.split(":")) for p in args.paired]
    problems = [f"--paired {p} is not A:B" for p, pair in zip(args.paired, pairs) if len(pair) != 2 or "" in pair]
    problems += ["--auc FROM TO needs 0 <= FROM <= TO"] if args.auc and not 0 <= args.auc[0] <= args.auc[1] else []
    problems += ["--last must be >= 1"] if args.last < 1 else []
    try:
        references = parse_references(args.reference)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        print(f"report.py: error: {problems[0]}", file=sys.stderr)
        sys.exit(2)
    found = find_runs(args.runs)
    unmatched = sorted(set(references) - {r.env.partition("-")[0] for r in found})
    if unmatched:
        print(
            f"report.py: error: --reference {unmatched[0]} matches no run's env (ENV is the part before the first '-', e.g. ant)",
            file=sys.stderr,
        )
        sys.exit(2)
    renormalise(found, references)
    runs = [r for r in found if r.records]
    if not runs:
        print(
            f"report.py: error: no finished run folders with finetuning records under {', '.join(args.runs)}",
            file=sys.stderr,
        )
        sys.exit(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    groups = grouped(runs)
    rng = np.random.default_rng(0)
    plot_curves(groups, "normalized_score", "env_steps", out / "curves_env_steps.png", "normalised score", rng)
    plot_curves(groups, "normalized_score", "wall_clock", out / "curves_wall_clock.png", "normalised score", rng)
    if any(r.pretrain for r in found):
        plot_pretraining([r for r in found if r.pretrain], out / "curves_pretraining.png", rng)
    if any(np.isfinite(on_grid(r, "q_bias", r.steps)).any() for r in runs):
        plot_q_diagnostics(groups, out / "q_diagnostics.png", rng)
        (out / "q_table.md").write_text(q_table(groups, args.q_from))
    else:
        for name in ("q_diagnostics.png", "q_table.md"):
            (out / name).unlink(missing_ok=True)  # not one from an earlier report
        print(
            "report.py: no Q diagnostics in these runs (no Q function, e.g. odt.py): no q_diagnostics.png, q_table.md"
        )
    note = "".join(
        f"Normalised scores of {e} recomputed from the returns with LOW {lo!r}, HIGH {hi!r} (--reference).\n"
        for e, (lo, hi) in references.items()
    ) + ("\n" if references else "")
    marked = {"references": {e: list(bounds) for e, bounds in references.items()}} if references else {}
    (out / "table.md").write_text(note + table(groups, args.budgets, args.auc, args.last))
    result = aggregate(groups, args.reps, out / "aggregate.png")
    (out / "aggregate.json").write_text(json.dumps({**marked, **result}, indent=2) + "\n")
    if pairs:  # after the aggregate, whose bootstrap draws do not depend on --paired
        text, result = paired(groups, pairs, args.auc, args.last, args.reps)
        (out / "paired.md").write_text(note + text)
        (out / "paired.json").write_text(json.dumps({**marked, **result}, indent=2) + "\n")
    print(f"report of {len(runs)} runs ({', '.join(f'{e}: {len(v)} variants' for e, v in groups.items())}) in {out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
