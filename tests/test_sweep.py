"""scripts/sweep.py: expansion and dependency order, the local backend on a tiny grid (shared
pretraining, a failing run, a sweep stopped halfway and run again), and the submitit path with
submitit's local executor."""

import fcntl
import json
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO, load_script, script_env

# A tiny grid: walker2d-random (1,500 steps), 2 seeds, 2 finetuning variants from one shared
# pretraining per seed.
BASE = {
    "random_dataset_steps": 1500, "num_critics": 2, "hidden_dim": 16, "pretrain_steps": 40, "pretrain_eval_every": 20,
    "batch_size": 32, "online_steps": 40, "warmup_steps": 10, "online_batch_size": 16, "mixed_batch_size": 16,
    "eval_every": 20, "eval_episodes": 1, "mc_tail_steps": 5, "kendall_windows": 2, "checkpoint_every": 10,
}  # fmt: skip
VARIANTS = {"so2": {"sigma": 0.3, "utd": 2}, "sacn": {"sigma": 0.0, "utd": 1}}


def write_sweep(tmp_path, variants=VARIANTS, **extra) -> str:
    sweep = {
        "name": "tiny",
        "script": "algorithms/so2.py",
        "datasets": ["walker2d-random"],
        "seeds": [0, 1],
        "base": BASE,
        "variants": variants,
        "shared_pretraining": True,
        "retries": 0,
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return str(path)


def sweep_command(path: str, out, *flags) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "sweep.py"), path, "--out-dir", str(out), *flags]


def summaries(root) -> dict[str, dict]:
    return {str(p.parent.parent.relative_to(root)): json.loads(p.read_text()) for p in root.rglob("summary.json")}


def test_expansion_and_dependency_order(tmp_path):
    sweep = load_script("scripts/sweep.py")
    specs = sweep.expand(yaml.safe_load(open(write_sweep(tmp_path))), tmp_path / "tiny")
    assert [s.id for s in specs] == [
        "walker2d-random/pretrain/seed0", "walker2d-random/so2/seed0", "walker2d-random/sacn/seed0",
        "walker2d-random/pretrain/seed1", "walker2d-random/so2/seed1", "walker2d-random/sacn/seed1",
    ]  # fmt: skip
    pretrain, so2 = specs[0], specs[1]
    assert pretrain.values["online_steps"] == 0 and pretrain.depends is None
    assert so2.depends is pretrain and so2.values["sigma"] == 0.3 and so2.values["utd"] == 2 and so2.values["seed"] == 0
    assert so2.folder == tmp_path / "tiny" / "walker2d-random" / "so2" / "seed0"
    with pytest.raises(sweep.SweepError, match="lacks datasets"):
        sweep.expand({"name": "x", "script": "algorithms/so2.py", "seeds": [0], "variants": {}}, tmp_path)


