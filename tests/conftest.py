"""Shared fixtures: the algorithm scripts imported as modules, and an isolated Minari root."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from common import load_script  # noqa: E402  (the one way to import an algorithm file; re-exported to the tests)

# One torch thread here too: the suite runs as two pytest-xdist workers on two cores, beside
# single-threaded script subprocesses; more threads would oversubscribe the cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def so2():
    return load_script("algorithms/so2.py")


@pytest.fixture(scope="session")
def cal_ql():
    return load_script("algorithms/cal_ql.py")


@pytest.fixture(scope="session")
def datasets_root(tmp_path_factory):
    """One Minari root for the whole session: tiny datasets are generated once and shared."""
    return tmp_path_factory.mktemp("minari")


# Minari's umaze training map (the oracle of the evaluation env's walls).
TRAIN_MAP = [[1, 1, 1, 1, 1], [1, "g", 0, 0, 1], [1, 1, 1, 0, 1], [1, "r", 0, 0, 1], [1, 1, 1, 1, 1]]


@pytest.fixture(scope="session")
def antmaze_umaze(datasets_root):
    """local/antmaze/umaze-v0, standing in for the hub's D4RL/antmaze/umaze-v1: make_dataset.py's
    umaze-random episodes (2 of 700 steps; the first starts at the goal and reaches it), written
    in the hub's layout (dict observations, Minari's mirrored evaluation map)."""
    make_dataset = load_script("scripts/make_dataset.py")
    episodes = make_dataset.umaze_random_episodes(1400, 0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(datasets_root))
        make_dataset.write_minari_dataset(
            "local/antmaze/umaze-v0", episodes, "antmaze", "random actions", "a tiny set", "tests/conftest.py"
        )
    rewards = np.concatenate([e["rewards"] for e in episodes])
    assert 0 < rewards.sum() < len(rewards)  # the set has goal steps and others
    return "local/antmaze/umaze-v0"


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, datasets_root):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(datasets_root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a download attempt fails at once, not after retries
    monkeypatch.setenv("WANDB_MODE", "offline")


def script_env(datasets_root) -> dict[str, str]:
    """Environment for subprocess runs of the scripts. One torch thread: two threads of a child
    competing with pytest and other children for 2 cores are many times slower, not faster."""
    return {
        **os.environ,
        "MINARI_DATASETS_PATH": str(datasets_root),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "PYTHONHASHSEED": "0",
        "OMP_NUM_THREADS": "1",
    }


def run_script(relative: str, args: list[str], datasets_root, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a script of the repository as a user would, from the repository root."""
    return subprocess.run(
        [sys.executable, str(REPO / relative), *args],
        capture_output=True,
        text=True,
        env=script_env(datasets_root),
        timeout=timeout,
        cwd=REPO,
    )


