"""Run a grid of algorithm x dataset x seed x variant, locally or on Slurm, and survive interruptions.

  python scripts/sweep.py configs/sweeps/so2_ablation_cpu.yaml                      # 2 local workers
  python scripts/sweep.py configs/sweeps/so2_table1.yaml --backend slurm --partition gpu

A sweep file (YAML) names:
  name: so2_ablation_cpu        # runs go to <out_dir>/<name>/
  script: algorithms/so2.py     # any algorithm file of the run-folder contract
  datasets: [hopper-random, halfcheetah-random]
  seeds: [0, 1, 2, 3]
  base: {num_critics: 5, ...}   # config values of every run (the algorithm's --config YAML fields)
  variants:                     # named overrides of base
    so2: {sigma: 0.3, utd: 10}
    sacn: {sigma: 0.0, utd: 1}
  shared_pretraining: true      # one pretraining per (dataset, seed), run with online_steps 0;
                                # every variant finetunes from its pretrain.pt (the paper's protocol)
  retries: 1                    # a failed run is tried again this many times (its logs are kept)
  slurm: {partition: gpu, time_min: 600, cpus_per_task: 4, gpus_per_node: 1}   # --backend slurm

Each run has its own folder <out_dir>/<name>/<dataset>/<variant or pretrain>/seed<k>/ holding the
config it was given (sweep_config.yaml), the logs of every attempt (logs/) and the algorithm's run
folder. Running the sweep again finds them: finished runs are skipped, interrupted or killed runs
continue with --resume, runs that failed before are tried again. A run that diverged stays failed.
A run whose folder another process holds (a second sweep on the same runs) is reported as in use,
not as a failure; a damaged summary.json beside a checkpoint is reported and the run resumes.
Local workers are pinned to one torch thread each (OMP_NUM_THREADS=1), so two runs share two
cores without oversubscription. Ctrl-C (or SIGTERM) asks every running run to checkpoint, then
stops; run the same command to continue. Exit code 0 when every run finished, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import tyro
import yaml

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Args:
    sweep: tyro.conf.Positional[str]
    """Sweep file (YAML), e.g. configs/sweeps/so2_ablation_cpu.yaml."""
    out_dir: str = "runs/sweeps"
    """Runs go to <out_dir>/<sweep name>/."""
    backend: Literal["local", "slurm", "submitit-local"] = "local"
    """local: a pool of worker processes here; slurm: job arrays through submitit, one per
    dependency level; submitit-local: the same jobs with submitit's local executor (for testing)."""
    workers: int = 2
    """Local backend: runs at once (each with one torch thread)."""
    partition: Optional[str] = None
    """Slurm partition (overrides the sweep file's slurm.partition)."""
    time_min: Optional[int] = None
    """Slurm time limit per job in minutes (overrides slurm.time_min)."""
    dry_run: bool = False
    """Print the runs, their state and their commands; run nothing."""


class SweepError(Exception):
    """Bad sweep file or arguments: one line on stderr, exit code 2."""


@dataclass
class RunSpec:
    """One run of the sweep: its folder, its config values and the run it depends on."""

    id: str  # <dataset>/<variant or pretrain>/seed<k>
    script: str
    folder: Path
    values: dict
    variant: str
    depends: Optional[RunSpec] = None
    attempts: int = 0
    durations: list = field(default_factory=list)


