"""scripts/report.py on synthetic run folders: the figures exist, and the table's numbers equal a
hand computation."""

import json

import numpy as np
import pytest
import yaml

from conftest import load_script, run_script

# The record keys after normalized_score (the Q diagnostics and losses).
RECORD_KEYS = load_script("algorithms/so2.py").RECORD_KEYS
KEYS = RECORD_KEYS[RECORD_KEYS.index("normalized_score") + 1 :]


def score(variant: str, seed: int, step: int) -> float:
    return {"so2": 10.0, "sacn": 5.0, "odt": 2.0}[variant] + seed + step / 1000


def write_run(folder, env: str, variant: str, seed: int, q_value=0.1, scores=None) -> None:
    """q_value None: the Q-diagnostic keys are null, as in the records of a method without a Q function.
    scores: {online env step: normalised score} of the finetuning records (default: score() at 0, 1,000, 2,000)."""
    scores = {step: score(variant, seed, step) for step in (0, 1000, 2000)} if scores is None else scores
    folder.mkdir(parents=True)
    records = [
        {
            "phase": "pretrain",
            "step": 100,
            "env_steps": 0,
            "return": 0.0,
            "return_std": 0.0,
            "normalized_score": 1.0,
            **dict.fromkeys(KEYS, q_value),
        }
    ]
    for step, value in scores.items():
        records.append(
            {
                "phase": "finetune",
                "step": step * 10,
                "env_steps": step,
                "return": 0.0,
                "return_std": 0.0,
                "normalized_score": value,
                **dict.fromkeys(KEYS, None if q_value is None else q_value * seed),
            }
        )
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "config.yaml").write_text(yaml.safe_dump({"env": env, "seed": seed, "run_name": variant}))
    (folder / "summary.json").write_text(
        json.dumps({"status": "finished", "wall_time_s": 100.0 + seed, "pretrain_time_s": 40.0})
    )


