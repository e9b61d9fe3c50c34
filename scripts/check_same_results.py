"""Prove that a change to the algorithm files changed no number. Tiny fixed-seed runs of every algorithm file and
its main variants run in a git worktree of REF and in the working tree, on this machine, from one dataset folder.
Every metrics.jsonl record and every entry of final.pt are compared bit for bit.

  python scripts/check_same_results.py HEAD~3               # one line per run: identical, or what differs
  python scripts/check_same_results.py main --only so2 sac  # the runs whose name starts with so2 or sac

Runs are bit-reproducible on one CPU type only, so both sides run here, one after the other, and no golden
number is stored. Tensors must be torch.equal with the same dtype and shape, other entries equal; there is no
tolerance. KEY_MAP states the entries a refactor renamed. Exit code 0 when every run is identical, 1 otherwise.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

REPO = Path(__file__).resolve().parent.parent
DATA = "--env walker2d-random --random-dataset-steps 1500 --device cpu --seed 3 --eval-episodes 2"
Q = "--mc-tail-steps 5 --kendall-windows 2"
SMALL = f"{DATA} {Q} --pretrain-steps 60 --pretrain-eval-every 30 --batch-size 32 --online-steps 60 --eval-every 30"
SO2 = f"{SMALL} --num-critics 3 --hidden-dim 32 --warmup-steps 20 --utd 2 --online-batch-size 16 --mixed-batch-size 48"
CAL_QL = f"{SMALL} --actor-hidden-dims 32 32 --critic-hidden-dims 32 32 --cql-n-actions 3"
HIDDEN = f"{SMALL} --hidden-dims 32 32"
OFF2ON = f"{HIDDEN} --num-agents 2 --cql-n-actions 2 --cql-bc-steps 20 --weight-batch-size 16 --epoch-steps 30"
ODT = (
    f"{DATA} --embed-dim 16 --n-layers 1 --n-heads 2 --context-length 6 --eval-context-length 3 --batch-size 16 "
    "--warmup-steps 20 --pretrain-steps 60 --pretrain-eval-every 30 --online-steps 300 --updates-per-iteration 5 "
    "--replay-size 200 --eval-every 150"
)
# name -> (algorithm file, arguments): the defaults and main variants of every file.
RUNS = {
    "so2": ("so2", SO2),
    "so2_sigma0_utd1": ("so2", f"{SO2} --sigma 0 --utd 1"),
    "so2_target_min": ("so2", f"{SO2} --target min"),
    "so2_union": ("so2", f"{SO2} --batch-mode union"),
    "so2_sera": ("so2", f"{SO2} --sera --sera-k 3"),
    "cal_ql": ("cal_ql", CAL_QL),
    "cal_ql_cql": ("cal_ql", f"{CAL_QL} --no-calibrate"),
    "cal_ql_loose": ("cal_ql", f"{CAL_QL} --loose"),
    "cal_ql_sera": ("cal_ql", f"{CAL_QL} --sera --sera-k 3"),
    "td3_bc": ("td3_bc", HIDDEN),
    "td3_bc_loose": ("td3_bc", f"{HIDDEN} --loose"),
    "iql": ("iql", f"{HIDDEN} --mixing-ratio 0.5"),
    "awac": ("awac", f"{HIDDEN} --mixing-ratio 0.5"),
    "pex": ("pex", f"{HIDDEN} --collection-steps 20"),
    "pex_so2": ("pex", f"{HIDDEN} --collection-steps 20 --so2 --so2-utd 2"),
    "off2on": ("off2on", OFF2ON),
    "off2on_so2": ("off2on", f"{OFF2ON} --so2 --so2-utd 2"),
    "odt": ("odt", ODT),
    "rlpd": ("rlpd", f"{DATA} {Q} --hidden-dim 32 --num-critics 3 --online-steps 120 --start-training 40 --utd 2 "
             "--batch-size 32 --eval-every 60"),
    "wsrl": ("wsrl", f"{SMALL} --num-critics 3 --hidden-dim 32 --cql-n-actions 2 --warmup-steps 20 --utd 2 "
             "--online-batch-size 32"),
    "sac": ("sac", "--env hopper --device cpu --seed 3 --total-steps 600 --learning-starts 200 --eval-every 300 "
            "--eval-episodes 2 --hidden-dim 32 --batch-size 32"),
}  # fmt: skip
# Entries renamed on purpose since REF: "old path" -> "new path" (paths as compare() prints them).
KEY_MAP: dict[str, str] = {}


@dataclass
class Args:
    ref: tyro.conf.Positional[str]
    """The commit to compare with (any git revision)."""
    only: tuple[str, ...] = ()
    """Only the runs whose name starts with one of these (e.g. so2 cal_ql); all by default."""
    keep: bool = False
    """Keep the worktree, the run folders and the datasets (their folder is printed)."""


def run(tree: Path, name: str, env: dict) -> Path:
    """One tiny run of RUNS[name] in tree; its run folder. The output folder is relative to the tree, so the
    config stored in final.pt is the same on both sides."""
    algo, args = RUNS[name]
    out = Path("check_runs") / name
    shutil.rmtree(tree / out, ignore_errors=True)
    command = [sys.executable, f"algorithms/{algo}.py", *args.split(), "--out-dir", str(out)]
    result = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"exit {result.returncode}: {(result.stderr.strip().splitlines() or [''])[-1][:300]}")
    (folder,) = (tree / out).iterdir()
    return folder


def compare(a, b, path: str = "") -> list[str]:
    """The paths at which two nested structures differ, bit for bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [path]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        same = type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        renamed = {KEY_MAP[f"{path}/{k}"].rsplit("/", 1)[1] if f"{path}/{k}" in KEY_MAP else k: v for k, v in a.items()}
        missing = [f"{path}/{k} (only in one)" for k in renamed.keys() ^ b.keys()]
        return missing + [d for k in renamed.keys() & b.keys() for d in compare(renamed[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return [f"{path} (length or type)"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in compare(x, y, f"{path}[{i}]")]
    return [] if type(a) is type(b) and a == b else [path]


def differences(ref: Path, new: Path) -> list[str]:
    records = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (ref, new)]
    finals = [torch.load(d / "final.pt", map_location="cpu", weights_only=False) for d in (ref, new)]
    return [f"metrics.jsonl{p}" for p in compare(*records)] + [f"final.pt{p}" for p in compare(*finals)]


def main(args: Args) -> int:
    names = [n for n in RUNS if not args.only or n.startswith(tuple(args.only))]
    if not names:
        print(f"check_same_results.py: error: no run starts with {' or '.join(args.only)}", file=sys.stderr)
        return 2
    sha = subprocess.run(
        ["git", "rev-parse", "--verify", f"{args.ref}^{{commit}}"], cwd=REPO, capture_output=True, text=True
    )
    if sha.returncode != 0:
        print(f"check_same_results.py: error: '{args.ref}' is not a commit of this repository", file=sys.stderr)
        return 2
    # Both sides write their runs under check_runs/ of their tree: one check per working tree at a time.
    lock = open(
        Path(tempfile.gettempdir())
        / f"check_same_results_{hashlib.blake2b(str(REPO).encode(), digest_size=6).hexdigest()}.lock",
        "a",
    )
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"check_same_results.py: error: another check is running on {REPO}; wait for it", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="check_same_results_"))
    ref_tree = work / "ref"
    subprocess.run(["git", "worktree", "add", "--detach", str(ref_tree), sha.stdout.strip()], cwd=REPO, check=True,
                   capture_output=True)  # fmt: skip
    env = {**os.environ, "MINARI_DATASETS_PATH": str(work / "datasets"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fmt: skip
    print(f"reference {args.ref} = {sha.stdout.strip()[:12]}; working tree {REPO}", flush=True)
    failed = 0
    try:
        for name in names:
            try:
                diff = differences(run(ref_tree, name, env), run(REPO, name, env))
            except RuntimeError as exc:
                diff = [f"run failed: {exc}"]
            failed += bool(diff)
            # the same difference in every record is one pattern: metrics.jsonl[*]/key (n)
            patterns = Counter(re.sub(r"\[\d+\]", "[*]", d) for d in diff)
            shown = ", ".join(f"{k} ({n})" if n > 1 else k for k, n in patterns.items())
            print(f"{name:18} {'identical' if not diff else 'DIFFERS: ' + shown}", flush=True)
    finally:
        shutil.rmtree(REPO / "check_runs", ignore_errors=True)
        if args.keep:
            print(f"kept in {work}")
        else:
            subprocess.run(["git", "worktree", "remove", "--force", str(ref_tree)], cwd=REPO, capture_output=True)
            shutil.rmtree(work, ignore_errors=True)
    print(f"{len(names) - failed} of {len(names)} runs identical")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
