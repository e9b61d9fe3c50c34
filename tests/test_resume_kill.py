"""Exact resume after kill -9 in every algorithm file: SIGKILLs at random points, each followed by
--resume, give the same metrics.jsonl and the same final networks as the uninterrupted run."""

import json

import pytest

from conftest import FILES, PHASES, RESUME_ARGS, kill_and_resume, same_run, script


@pytest.mark.parametrize("name", FILES)
def test_kill_9_at_random_points_then_resume_equals_uninterrupted(name, reference, tmp_path, datasets_root):
    """3 SIGKILLs per phase, each at a random moment after a fresh checkpoint (inside a step, an
    evaluation or a checkpoint write), each followed by --resume: the same metrics.jsonl and the
    same final networks as the uninterrupted run."""
    run_dir = kill_and_resume(
        script(name), RESUME_ARGS[name], tmp_path, datasets_root, {phase: 3 for phase in PHASES[name]}, seed=len(name)
    )
    same_run(reference(name), run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