@pytest.fixture
def sweep(tmp_path):
    for env in ("hopper-random", "walker2d-random"):
        for variant in ("so2", "sacn"):
            for seed in range(3):
                write_run(
                    tmp_path / "runs" / env / variant / f"seed{seed}" / f"{env}__so2-{variant}__{seed}__1",
                    env,
                    variant,
                    seed,
                )
    pretraining = tmp_path / "runs" / "hopper-random" / "pretrain" / "seed0" / "hopper-random__so2-pretrain__0__1"
    write_run(pretraining, "hopper-random", "pretrain", 0, scores={})  # pretraining records only
    (tmp_path / "runs" / "unfinished").mkdir()
    (tmp_path / "runs" / "unfinished" / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    return tmp_path


def test_report_figures_table_and_aggregate(sweep, datasets_root):
    out = sweep / "report"
    result = run_script(
        "scripts/report.py",
        [str(sweep / "runs"), "--out", str(out), "--budgets", "1000", "--reps", "200"],
        datasets_root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "report of 12 runs" in result.stdout  # the pretraining-only run is not a finetuning result
    for name in (
        "curves_env_steps.png",
        "curves_wall_clock.png",
        "q_diagnostics.png",
        "aggregate.png",
        "curves_pretraining.png",
    ):
        assert (out / name).stat().st_size > 10_000, name
    rows = {
        tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[1:-1]]
        for line in (out / "table.md").read_text().splitlines()[2:]
    }
    # so2 on hopper: seeds 0, 1, 2 -> pretrained 10, 11, 12; final 12, 13, 14; at 1,000 steps 11, 12, 13.
    finals = np.array([score("so2", s, 2000) for s in range(3)])
    assert rows[("hopper-random", "so2")] == [
        "hopper-random",
        "so2",
        "3",
        "11.0 ± 1.0",
        f"{finals.mean():.1f} ± {finals.std(ddof=1):.1f}",
        "13.0 ± 1.0",
        "12.0 ± 1.0",  # the mean of the last 3 evaluations (11 + seed)
        "12.0 ± 1.0",
        "n/a",  # these synthetic records have no episode_length
        "n/a",
        "61",
    ]
    assert rows[("walker2d-random", "sacn")][4] == "8.0 ± 1.0"
    aggregate = json.loads((out / "aggregate.json").read_text())
    assert aggregate["runs_per_dataset"] == 3 and aggregate["iqm"]["so2"]["value"] == pytest.approx(13.0)
    # so2 beats sacn in every pair of runs: P(so2 > sacn) = 1.
    assert aggregate["probability_of_improvement"]["so2 > sacn"]["value"] == pytest.approx(1.0)


def test_bootstrap_ci_brackets_the_mean():
    report = load_script("scripts/report.py")
    low, high = report.bootstrap_ci(np.array([1.0, 2.0, 3.0, 10.0]), np.random.default_rng(0))
    assert 1.0 <= low < 4.0 < high <= 10.0


def test_no_runs_is_a_one_line_error(tmp_path, datasets_root):
    result = run_script("scripts/report.py", [str(tmp_path)], datasets_root)
    assert result.returncode == 2 and "no finished run folders" in result.stderr and "Traceback" not in result.stderr


def report_of(tmp_path, datasets_root):
    """report.py on tmp_path/runs into tmp_path/report; its finished process."""
    result = run_script("scripts/report.py", [str(tmp_path / "runs"), "--out", str(tmp_path / "report")], datasets_root)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_runs_without_q_function_get_no_q_figure(tmp_path, datasets_root):
    for seed in range(2):
        write_run(tmp_path / "runs" / f"seed{seed}", "hopper-random", "odt", seed, q_value=None)
    (tmp_path / "report").mkdir()
    for name in ("q_diagnostics.png", "q_table.md"):
        (tmp_path / "report" / name).write_bytes(b"from an earlier report")
    result = report_of(tmp_path, datasets_root)
    assert "no Q diagnostics in these runs" in result.stdout and "Warning" not in result.stderr
    assert (tmp_path / "report" / "curves_env_steps.png").exists()
    assert not (tmp_path / "report" / "q_diagnostics.png").exists()
    assert not (tmp_path / "report" / "q_table.md").exists()


def test_runs_with_and_without_q_function_in_one_report(tmp_path, datasets_root):
    """The Q figure shows the runs that have Q values; a dataset panel holding only runs without
    them stays empty, and the figure still gets its legend."""
    (tmp_path / "report").mkdir()
    for seed in range(2):
        write_run(tmp_path / "runs" / f"so2{seed}", "hopper-random", "so2", seed)
        write_run(tmp_path / "runs" / f"odt{seed}", "walker2d-random", "odt", seed, q_value=None)
    result = report_of(tmp_path, datasets_root)
    assert "No artists" not in result.stderr and "Warning" not in result.stderr
    assert (tmp_path / "report" / "q_diagnostics.png").stat().st_size > 10_000


def test_q_table_averages_evaluations_from_q_from(tmp_path, datasets_root):
    """Per run, the mean over evaluations at env steps >= --q-from (nulls skipped); then mean ± std
    over seeds. kendall_tau = env_steps / 1000 + seed at 0, 1,000, 2,000 steps; q_bias null at 0."""
    for seed in range(2):
        folder = tmp_path / "runs" / f"seed{seed}"
        write_run(folder, "hopper-random", "so2", seed)
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        for r in records[1:]:
            r["kendall_tau"] = r["env_steps"] / 1000 + seed
            r["q_bias"] = None if r["env_steps"] == 0 else r["env_steps"] / 1000
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def row(*flags):
        result = run_script(
            "scripts/report.py",
            [str(tmp_path / "runs"), "--out", str(tmp_path / "report"), "--reps", "50", *flags],
            datasets_root,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        head, _, line = (tmp_path / "report" / "q_table.md").read_text().splitlines()
        return dict(zip((c.strip() for c in head.split("|")[1:-1]), (c.strip() for c in line.split("|")[1:-1])))

    # All evaluations: tau run means 1.0 and 2.0; q_bias (1 + 2) / 2 = 1.5 in both runs; the
    # other keys are write_run's constant 0.1 * seed: run means 0.0 and 0.1.
    assert row() == {
        "dataset": "hopper-random",
        "variant": "so2",
        "n": "2",
        "q_bias": "1.50 ± 0.00",
        "q_bias_min": "0.05 ± 0.07",
        "kendall_tau": "1.50 ± 0.71",
        "q_std_policy": "0.05 ± 0.07",
    }
    # From 1,000 steps: tau run means 1.5 and 2.5.
    assert row("--q-from", "1000")["kendall_tau"] == "2.00 ± 0.71"


def damage(folder, name: str) -> None:
    """A half-copied file: its first half only (a JSON line or document cut in the middle)."""
    text = (folder / name).read_text()
    (folder / name).write_text(text[: len(text) // 2])


@pytest.mark.parametrize("name", ["metrics.jsonl", "summary.json"])
def test_a_damaged_run_is_one_line_and_the_report_is_still_made(name, tmp_path, datasets_root):
    for seed in range(3):
        write_run(tmp_path / "runs" / f"seed{seed}", "hopper-random", "so2", seed)
    damage(tmp_path / "runs" / "seed1", name)
    result = report_of(tmp_path, datasets_root)
    skipped = [line for line in result.stderr.splitlines() if "skipped damaged run" in line]
    assert len(skipped) == 1 and "seed1" in skipped[0]
    assert "report of 2 runs" in result.stdout and (tmp_path / "report" / "table.md").exists()


def test_summarize_runs_reports_a_damaged_run_and_lists_the_rest(tmp_path, datasets_root):
    folders = [tmp_path / f"seed{seed}" for seed in range(3)]
    for seed, folder in enumerate(folders):
        write_run(folder, "hopper-random", "so2", seed)
        summary = json.loads((folder / "summary.json").read_text())
        summary.update(seed=seed, device_name="cpu", pretrained_score=1.0, final_score=2.0, best_score=2.0,
                       final_q_bias=0.1, final_kendall_tau=0.5)  # fmt: skip
        (folder / "summary.json").write_text(json.dumps(summary))
    damage(folders[2], "summary.json")
    result = run_script("scripts/summarize_runs.py", [str(f) for f in folders], datasets_root)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("skipped damaged run") == 1 and "seed2" in result.stderr
    assert [line.split("|")[1].strip() for line in result.stdout.splitlines()[2:]] == ["seed0", "seed1"]


# Scores at online env steps 0, 1,000, 2,000 and 3,000 of two variants and three seeds, for the paired
# statistics by hand (--auc 1000 2000 --last 2).
PAIRED = {
    "a": {0: [1.0, 2.0, 3.0, 4.0], 1: [1.0, 5.0, 5.0, 5.0], 2: [0.0, 0.0, 1.0, 2.0]},
    "b": {0: [1.0, 1.0, 1.0, 1.0], 1: [1.0, 6.0, 6.0, 6.0], 2: [0.0, 0.0, 0.0, 0.0]},
}


def test_window_means_and_paired_comparison_by_hand(tmp_path, datasets_root):
    for variant, seeds in PAIRED.items():
        for seed, scores in seeds.items():
            steps = dict(zip((0, 1000, 2000, 3000), scores))
            write_run(tmp_path / "runs" / variant / f"seed{seed}", "hopper-random", variant, seed, scores=steps)
    result = run_script(
        "scripts/report.py",
        [str(tmp_path / "runs"), "--out", str(tmp_path / "report"), "--auc", "1000", "2000", "--last", "2",
         "--paired", "a:b", "--reps", "200"],
        datasets_root,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # window means a: 2.5, 5.0, 0.5 and b: 1, 6, 0; last-2 means a: 3.5, 5, 1.5 and b: 1, 6, 0; finals a: 4, 5, 2.
    lines = (tmp_path / "report" / "table.md").read_text().splitlines()
    assert lines[0].split("|")[7:9] == [" mean 1,000-2,000 ", " last-2 mean "]
    row_a = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert row_a[6:8] == [f"{np.mean([2.5, 5, 0.5]):.1f} ± {np.std([2.5, 5, 0.5], ddof=1):.1f}", "3.3 ± 1.8"]
    paired = json.loads((tmp_path / "report" / "paired.json").read_text())["hopper-random"]["a - b"]
    window, last, final = paired["mean 1,000-2,000"], paired["last-2 mean"], paired["final"]
    assert window["seeds"] == [0, 1, 2] and window["differences"] == [1.5, -1.0, 0.5] and window["wins"] == 2
    assert (
        window["mean_difference"] == pytest.approx(1 / 3)
        and -1.0 <= window["ci95"][0] <= 1 / 3 <= window["ci95"][1] <= 1.5
    )
    # P(a > b) over all pairs of runs: 2.5 beats 1 and 0, 5 beats 1 and 0, 0.5 beats 0: 5 of 9.
    assert window["probability_of_improvement"]["value"] == pytest.approx(5 / 9)
    assert last["differences"] == [2.5, -1.0, 1.5] and final["differences"] == [3.0, -1.0, 2.0] and final["wins"] == 2
    assert (
        "| hopper-random | a - b | final | 3 | 0: +3.0, 1: -1.0, 2: +2.0 | 2/3 |"
        in (tmp_path / "report" / "paired.md").read_text()
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--paired", "so2"], "--paired so2 is not A:B"),
        (["--auc", "5", "1"], "--auc FROM TO"),
        (["--last", "0"], "--last"),
        (["--reference", "ant:1"], "--reference ant:1 is not ENV:LOW:HIGH"),
        (["--reference", "ant:5:1"], "--reference ant:5:1 is not ENV:LOW:HIGH"),
        (["--reference", ":0:1"], "--reference :0:1 is not ENV:LOW:HIGH"),
        (["--reference", "ant:low:1"], "--reference ant:low:1 is not ENV:LOW:HIGH"),
        (["--reference", "ant:0:inf"], "--reference ant:0:inf is not ENV:LOW:HIGH"),
        (["--reference", "ant:0:1", "ant:0:2"], "--reference ant is given twice"),
    ],
)
def test_bad_statistics_arguments_are_one_line_errors(args, message, tmp_path, datasets_root):
    result = run_script("scripts/report.py", [str(tmp_path), *args], datasets_root)
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1


def test_reference_renormalises_one_env_from_the_returns(tmp_path, datasets_root):
    """--reference ant:-325.6:3879.7: the ant run's scores, pretraining included, become D4RL's
    formula on its returns (hand-computed); the hopper run in the same report keeps its logged scores."""
    write_run(tmp_path / "runs" / "ant", "ant-random", "so2", 0)
    write_run(tmp_path / "runs" / "hopper", "hopper-random", "so2", 0)
    metrics = tmp_path / "runs" / "ant" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    for record, value in zip(records, (-325.6, 95.13, 515.86, 3879.7)):  # pretrain, then 0, 1,000, 2,000
        record["return"] = value
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "report"
    result = run_script(
        "scripts/report.py",
        [str(tmp_path / "runs"), "--out", str(out), "--reference", "ant:-325.6:3879.7"],
        datasets_root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (out / "table.md").read_text().splitlines()
    assert (
        lines[0] == "Normalised scores of ant recomputed from the returns with LOW -325.6, HIGH 3879.7 (--reference)."
    )
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in lines[4:]}
    # (95.13 + 325.6) / 4205.3 = 10.0%, (3879.7 + 325.6) / 4205.3 = 100%, best 100, last-3 (10 + 20 + 100) / 3
    assert rows["ant-random"][3:7] == ["10.0 ± 0.0", "100.0 ± 0.0", "100.0 ± 0.0", "43.3 ± 0.0"]
    assert rows["hopper-random"][3:5] == [f"{score('so2', 0, 0):.1f} ± 0.0", f"{score('so2', 0, 2000):.1f} ± 0.0"]
    assert json.loads((out / "aggregate.json").read_text())["references"] == {"ant": [-325.6, 3879.7]}


def test_reference_renormalises_pretraining_records_and_must_match_a_run(tmp_path, datasets_root):
    """The pretraining curves get the recomputed scores too, those of pretraining-only runs (a sweep's
    shared pretrainings) included; a --reference that matches no run's env is a one-line error."""
    for name, scores in (("ft", None), ("pt", {})):  # a finetuned and a pretraining-only ant run
        write_run(tmp_path / "runs" / name, "ant-random", "so2" if scores is None else "pretrain", 0, scores=scores)
    write_run(tmp_path / "runs" / "hopper", "hopper-random", "so2", 0)
    report = load_script("scripts/report.py")
    seen = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            report,
            "plot_pretraining",
            lambda runs, path, rng: seen.extend((r.env, r.pretrain[0]["normalized_score"]) for r in runs),
        )
        report.main(
            report.Args(runs=(str(tmp_path / "runs"),), out=str(tmp_path / "out"), reps=10, reference=("ant:-100:100",))
        )
    assert sorted(seen) == [("ant-random", 50.0), ("ant-random", 50.0), ("hopper-random", 1.0)]  # return 0: 50%
    result = run_script("scripts/report.py", [str(tmp_path / "runs"), "--reference", "ant-random:0:1"], datasets_root)
    assert result.returncode == 2 and "--reference ant-random matches no run's env" in result.stderr
    assert result.stderr.count("\n") == 1


def test_a_hopper_standing_still_is_flagged():
    """Full-length episodes returning about the alive bonus alone (1,000) stand still; a hopper that
    runs, one that falls early, and a halfcheetah (no alive bonus) do not."""
    report = load_script("scripts/report.py")
    record = {"episode_length": 1000.0, "return": 1014.0}
    assert report.stands_still("hopper-random", record)
    assert not report.stands_still("hopper-random", {**record, "return": 3200.0})
    assert not report.stands_still("hopper-random", {**record, "episode_length": 420.0})
    assert not report.stands_still("halfcheetah-medium", record)
    assert not report.stands_still("hopper-random", {"return": 1014.0})  # records without episode_length


def test_zero_action_returns_table(datasets_root):
    """scripts/zero_action_returns.py: a hopper given the action 0 falls before the time limit, and the
    normalised score is D4RL's formula applied to the mean return (hopper: random -20.272305, expert 3234.3)."""
    result = run_script("scripts/zero_action_returns.py", ["--envs", "hopper", "--episodes", "2"], datasets_root)
    assert result.returncode == 0, result.stderr[-2000:]
    cells = [c.strip() for c in result.stdout.splitlines()[2].split("|")[1:-1]]
    mean_return, length, score = float(cells[3].split(" ± ")[0].replace(",", "")), float(cells[4]), float(cells[5])
    assert cells[:3] == ["hopper", "Hopper-v5", "2"] and 0 < length < 1000
    assert score == pytest.approx(100 * (mean_return + 20.272305) / (3234.3 + 20.272305), abs=0.06)
    bad = run_script("scripts/zero_action_returns.py", ["--envs", "cartpole"], datasets_root)
    assert bad.returncode == 2 and "unknown env cartpole" in bad.stderr and bad.stderr.count("\n") == 1