def expand(sweep: dict, root: Path) -> list[RunSpec]:
    """The runs of a sweep, grouped by (dataset, seed) with the shared pretraining before its variants.
    The local pool starts the first runnable run in this order, so it completes whole (dataset, seed)
    groups early: a study cut short has finished seeds to report, not only pretrainings."""
    missing = {"name", "script", "datasets", "seeds", "variants"} - set(sweep)
    if missing:
        raise SweepError(f"sweep file lacks {', '.join(sorted(missing))}")
    if not (REPO / sweep["script"]).is_file():
        raise SweepError(f"no algorithm file {sweep['script']}")
    base = sweep.get("base") or {}
    specs = []
    for dataset in sweep["datasets"]:
        for seed in sweep["seeds"]:
            values = {**base, "env": dataset, "seed": seed}
            pretraining = None
            if sweep.get("shared_pretraining", False):
                folder = root / dataset / "pretrain" / f"seed{seed}"
                pretraining = RunSpec(
                    f"{dataset}/pretrain/seed{seed}", sweep["script"], folder, {**values, "online_steps": 0}, "pretrain"
                )
                specs.append(pretraining)
            for variant, overrides in sweep["variants"].items():
                folder = root / dataset / variant / f"seed{seed}"
                specs.append(
                    RunSpec(
                        f"{dataset}/{variant}/seed{seed}",
                        sweep["script"],
                        folder,
                        {**values, **(overrides or {})},
                        variant,
                        pretraining,
                    )
                )
    return specs


def run_folder(spec: RunSpec) -> Optional[Path]:
    """The algorithm's run folder inside the run's folder (the one with a checkpoint), or None."""
    folders = sorted(p for p in spec.folder.glob("*__*__*") if (p / "checkpoint.pt").exists())
    return folders[-1] if folders else None


def state(spec: RunSpec) -> str:
    """done, diverged, resumable (a checkpoint to continue from), damaged (a checkpoint beside an unreadable
    summary.json: resumable, and resuming rewrites the summary) or new."""
    folder = run_folder(spec)
    if folder is None:
        return "new"
    summary = folder / "summary.json"
    try:
        status = json.loads(summary.read_text())["status"] if summary.exists() else None
    except (OSError, ValueError, KeyError, TypeError):
        return "damaged"
    return {"finished": "done", "diverged": "diverged"}.get(status, "resumable")


def command(spec: RunSpec) -> list[str]:
    """The command of the run's next attempt: --resume when it has a checkpoint, else a fresh run
    from its config values (written to sweep_config.yaml), from its pretraining's pretrain.pt."""
    folder = run_folder(spec)
    if folder is not None:
        return [sys.executable, str(REPO / spec.script), "--resume", str(folder)]
    values = dict(spec.values)
    if spec.depends is not None:
        values["pretrained"] = str(run_folder(spec.depends) / "pretrain.pt")
    spec.folder.mkdir(parents=True, exist_ok=True)
    (spec.folder / "sweep_config.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    return [
        sys.executable,
        str(REPO / spec.script),
        "--config",
        str(spec.folder / "sweep_config.yaml"),
        "--out-dir",
        str(spec.folder),
        "--run-name",
        spec.variant,
    ]


