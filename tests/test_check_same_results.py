"""scripts/check_same_results.py's comparison: bit for bit, every kind of entry, renames only through KEY_MAP."""

import fcntl
import hashlib
import tempfile
from pathlib import Path

import numpy as np
import torch

from conftest import load_script

check = load_script("scripts/check_same_results.py")


def test_identical_structures_have_no_difference():
    a = {"agent": {"w": torch.arange(3.0), "state": {0: {"step": torch.tensor(2.0)}}}, "records": [{"x": 1.5}]}
    b = {"agent": {"w": torch.arange(3.0), "state": {0: {"step": torch.tensor(2.0)}}}, "records": [{"x": 1.5}]}
    assert check.compare(a, b) == []


def test_every_kind_of_difference_is_found():
    a = {"t": torch.zeros(2), "d": torch.zeros(2), "s": torch.zeros(2), "n": np.zeros(2), "v": 1, "l": [1, 2], "k": 0}
    b = {"t": torch.tensor([0.0, 1e-12]), "d": torch.zeros(2, dtype=torch.float64), "s": torch.zeros(1, 2),
         "n": np.ones(2), "v": 1.0, "l": [1, 2, 3], "extra": 0}  # fmt: skip
    assert sorted(check.compare(a, b)) == sorted(
        ["/t", "/d", "/s", "/n", "/v", "/l (length or type)", "/k (only in one)", "/extra (only in one)"]
    )


def test_key_map_renames_a_stated_entry_only(monkeypatch):
    monkeypatch.setattr(check, "KEY_MAP", {"/agent/old": "/agent/new"})
    assert check.compare({"agent": {"old": torch.ones(1)}}, {"agent": {"new": torch.ones(1)}}) == []
    assert check.compare({"agent": {"other": torch.ones(1)}}, {"agent": {"new": torch.ones(1)}}) != []


def test_a_second_check_on_the_same_tree_is_refused_in_one_line(capsys):
    """Both sides write their runs under the tree's check_runs/: a check started beside a running one
    stops at once with exit code 2, before it touches anything."""
    key = hashlib.blake2b(str(check.REPO).encode(), digest_size=6).hexdigest()
    with open(Path(tempfile.gettempdir()) / f"check_same_results_{key}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running check holds it
        assert check.main(check.Args(ref="HEAD")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "another check is running" in err
    assert not (check.REPO / "check_runs").exists()