def test_local_sweep_runs_the_grid_reports_a_failure_and_resumes(tmp_path, datasets_root):
    """2 seeds x (pretraining + 2 variants + 1 failing variant). The failing run is reported with its
    error and does not stop the others. A sweep stopped halfway and run again completes only the
    missing runs."""
    variants = {**VARIANTS, "broken": {"sigma": -1.0}}
    path = write_sweep(tmp_path, variants=variants)
    env = script_env(datasets_root)
    process = subprocess.Popen(
        sweep_command(path, tmp_path / "out"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    root = tmp_path / "out" / "tiny"
    deadline = time.time() + 300
    while len(summaries(root)) < 2 and time.time() < deadline:  # stop it once the pretrainings are done
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1 and "sweep stopped by signal" in stderr, stderr[-3000:]
    before = {k: v for k, v in summaries(root).items() if v["status"] == "finished"}
    assert {"walker2d-random/pretrain/seed0", "walker2d-random/pretrain/seed1"} <= set(before)
    mtimes = {
        p: p.stat().st_mtime for p in root.rglob("summary.json") if json.loads(p.read_text())["status"] == "finished"
    }

    result = subprocess.run(
        sweep_command(path, tmp_path / "out"), capture_output=True, text=True, env=env, cwd=REPO, timeout=600
    )
    assert result.returncode == 1  # the broken variant failed
    assert result.stderr.count("FAILED walker2d-random/broken/seed") == 2
    assert "sigma must be >= 0" in result.stderr and "logs/attempt-" in result.stderr
    after = summaries(root)
    finished = {k for k, v in after.items() if v["status"] == "finished"}
    assert finished == {f"walker2d-random/{v}/seed{s}" for v in ("pretrain", "so2", "sacn") for s in (0, 1)}
    assert all(p.stat().st_mtime == t for p, t in mtimes.items())  # finished runs were not run again
    assert "2 failed" in result.stderr.splitlines()[-1]
    # Finetunings started from their own seed's pretraining.
    so2_config = yaml.safe_load((root / "walker2d-random" / "so2" / "seed1" / "sweep_config.yaml").read_text())
    assert "/pretrain/seed1/" in so2_config["pretrained"]


def test_submitit_local_executor_runs_a_tiny_sweep(tmp_path, datasets_root):
    path = write_sweep(tmp_path, variants={"so2": VARIANTS["so2"]}, seeds=[0], slurm={"time_min": 10})
    result = subprocess.run(
        sweep_command(path, tmp_path / "out", "--backend", "submitit-local"),
        capture_output=True,
        text=True,
        env=script_env(datasets_root),
        cwd=REPO,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    after = summaries(tmp_path / "out" / "tiny")
    assert {k: v["status"] for k, v in after.items()} == {
        "walker2d-random/pretrain/seed0": "finished",
        "walker2d-random/so2/seed0": "finished",
    }


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_committed_sweep_files_expand_to_valid_configs(path, tmp_path):
    """Every run of the committed sweeps has values that are fields of its algorithm's Config and
    pass its checks."""
    sweep = load_script("scripts/sweep.py")
    spec = yaml.safe_load(path.read_text())
    algo = load_script(spec["script"])
    specs = sweep.expand(spec, tmp_path)
    per_seed = len(spec["variants"]) + (1 if spec.get("shared_pretraining") else 0)
    assert len(specs) == len(spec["datasets"]) * len(spec["seeds"]) * per_seed
    for run in specs:
        algo.resolve_config(algo.Config(**{**run.values, "out_dir": str(tmp_path)}))


def test_a_damaged_summary_resumes_and_a_folder_in_use_is_not_a_failure(tmp_path, datasets_root):
    """A finished run whose summary.json was half copied is reported and resumed (which rewrites the
    summary); a run whose folder another process holds is reported as in use, not failed or retried."""
    path = write_sweep(tmp_path, variants={"so2": VARIANTS["so2"]}, seeds=[0], shared_pretraining=False)
    env = script_env(datasets_root)

    def sweep():
        command = sweep_command(path, tmp_path / "out")
        return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)

    assert sweep().returncode == 0
    (summary,) = (tmp_path / "out" / "tiny").rglob("summary.json")
    text = summary.read_text()
    summary.write_text(text[: len(text) // 2])
    result = sweep()
    assert result.returncode == 0 and "damaged summary.json in" in result.stderr, result.stderr[-3000:]
    assert json.loads(summary.read_text())["status"] == "finished"

    summary.write_text(json.dumps({**json.loads(summary.read_text()), "status": "interrupted"}))
    with open(summary.parent / ".lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a live run of that folder holds it
        result = sweep()
    assert result.returncode == 1 and "IN USE walker2d-random/so2/seed0" in result.stderr, result.stderr[-3000:]
    assert "FAILED" not in result.stderr and "retrying" not in result.stderr
    assert "1 in use by another process" in result.stderr.splitlines()[-1]


SWEEP_FILES = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_every_shipped_sweep_expands_to_valid_configs(path, tmp_path):
    """Each run of a shipped (pre-registered) sweep file is a config its algorithm file accepts, so a
    typo in a study's settings fails here, not hours into the study."""
    sweep_py = load_script("scripts/sweep.py")
    sweep = yaml.safe_load(path.read_text())
    algo = load_script(sweep["script"])
    specs = sweep_py.expand(sweep, tmp_path)
    assert specs
    for spec in specs:
        config = tmp_path / "values.yaml"
        config.write_text(yaml.safe_dump(spec.values))
        cfg = algo.resolve_config(algo.parse_args(["--config", str(config)])[0])
        assert {k: getattr(cfg, k) for k in spec.values} == {
            k: tuple(v) if isinstance(v, list) else v for k, v in spec.values.items()
        }