def worker_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def last_error(log: Path) -> str:
    """The line of a failed attempt's log that says why (an error line, else the last line)."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
    errors = [line for line in lines if "error" in line.lower() or "Error" in line]
    return (errors or lines or ["(empty log)"])[-1].strip()[:300]


# ----------------------------------------------------------------------------------------------
# Local backend: a pool of single-threaded worker processes
# ----------------------------------------------------------------------------------------------
def run_local(specs: list[RunSpec], workers: int, retries: int) -> dict[str, str]:
    """Run everything that is not done, `workers` at a time, respecting dependencies; the final
    state of every run (done / failed / blocked / stopped / in use: another process holds its folder)."""
    stop: list[int] = []
    handlers = {s: signal.signal(s, lambda signum, frame: stop.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    running: dict[str, tuple[RunSpec, subprocess.Popen, float, Path]] = {}
    # runs that ended before this call count from the first progress line on
    final = {s.id: {"done": "done", "diverged": "failed"}[state(s)] for s in specs if state(s) in ("done", "diverged")}
    for spec in specs:
        if state(spec) == "damaged":
            print(f"damaged summary.json in {run_folder(spec)}: the run resumes from its checkpoint", file=sys.stderr)
    shown = None
    try:
        while True:
            for spec_id, (spec, process, started, log) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[spec_id]
                now = state(spec)
                if now == "done":
                    spec.durations.append(time.time() - started)
                    final[spec_id] = "done"
                elif stop:
                    final[spec_id] = "stopped"
                elif process.returncode == 2 and "in use by another process" in last_error(log):
                    final[spec_id] = "in use"  # another process runs it: not a failure, and not to retry
                    print(f"IN USE {spec_id}: {last_error(log)}", file=sys.stderr, flush=True)
                elif now == "diverged" or spec.attempts > retries:
                    final[spec_id] = "failed"
                    print(
                        f"FAILED {spec_id} (exit {process.returncode}): {last_error(log)}; log: {log}",
                        file=sys.stderr,
                        flush=True,
                    )
                else:
                    print(
                        f"retrying {spec_id} (exit {process.returncode}): {last_error(log)}",
                        file=sys.stderr,
                        flush=True,
                    )
            if stop:
                for _, process, _, _ in running.values():
                    process.send_signal(signal.SIGTERM)  # each run checkpoints, then exits
                for spec, process, _, _ in running.values():
                    process.wait()
                    final[spec.id] = "stopped"
                break
            for spec in specs:
                if len(running) >= workers:
                    break
                if spec.id in running or spec.id in final:
                    continue
                if spec.depends is not None and final.get(spec.depends.id) != "done":
                    if final.get(spec.depends.id) in ("failed", "blocked"):
                        final[spec.id] = "blocked"
                    continue
                spec.attempts += 1
                log = spec.folder / "logs" / f"attempt-{time.strftime('%Y%m%d-%H%M%S')}-{spec.attempts}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                cmd = command(spec)
                with open(log, "w") as out:
                    out.write(" ".join(cmd) + "\n")
                    out.flush()
                    process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=worker_env(), cwd=REPO)
                running[spec.id] = (spec, process, time.time(), log)
            if not running:
                break
            line = progress_line(specs, final, running, workers)
            if line != shown:
                print(line, file=sys.stderr, flush=True)
                shown = line
            time.sleep(0.5)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if stop:
        print(
            f"sweep stopped by signal {stop[0]}; the running runs checkpointed. Run the same command to continue.",
            file=sys.stderr,
        )
    return final


def progress_line(specs: list[RunSpec], final: dict[str, str], running: dict, workers: int) -> str:
    """done / running / failed / waiting, with an ETA from the mean time of the runs finished here."""
    done = sum(v == "done" for v in final.values())
    failed = sum(v in ("failed", "blocked") for v in final.values())
    in_use = sum(v == "in use" for v in final.values())
    waiting = len(specs) - done - failed - in_use - len(running)
    times = [d for s in specs for d in s.durations]
    eta = f", ETA {sum(times) / len(times) * (waiting + len(running)) / workers / 60:.0f} min" if times else ""
    return (
        f"[sweep] {done} done, {len(running)} running ({', '.join(running)}), {failed} failed, "
        f"{in_use} in use elsewhere, {waiting} waiting{eta}"
    )


# ----------------------------------------------------------------------------------------------
# Slurm backend: one job array per dependency level, through submitit
# ----------------------------------------------------------------------------------------------
class SweepJob:
    """A run as a submitit job. Preemption or the time limit calls checkpoint(): the run is asked
    to checkpoint (SIGTERM), and the job is requeued; the requeued job continues with --resume."""

    def __init__(self):
        self.process: Optional[subprocess.Popen] = None

    def __call__(self, spec: RunSpec) -> str:
        log = spec.folder / "logs" / f"attempt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = command(spec)
        with open(log, "w") as out:
            out.write(" ".join(cmd) + "\n")
            out.flush()
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ, cwd=REPO)
            code = self.process.wait()
        if state(spec) != "done":
            raise RuntimeError(f"{spec.id} exit {code}: {last_error(log)}; log: {log}")
        return spec.id

    def checkpoint(self, spec: RunSpec):
        import submitit

        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait()
        return submitit.helpers.DelayedSubmission(SweepJob(), spec)


def run_submitit(specs: list[RunSpec], sweep: dict, args: Args, root: Path) -> dict[str, str]:
    """Submit the runs that are not done as job arrays, one per dependency level; the second level
    waits for the first (afterok). With the local executor (tests) the levels run one after the
    other here. Returns the state of every run as far as it is known when this returns."""
    import submitit

    slurm = {**(sweep.get("slurm") or {})}
    slurm["partition"] = args.partition or slurm.get("partition")
    slurm["time_min"] = args.time_min or slurm.get("time_min", 60)
    if args.backend == "slurm":
        executor = submitit.AutoExecutor(folder=root / "submitit" / "%j", cluster="slurm")
        params = {
            "timeout_min": slurm["time_min"],
            "slurm_partition": slurm["partition"],
            "cpus_per_task": slurm.get("cpus_per_task", 1),
            "gpus_per_node": slurm.get("gpus_per_node", 0),
            "slurm_signal_delay_s": 120,
        }
    else:
        executor = submitit.LocalExecutor(folder=root / "submitit" / "%j")
        params = {"timeout_min": slurm["time_min"]}
    final, previous = {}, []
    for level in (False, True):
        todo = [s for s in specs if (s.depends is not None) == level and state(s) != "done"]
        final.update({s.id: "done" for s in specs if (s.depends is not None) == level and state(s) == "done"})
        if not todo:
            continue
        extra = (
            {"slurm_additional_parameters": {"dependency": "afterok:" + ":".join(j.job_id for j in previous)}}
            if previous and args.backend == "slurm"
            else {}
        )
        executor.update_parameters(**params, **extra)
        jobs = executor.map_array(SweepJob(), todo)  # a finetuning job finds its pretrain.pt when it starts
        print(
            f"[sweep] submitted {len(jobs)} {'finetuning' if level else 'first-level'} jobs: {jobs[0].job_id.split('_')[0]}",
            file=sys.stderr,
            flush=True,
        )
        previous = jobs
        if args.backend == "submitit-local":
            for spec, job in zip(todo, jobs):
                try:
                    job.result()
                    final[spec.id] = "done"
                except Exception as exc:  # the job's error, reported with the run
                    final[spec.id] = "failed"
                    print(f"FAILED {spec.id}: {str(exc).strip().splitlines()[-1][:300]}", file=sys.stderr, flush=True)
    return final


def main(args: Args) -> int:
    try:
        sweep = yaml.safe_load(Path(args.sweep).read_text())
        if not isinstance(sweep, dict):
            raise SweepError("a sweep file is a mapping (name, script, datasets, seeds, variants, ...)")
        root = Path(args.out_dir) / sweep.get("name", "")
        specs = expand(sweep, root)
        if args.workers < 1:
            raise SweepError("workers must be >= 1")
    except (OSError, yaml.YAMLError, SweepError) as exc:
        print(f"sweep.py: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        for spec in specs:
            print(
                f"{spec.id}: {state(spec)}; depends on {spec.depends.id if spec.depends else '-'}; config {spec.values}"
            )
        return 0
    retries = int(sweep.get("retries", 1))
    final = (
        run_submitit(specs, sweep, args, root) if args.backend != "local" else run_local(specs, args.workers, retries)
    )
    counts = {k: sum(v == k for v in final.values()) for k in ("done", "failed", "blocked", "stopped", "in use")}
    print(
        f"[sweep] {sweep['name']}: {counts['done']}/{len(specs)} done, {counts['failed']} failed, {counts['blocked']} blocked by a failed pretraining, {counts['stopped']} stopped, {counts['in use']} in use by another process; runs in {root}",
        file=sys.stderr,
    )
    if args.backend == "slurm":
        return 0
    return 0 if counts["done"] == len(specs) else 1


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
