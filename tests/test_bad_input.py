"""Bad input to any script: one line on stderr, exit code 2, no run folder, and no compute spent
first. A damaged dataset store says how to make the dataset again; a killed or concurrent
dataset write leaves nothing behind."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, TINY, assert_main_refuses, assert_one_line_error, load_script, run_script, script_env

# Two float fields of each file for the finite-number checks (odt.py has no discount or target rate).
FLOATS = {**dict.fromkeys(TINY, ("gamma", "tau")), "odt": ("lr", "dropout")}
# (flags, message) that every algorithm file refuses; {0} and {1} are the file's FLOATS.
COMMON = [
    (["--{0}", "nan"], "{0} must be a finite float, got nan"),
    (["--{1}", "inf"], "{1} must be a finite float, got inf"),
    (["--seed", "-1"], "seed must be in [0, 2^31)"),
    (["--eval-episodes", "100000"], "eval_episodes must be in [1, 1000]"),
    (["--checkpoint-every", "0"], "checkpoint_every must be >= 1"),
    (["--run-name", "a/b"], "run_name may hold letters, digits"),
    (["--device", "cuda:7"], "device 'cuda:7' is not usable"),
    (["--device", "meta"], "device 'meta' is not usable: expected cpu or cuda"),
    (["--batch-size", "100000000"], "1000000]"),
    (["--config", "/nonexistent/file.yaml"], "cannot use config file"),
]


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("flags,message", COMMON, ids=[m.split()[0] for _, m in COMMON])
def test_common_bad_values(name, flags, message, tmp_path, capsys):
    flags = [flag.format(*(f.replace("_", "-") for f in FLOATS[name])) for flag in flags]
    assert_main_refuses(
        load_script(f"algorithms/{name}.py"),
        [*TINY[name], "--out-dir", str(tmp_path / "runs"), *flags],
        capsys,
        message.format(*FLOATS[name]),
    )
    assert not (tmp_path / "runs").exists()


def test_bad_value_as_a_user_sees_it(tmp_path, datasets_root):
    """The same refusal through the command line: one line, exit code 2, nothing written."""
    result = run_script(
        "algorithms/so2.py", [*TINY["so2"], "--out-dir", str(tmp_path / "runs"), "--gamma", "nan"], datasets_root
    )
    assert_one_line_error(result, "gamma must be a finite float, got nan")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("so2", "utd: 2.5\n", "config file '{path}': utd must be int, got 2.5"),
        ("cal_ql", "actor_hidden_dims: [16, 1.5]\n", "actor_hidden_dims must be tuple[int, ...], got (16, 1.5)"),
        ("sac", "total_steps: ten\n", "total_steps must be int, got 'ten'"),
        ("so2", "- a list\n", "expected a mapping of field names to values"),
        ("so2", "no_such_field: 1\n", "unexpected keyword argument 'no_such_field'"),
    ],
)
def test_config_file_with_wrong_types_is_refused_before_any_compute(name, text, message, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert_main_refuses(
        load_script(f"algorithms/{name}.py"),
        [*TINY[name], "--out-dir", str(tmp_path / "runs"), "--config", str(path)],
        capsys,
        message.format(path=path),
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", TINY)
def test_out_dir_that_is_a_file(name, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert_main_refuses(
        load_script(f"algorithms/{name}.py"),
        [*TINY[name], "--out-dir", str(tmp_path / "file" / "runs")],
        capsys,
        f"'{tmp_path / 'file'}' is a file, not a folder",
    )


@pytest.mark.parametrize("name", ["so2", "cal_ql"])
def test_datasets_path_that_is_a_file(name, tmp_path, capsys, monkeypatch):
    (tmp_path / "store").write_text("")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "store"))
    assert_main_refuses(
        load_script(f"algorithms/{name}.py"),
        [*TINY[name], "--out-dir", str(tmp_path / "runs")],
        capsys,
        f"MINARI_DATASETS_PATH '{tmp_path / 'store'}' is a file, not a folder",
    )
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def store_copy(so2, datasets_root, tmp_path, monkeypatch):
    """A private copy of the datasets store holding the tiny walker2d-random set."""
    so2.load_dataset("walker2d", "random", 1500)
    shutil.copytree(datasets_root, tmp_path / "store")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "store"))
    return tmp_path / "store" / "local" / "walker2d" / "random-n1500-v0"


def test_truncated_or_missing_data_file_says_how_to_regenerate(so2, store_copy, tmp_path, capsys):
    data = store_copy / "data" / "main_data.hdf5"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    argv = [*TINY["so2"], "--out-dir", str(tmp_path / "runs")]
    assert_main_refuses(
        so2,
        argv,
        capsys,
        f"delete {store_copy} and make it again with: python scripts/make_dataset.py walker2d-random --steps 1500",
    )
    data.unlink()
    assert_main_refuses(
        so2, argv, capsys, "dataset local/walker2d/random-n1500-v0 is damaged (data/main_data.hdf5 is missing)"
    )
    assert not (tmp_path / "runs").exists()


def test_garbage_cache_is_a_cache_miss(so2, store_copy):
    (store_copy / "flat_cache.npz").write_bytes(b"garbage" * 100)
    arrays, _ = so2.load_dataset("walker2d", "random", 1500)
    assert len(arrays["rewards"]) == 1500
    assert so2.read_flat_cache("local/walker2d/random-n1500-v0") is not None  # rewritten


def test_read_only_store_without_cache_still_loads(so2, store_copy, monkeypatch):
    (store_copy / "flat_cache.npz").unlink()

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(so2.np, "savez", read_only)
    arrays, _ = so2.load_dataset("walker2d", "random", 1500)
    assert len(arrays["rewards"]) == 1500 and not (store_copy / "flat_cache.npz").exists()
    assert not list(store_copy.glob(".flat_cache*"))


def make_random(steps: int, root, **popen) -> subprocess.Popen:
    env = {**script_env(root), "MINARI_DATASETS_PATH": str(root)}
    return subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "make_dataset.py"), "hopper-random", "--steps", str(steps)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
        **popen,
    )


def test_two_first_time_generations_make_the_dataset_once(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    (root / ".tmp-999999999").mkdir()  # left by a killed write (no such process)
    (root / f".tmp-{os.getpid()}").mkdir()  # a live process's write in progress: kept
    processes = [make_random(3000, root) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert all("local/hopper/random-n3000-v0: " in out for out, _ in outputs)
    assert (root / "local" / "hopper" / "random-n3000-v0" / "data" / "main_data.hdf5").is_file()
    assert sorted(p.name for p in root.glob(".tmp-*")) == [f".tmp-{os.getpid()}"]


def test_ctrl_c_during_generation_leaves_nothing(tmp_path):
    """Ctrl-C in a terminal reaches the whole process group: so2.py and the generator it runs."""
    root = tmp_path / "store"
    env = {**script_env(root), "MINARI_DATASETS_PATH": str(root)}
    process = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "algorithms" / "so2.py"),
            *TINY["so2"],
            "--random-dataset-steps",
            "400000",
            "--out-dir",
            str(tmp_path / "runs"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not list(root.glob(".lock-*")) and time.time() < deadline:  # the generator has started
        time.sleep(0.05)
    time.sleep(1.0)
    assert process.poll() is None, "generation ended before the signal"
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert "make_dataset.py: interrupted; no dataset was written" in stderr
    assert not (root / "local" / "walker2d" / "random-n400000-v0").exists() and not list(root.glob(".tmp-*"))
    assert not (tmp_path / "runs").exists()


def test_missing_dataset_offline_fails_at_once(tmp_path):
    """Without a network the hub's name does not resolve; the error must not wait for the
    download's retries (HF_HUB_OFFLINE unset, as for a user)."""
    env = {k: v for k, v in script_env(tmp_path).items() if k != "HF_HUB_OFFLINE"}
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "algorithms" / "so2.py"),
            "--env",
            "hopper-medium",
            "--out-dir",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert_one_line_error(
        result, "It is unavailable offline; generate it with: python scripts/make_dataset.py hopper-medium"
    )


def test_flat_cache_round_trip_keeps_dtypes(so2, store_copy):
    arrays, _ = so2.load_dataset("walker2d", "random", 1500)
    assert all(a.dtype == np.float32 for a in arrays.values())