def run_dirs(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.iterdir() if p.is_dir()) if out_dir.exists() else []


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check_summary(run_dir: Path, records: list[dict]) -> None:
    """summary.json of a finished offline-to-online run agrees with its metrics: the first
    finetuning evaluation is the pretrained score, then the last and the best ones."""
    summary = json.loads((run_dir / "summary.json").read_text())
    online = [r for r in records if r["phase"] == "finetune"]
    assert summary["status"] == "finished" and summary["error"] is None and summary["resume_command"] is None
    assert summary["pretrained_score"] == online[0]["normalized_score"]
    assert summary["final_score"] == online[-1]["normalized_score"]
    assert summary["best_score"] == max(r["normalized_score"] for r in online)
    # device "auto" (the tests' runs): cuda where there is one, so the suite also runs on a GPU machine
    assert summary["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert summary["versions"]["torch"] and summary["wall_time_s"] > 0


def finished_run(
    relative: str, args: list[str], out_dir: Path, datasets_root
) -> tuple[Path, subprocess.CompletedProcess]:
    """Run a script into out_dir, assert that it succeeded, and return its one run folder."""
    result = run_script(relative, [*args, "--out-dir", str(out_dir)], datasets_root)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_dirs(out_dir)
    return run_dir, result


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    """Bad input: exit code 2 and one line on stderr that says what is wrong, no traceback."""
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr
    assert "Traceback" not in result.stderr


def assert_main_refuses(module, argv: list[str], capsys, message: str) -> None:
    """module.main(argv) in this process (as `python <script> argv` runs it): exit code 2 and one
    stderr line with message, before any training."""
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2, stderr
    assert stderr.strip().count("\n") == 0 and message in stderr, stderr


def start_script(relative: str, args: list[str], datasets_root) -> subprocess.Popen:
    """A script run in the background, stderr captured (for signals and kills)."""
    return subprocess.Popen(
        [sys.executable, str(REPO / relative), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=script_env(datasets_root),
        cwd=REPO,
    )


def load_run_file(path: Path) -> dict:
    """A run's .pt file (checkpoint.pt, final.pt, pretrain.pt) with its tensors on the CPU, whichever
    device wrote it, so tests compare it with CPU tensors on a GPU machine too."""
    return torch.load(path, map_location="cpu", weights_only=False)


def rows_in(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """For each row of rows [B, W], whether it is one of the rows of table [T, W] -> [B] bool."""
    return (rows[:, None, :] == table[None]).all(-1).any(1)


def checkpoint_position(run_dir: Optional[Path], since: float) -> Optional[tuple[str, int]]:
    """(phase, step) of run_dir/checkpoint.pt if it was written after `since`, else None."""
    path = None if run_dir is None else run_dir / "checkpoint.pt"
    if path is None or not path.exists() or path.stat().st_mtime < since:
        return None
    checkpoint = load_run_file(path)
    return checkpoint["phase"], checkpoint["step"]


def wait_for_checkpoint(
    process: subprocess.Popen, out_dir: Path, phase: str, since: float, timeout: float = 300
) -> Path:
    """Wait until the run in out_dir, still running, has checkpointed after `since` at a step > 0
    of `phase`; its folder. Fails if the run ended first: a signal or kill would test nothing."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        folders = run_dirs(out_dir)
        position = checkpoint_position(folders[0], since) if folders else None
        if position is not None and position[0] == phase and position[1] > 0 and process.poll() is None:
            return folders[0]
        if process.poll() is not None:
            raise AssertionError(
                f"the run ended (exit {process.returncode}) before a {phase} checkpoint could be interrupted: {process.stderr.read()[-2000:]}"
            )
        time.sleep(0.02)
    raise AssertionError(f"no {phase} checkpoint within {timeout} s")


def kill_and_resume(
    relative: str, args: list[str], out_dir: Path, datasets_root, phases: dict[str, int], seed: int
) -> Path:
    """Run a script, SIGKILL it at random moments (a random delay after a checkpoint past the
    start of the phase) the given number of times in each phase, resume it with --resume each
    time, and let the last process finish; the run folder. Every resumed process must continue
    where a checkpoint left it, never from the start of the run."""
    rng = random.Random(seed)
    since, process = time.time(), start_script(relative, [*args, "--out-dir", str(out_dir)], datasets_root)
    logs = []
    for phase, kills in phases.items():
        for _ in range(kills):
            run_dir = wait_for_checkpoint(process, out_dir, phase, since)
            time.sleep(rng.uniform(0.0, 0.15))
            process.kill()  # a no-op if it has just ended
            process.wait()
            logs.append(process.stderr.read())
            since, process = time.time(), start_script(relative, ["--resume", str(run_dir)], datasets_root)
    logs.append(process.stderr.read())
    assert process.wait(timeout=600) == 0, logs[-1][-3000:]
    for stderr in logs[1:]:  # the resumed processes
        phase, step = re.search(r"(\w+) from step (\d+)", stderr).groups()
        assert (phase, int(step)) != (next(iter(phases)), 0), "a resumed process started the run again"
    (run_dir,) = run_dirs(out_dir)
    return run_dir


def same_run(a: Path, b: Path) -> None:
    """Two runs wrote the same metrics.jsonl and ended with the same agent: every network and
    optimiser tensor of final.pt equal."""
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    agent_a, agent_b = (load_run_file(run / "final.pt")["agent"] for run in (a, b))
    assert agent_a.keys() == agent_b.keys() and "actor" in agent_a  # and "critic" in all files but odt.py
    tensors = load_script("algorithms/so2.py").tensors  # the nested state dict's tensors, in order
    for name in agent_a:
        tensors_a, tensors_b = tensors(agent_a[name]), tensors(agent_b[name])
        assert len(tensors_a) == len(tensors_b) and all(torch.equal(x, y) for x, y in zip(tensors_a, tensors_b)), name


# The smallest run of each algorithm file (bad input, Adroit end to end).
_DATA = "--env walker2d-random --random-dataset-steps 1500 --eval-episodes 1 "
_PHASES = _DATA + "--pretrain-steps 4 --online-steps 4 "
_MLP = _PHASES + "--hidden-dims 16 --batch-size 4"  # td3_bc, iql, awac: one MLP size and a batch
TINY = {
    name: flags.split()
    for name, flags in {
        "so2": _PHASES + "--num-critics 2 --hidden-dim 16 --warmup-steps 2",
        "cal_ql": _PHASES + "--actor-hidden-dims 16 --critic-hidden-dims 16",
        "td3_bc": _MLP,
        "iql": _MLP,
        "awac": _MLP,
        "pex": _MLP + " --collection-steps 2",
        "off2on": _MLP + " --num-agents 2 --cql-n-actions 2 --epoch-steps 2 --weight-batch-size 2",
        "odt": _PHASES
        + "--embed-dim 8 --n-layers 1 --n-heads 1 --context-length 4 --eval-context-length 2 --batch-size 4",
        "rlpd": _DATA + "--hidden-dim 8 --num-critics 2 --online-steps 4 --start-training 2 --utd 1 --batch-size 4",
        "wsrl": _PHASES + "--hidden-dim 8 --num-critics 2 --cql-n-actions 2 --warmup-steps 2 --utd 1 --batch-size 4 "
        "--online-batch-size 4",
        "sac": "--env hopper --total-steps 4 --learning-starts 2 --eval-episodes 1 --hidden-dim 16",
    }.items()
}

# Flags a file needs on a domain where its release publishes no value (ODT's return-to-go targets,
# SO2's ensemble table), for the tiny runs.
DOMAIN_FLAGS = {
    ("odt", "adroit"): "--eval-rtg 3000 --online-rtg 6000",
    ("odt", "antmaze"): "--eval-rtg 1 --online-rtg 2",
}
DOMAIN_FLAGS[("so2", "antmaze")] = "--eta 1"


def tiny_args(name: str, env: str) -> list[str]:
    """TINY[name] on another env (sac.py: the env's base name, the others a dataset name), with the
    flags the file needs there."""
    args = list(TINY[name])
    base = env.partition("-")[0]
    args[args.index("--env") + 1] = base if name == "sac" else env
    domain = "adroit" if base in ("pen", "door") else base
    return args + DOMAIN_FLAGS.get((name, domain), "").split()


# Tiny runs of each algorithm file with phases long enough (hundreds of steps, a checkpoint every
# 25) for several kills and signals in each.
RESUME_ARGS = {
    "so2": (
        "--env walker2d-random --random-dataset-steps 1500 --num-critics 2 --hidden-dim 32 "
        "--pretrain-steps 600 --pretrain-eval-every 150 --batch-size 32 --online-steps 300 "
        "--warmup-steps 50 --utd 2 --online-batch-size 16 --mixed-batch-size 48 --eval-every 60 "
        "--eval-episodes 2 --mc-tail-steps 5 --kendall-windows 2 --checkpoint-every 25 --sera --sera-k 3"
    ).split(),
    "cal_ql": (
        "--env walker2d-random --random-dataset-steps 1500 --actor-hidden-dims 32 32 "
        "--critic-hidden-dims 32 32 --cql-n-actions 2 --pretrain-steps 300 --pretrain-eval-every 100 "
        "--batch-size 32 --online-steps 300 --eval-every 60 --eval-episodes 2 --mc-tail-steps 5 "
        "--kendall-windows 2 --checkpoint-every 25 --sera --sera-k 3"
    ).split(),
    "td3_bc": (
        "--env walker2d-random --random-dataset-steps 1500 --hidden-dims 32 32 --pretrain-steps 300 "
        "--pretrain-eval-every 100 --batch-size 32 --online-steps 300 --eval-every 60 --eval-episodes 2 "
        "--mc-tail-steps 5 --kendall-windows 2 --checkpoint-every 25 --sera --sera-k 3"
    ).split(),
    "iql": (
        "--env walker2d-random --random-dataset-steps 1500 --hidden-dims 32 32 --pretrain-steps 300 "
        "--pretrain-eval-every 100 --batch-size 32 --online-steps 300 --eval-every 60 --eval-episodes 2 "
        "--mc-tail-steps 5 --kendall-windows 2 --checkpoint-every 25 --mixing-ratio 0.5 --sera --sera-k 3"
    ).split(),
    "awac": (
        "--env walker2d-random --random-dataset-steps 1500 --hidden-dims 32 32 --pretrain-steps 300 "
        "--pretrain-eval-every 100 --batch-size 32 --online-steps 300 --eval-every 60 --eval-episodes 2 "
        "--mc-tail-steps 5 --kendall-windows 2 --checkpoint-every 25 --mixing-ratio 0.5 --sera --sera-k 3"
    ).split(),
    "pex": (
        "--env walker2d-random --random-dataset-steps 1500 --hidden-dims 32 32 --pretrain-steps 300 "
        "--pretrain-eval-every 100 --batch-size 32 --online-steps 300 --collection-steps 50 --eval-every 60 "
        "--eval-episodes 2 --mc-tail-steps 5 --kendall-windows 2 --checkpoint-every 25 --so2 --so2-utd 2"
    ).split(),
    "off2on": (
        "--env walker2d-random --random-dataset-steps 1500 --hidden-dims 32 32 --num-agents 2 --cql-n-actions 2 "
        "--cql-bc-steps 100 --pretrain-steps 300 --pretrain-eval-every 100 --batch-size 32 --weight-batch-size 16 "
        "--online-steps 300 --epoch-steps 50 --first-epoch-multiplier 2 --eval-every 60 --eval-episodes 2 "
        "--mc-tail-steps 5 --kendall-windows 2 --checkpoint-every 25 --so2 --so2-utd 2"
    ).split(),
    "odt": (
        "--env walker2d-random --random-dataset-steps 1500 --embed-dim 16 --n-layers 1 --n-heads 2 --context-length 6 "
        "--eval-context-length 3 --batch-size 16 --warmup-steps 100 --pretrain-steps 300 --pretrain-eval-every 100 "
        "--online-steps 300 --updates-per-iteration 10 --replay-size 200 --eval-every 60 --eval-episodes 2 "
        "--checkpoint-every 25"
    ).split(),
    "rlpd": (
        "--env walker2d-random --random-dataset-steps 1500 --hidden-dim 32 --num-critics 3 --online-steps 300 "
        "--start-training 50 --utd 2 --batch-size 32 --eval-every 60 --eval-episodes 2 --mc-tail-steps 5 "
        "--kendall-windows 2 --checkpoint-every 25"
    ).split(),
    "wsrl": (
        "--env walker2d-random --random-dataset-steps 1500 --num-critics 3 --hidden-dim 32 --cql-n-actions 2 "
        "--pretrain-steps 300 --pretrain-eval-every 100 --batch-size 32 --online-steps 300 --warmup-steps 50 --utd 2 "
        "--online-batch-size 32 --eval-every 50 --eval-episodes 2 --mc-tail-steps 5 --kendall-windows 2 "
        "--checkpoint-every 25"
    ).split(),
    "sac": (
        "--env hopper --total-steps 1200 --learning-starts 200 --eval-every 300 --eval-episodes 2 "
        "--hidden-dim 32 --batch-size 32 --checkpoint-every 25"
    ).split(),
}
PHASES = {
    "so2": ("pretrain", "finetune"),
    "cal_ql": ("pretrain", "finetune"),
    "td3_bc": ("pretrain", "finetune"),
    "iql": ("pretrain", "finetune"),
    "awac": ("pretrain", "finetune"),
    "pex": ("pretrain", "finetune"),
    "off2on": ("pretrain", "finetune"),
    "odt": ("pretrain", "finetune"),
    "rlpd": ("online",),
    "wsrl": ("pretrain", "finetune"),
    "sac": ("online",),
}
FILES = list(RESUME_ARGS)


def script(name: str) -> str:
    return f"algorithms/{name}.py"


@pytest.fixture(scope="session")
def reference(tmp_path_factory, datasets_root):
    """The uninterrupted run of each algorithm file with RESUME_ARGS, made once per test worker."""
    runs = {}

    def get(name):
        if name not in runs:
            out = tmp_path_factory.mktemp(f"reference_{name}")
            result = run_script(script(name), [*RESUME_ARGS[name], "--out-dir", str(out)], datasets_root)
            assert result.returncode == 0, result.stderr[-3000:]
            (runs[name],) = run_dirs(out)
        return runs[name]

    return get
