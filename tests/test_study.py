"""The augmentation study: patient folds, the ordered task list, a real local study on the demo
shards and its summary, resume, one task alone, the report's section, submit --dry-run, and
the Slurm array run against the local one (tests/slurm_cluster.py)."""

from __future__ import annotations

import json
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from typer.testing import CliRunner

from synthbreast.cli import app
from synthbreast.config import IngestConfig, StudyConfig, to_dict
from synthbreast.data.ingest import run_ingest
from synthbreast.errors import UserError
from synthbreast.eval.study import (
    SUMMARY,
    TASKS,
    Task,
    normalise,
    patient_folds,
    summarise,
    synthetic_limit,
    task_list,
    task_metrics,
    validate,
)
from tests.test_scenarios import make_synthetic

FAST = ["--weights", "none", "--input-size", "native", "--epochs", "2", "--device", "cpu"]
# 3 folds x 3 ratios x 1 seed = 9 tasks
STUDY = ["--folds", "3", "--synth-ratio", "0,0.25,1", "--seeds", "0"]
SYNTHETIC_PER_CLASS = 100  # make_synthetic(shards=4, per_shard=25): enough for ratio 1


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})


def tasks_of(out: Path) -> dict[int, dict]:
    results = [json.loads(p.read_text()) for p in sorted((out / TASKS).glob("*.json"))]
    return {r["task"]["index"]: r for r in results if "schema" in r}


def measured(result: dict) -> dict:
    """A task result without what differs between two runs of it (timing, paths)."""
    drop = ("seconds", "config", "model", "inputs", "device", "created_by")
    return {k: v for k, v in result.items() if k not in drop}


def rows_of(summary: dict) -> list[dict]:
    return summary["rows"]


def assert_close(a, b, where: str = "") -> None:
    """Equal structure, numbers equal to 1e-9 (two processes may sum in another order)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), where
        for key in a:
            assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert b == pytest.approx(a, rel=1e-9, abs=1e-12), where
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synthetic"), shards=4, per_shard=25)


@dataclass
class LocalStudy:
    out: Path
    args: list
    output: str
    seconds: float


@pytest.fixture(scope="module")
def local_study(demo_shards, synthetic, tmp_path_factory) -> LocalStudy:
    out = tmp_path_factory.mktemp("study") / "local"
    args = ["study", "--real", demo_shards, "--synthetic", synthetic, *STUDY, *FAST]
    started = time.monotonic()
    result = invoke(*args, "--out", out)
    assert result.exit_code == 0, result.output
    return LocalStudy(out, args, result.output, time.monotonic() - started)


# --- the task list and the folds (no data) ---------------------------------------------------


def test_task_list_is_ordered_and_depends_on_the_config_alone():
    config = StudyConfig(out="a", real="r", folds=3, synth_ratios=[1, 0.25], seeds=[2, 0])
    tasks = task_list(config)
    assert normalise(config).synth_ratios == [0, 0.25, 1], "0 (real-only) always in, sorted"
    assert normalise(config).seeds == [0, 2]
    assert len(tasks) == 2 * 3 * 3
    assert [t.index for t in tasks] == list(range(18))
    assert tasks[0] == Task(0, 0, 0, 0) and tasks[1] == Task(1, 0, 0, 0.25)
    assert tasks[3] == Task(3, 0, 1, 0) and tasks[9] == Task(9, 2, 0, 0)
    assert tasks[17].name == "0017-seed2-fold2-ratio1"
    assert len({t.name for t in tasks}) == 18
    # the same study said otherwise, or run elsewhere, has the same list
    same = StudyConfig(out="b", real="r", folds=3, synth_ratios=[0, 1, 0.25, 1], seeds=[0, 2],
                       task_id=5, device="cpu")  # fmt: skip
    assert task_list(same) == tasks == task_list(normalise(config))
    with pytest.raises(UserError, match="out of range"):
        validate(normalise(StudyConfig(out="a", real="r", folds=3, seeds=[0], task_id=15)))
    with pytest.raises(UserError, match=">= 0"):
        normalise(StudyConfig(out="a", real="r", synth_ratios=[-1]))
    with pytest.raises(UserError, match="at least 2 folds"):
        validate(StudyConfig(out="a", real="r", folds=1))


def test_patient_folds_are_disjoint_and_test_every_patient_once_per_seed():
    rng = np.random.default_rng(0)
    patients, labels = [], []
    for p in range(11):  # unequal patients and class shares, as in IDC
        positives, negatives = rng.integers(0, 30, 2)
        patients += [f"p{p:02d}"] * int(positives + negatives)
        labels += [1] * int(positives) + [0] * int(negatives)
    splits = []
    for seed in (0, 1, 2):
        folds = patient_folds(patients, labels, 3, seed)
        assert sorted(folds) == sorted(set(patients)), "every patient in one fold"
        assert set(folds.values()) == {0, 1, 2}, "no fold empty"
        order = rng.permutation(len(patients))  # the order the samples come in does not matter
        shuffled = patient_folds([patients[i] for i in order], [labels[i] for i in order], 3, seed)
        assert shuffled == folds
        splits.append(folds)
    assert splits[0] != splits[1] or splits[1] != splits[2], "seeds split differently"
    with pytest.raises(UserError, match="needs at least 5 patients"):
        patient_folds(["a", "a", "b", "c"], [0, 1, 0, 1], 5, 0)


def test_synthetic_share_per_class_and_for_the_minority():
    assert synthetic_limit({0: 80, 1: 20}, 0.5) == {0: 40, 1: 10}
    assert synthetic_limit({0: 80, 1: 20}, 0) == {0: 0, 1: 0}
    assert synthetic_limit({0: 80, 1: 20}, 1, balance_minority=True) == {0: 0, 1: 60}
    assert synthetic_limit({0: 80, 1: 20, 2: 50}, 0.5, balance_minority=True) == {
        0: 0, 1: 30, 2: 15,
    }  # fmt: skip


def test_task_metrics_equal_scikit_learn_for_two_and_three_classes():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 60)
    p = rng.dirichlet(np.ones(3), 60)
    got = task_metrics(y, p, [0, 1, 2])
    expected = roc_auc_score(y, p, multi_class="ovr", average=None)
    assert [got["auc_per_class"][str(c)] for c in range(3)] == pytest.approx(expected)
    assert got["auc"] == pytest.approx(np.mean(expected))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))
    y2 = rng.integers(0, 2, 40)
    p1 = rng.random(40)
    two = task_metrics(y2, np.stack([1 - p1, p1], 1), [0, 1])
    assert two["auc"] == pytest.approx(roc_auc_score(y2, p1)), "the positive class's AUC"
    # labels that are not 0..C-1 (the classes of the manifest)
    shifted = task_metrics(y2 + 3, np.stack([1 - p1, p1], 1), [3, 4])
    assert shifted["auc"] == two["auc"] and shifted["accuracy"] == two["accuracy"]


def test_summary_pairs_each_ratio_with_real_only_of_the_same_fold_and_seed():
    config = StudyConfig(out="x", real="r", folds=2, synth_ratios=[0, 1], seeds=[0, 1])
    auc = {
        (0, 0, 0): 0.6,
        (0, 0, 1): 0.7,
        (0, 1, 0): 0.5,
        (0, 1, 1): 0.65,
        (1, 0, 0): 0.62,
        (1, 0, 1): 0.66,
        (1, 1, 0): 0.55,
    }  # (seed 1, fold 1, ratio 1) missing
    results = []
    for task in task_list(config):
        key = (task.seed, task.fold, task.ratio)
        if key not in auc:
            continue
        results.append({
            "task": {"index": task.index}, "classes": [0, 1], "auc": auc[key],
            "balanced_accuracy": 0.5, "accuracy": 0.5, "real_train_images": 100,
            "synthetic_train_images": 100 * task.ratio, "test_images": 100,
            "counts": {"synthetic_train": {"0": 50 * task.ratio, "1": 50 * task.ratio}},
            "test_patient_ids": [f"p{task.fold}"],
        })  # fmt: skip
    summary = summarise(to_dict(normalise(config)), results)
    base, synth = summary["rows"]
    assert summary["tasks"]["missing"] == ["0007-seed1-fold1-ratio1"]
    assert base["metrics"]["auc"]["mean"] == pytest.approx(np.mean([0.6, 0.5, 0.62, 0.55]))
    assert base["metrics"]["auc"]["sd"] == pytest.approx(np.std([0.6, 0.5, 0.62, 0.55], ddof=1))
    diffs = [0.1, 0.15, 0.04]  # three complete pairs
    paired = synth["vs_real_only"]["auc"]
    half = stats.t.ppf(0.975, 2) * np.std(diffs, ddof=1) / np.sqrt(3)
    assert paired["n"] == 3 and paired["mean"] == pytest.approx(np.mean(diffs))
    assert paired["ci95"] == pytest.approx([np.mean(diffs) - half, np.mean(diffs) + half])
    corrected = stats.t.ppf(0.975, 2) * np.std(diffs, ddof=1) * np.sqrt(1 / 3 + 1.0)
    assert paired["ci95_corrected"] == pytest.approx(
        [np.mean(diffs) - corrected, np.mean(diffs) + corrected]
    )
    assert summary["test_over_train"] == 1.0


# --- a real local study ------------------------------------------------------------------------


def test_local_study_summary_has_mean_sd_per_ratio_and_intervals(local_study, demo_shards):
    out = local_study.out
    print(f"local 3-fold x 3-ratio study: {local_study.seconds:.1f} s")
    assert "±" in local_study.output and "(baseline)" in local_study.output
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["tasks"] == {"expected": 9, "done": 9, "failed": {}, "missing": []}
    assert [r["ratio"] for r in rows_of(summary)] == [0, 0.25, 1]
    results = tasks_of(out)
    assert sorted(results) == list(range(9))
    for row in rows_of(summary):
        own = [r for r in results.values() if r["task"]["ratio"] == row["ratio"]]
        assert row["done"] == row["tasks"] == 3
        for metric in ("auc", "balanced_accuracy", "accuracy"):
            values = [r[metric] for r in own]
            assert row["metrics"][metric]["mean"] == pytest.approx(np.mean(values))
            assert row["metrics"][metric]["sd"] == pytest.approx(np.std(values, ddof=1))
        if row["ratio"]:
            for metric, entry in row["vs_real_only"].items():
                low, high = entry["ci95"]
                assert entry["n"] == 3 and low <= entry["mean"] <= high
                assert entry["ci95_corrected"][0] <= low, f"{metric}: corrected is wider"
    # the synthetic share: round(ratio x real training images) per class, of what exists
    for result in results.values():
        ratio = result["task"]["ratio"]
        for c, n in result["counts"]["real_train"].items():
            expected = min(round(ratio * n), SYNTHETIC_PER_CLASS)
            assert result["counts"]["synthetic_train"][c] == expected
        assert result["synthetic_train_images"] == sum(result["counts"]["synthetic_train"].values())


def test_folds_hold_disjoint_patients_and_test_each_real_patient_once(local_study, demo_shards):
    manifest = json.loads((demo_shards / "manifest.json").read_text())
    real = set(manifest["pools"]["train"]["patients"]) | set(manifest["pools"]["test"]["patients"])
    gan = set(manifest["pools"]["gan"]["patients"])
    results = tasks_of(local_study.out)
    by_fold: dict[int, list[set[str]]] = {}
    for result in results.values():
        tested = set(result["test_patient_ids"])
        assert len(tested) == result["test_patients"] > 0
        assert not tested & gan, "never a patient the GAN saw"
        by_fold.setdefault(result["task"]["fold"], []).append(tested)
    for fold, sets in by_fold.items():
        assert all(s == sets[0] for s in sets), f"fold {fold}: every ratio tests the same patients"
    folds = [sets[0] for _, sets in sorted(by_fold.items())]
    assert set().union(*folds) == real, "every real train/test patient is tested"
    assert sum(len(f) for f in folds) == len(real), "exactly once: the folds are disjoint"
    assert all(r["train_patients"] + r["test_patients"] == len(real) for r in results.values())
    summary = json.loads((local_study.out / SUMMARY).read_text())
    assert summary["patients"] == len(real)


def test_resume_skips_done_tasks_and_one_task_alone_equals_the_full_run(local_study, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(local_study.out, out)  # a moved study folder continues where it is
    before = tasks_of(local_study.out)
    for index in (4, 7):
        (out / TASKS / f"{task_list_names(before)[index]}.json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in (out / TASKS).glob("*.json")}

    # one task alone, as a Slurm array task runs it: the same numbers as in the full run
    result = invoke(*local_study.args, "--out", out, "--task-id", "4")
    assert result.exit_code == 0, result.output
    after = tasks_of(out)
    assert sorted(after) == [0, 1, 2, 3, 4, 5, 6, 8]
    assert measured(after[4]) == measured(before[4])
    # the rest: only the missing task is computed, the others are left as they were
    result = invoke(*local_study.args, "--out", out)
    assert result.exit_code == 0, result.output
    assert "8 of 9 tasks complete, skipped" in result.output
    assert kept == {
        p.name: p.stat().st_mtime_ns for p in (out / TASKS).glob("*.json") if p.name in kept
    }
    after = tasks_of(out)
    assert measured(after[7]) == measured(before[7])
    local = json.loads((local_study.out / SUMMARY).read_text())
    assert rows_of(json.loads((out / SUMMARY).read_text())) == rows_of(local)
    # a study of another config into the same folder is refused, nothing written
    other = [a if a != "0,0.25,1" else "0,1" for a in local_study.args]
    result = invoke(*other, "--out", out)
    assert result.exit_code == 2 and "another config" in result.output
    assert "synth_ratios" in result.output


def task_list_names(results: dict[int, dict]) -> dict[int, str]:
    return {i: r["task"]["name"] for i, r in results.items()}


def test_collect_summarises_what_is_there_and_lists_the_rest(local_study, tmp_path):
    out = tmp_path / "partial"
    shutil.copytree(local_study.out, out)
    names = task_list_names(tasks_of(out))
    (out / TASKS / f"{names[8]}.json").unlink()
    (out / TASKS / f"{names[5]}.json").rename(out / TASKS / f"{names[5]}.failed.json")
    (out / TASKS / f"{names[5]}.failed.json").write_text('{"error": "RuntimeError: boom"}')
    result = invoke("study", "--out", out, "--collect")
    assert result.exit_code == 0, result.output
    assert "1 tasks failed, 1 missing of 9" in result.output
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["tasks"]["failed"] == {names[5]: "RuntimeError: boom"}
    assert summary["tasks"]["missing"] == [names[8]]
    assert [r["done"] for r in rows_of(summary)] == [3, 3, 1]


def test_report_shows_the_study_table_and_plots(local_study, tmp_path):
    report = tmp_path / "report"
    result = invoke("report", local_study.out, "--out", report)
    assert result.exit_code == 0, result.output
    markdown = (report / "report.md").read_text()
    section = markdown.split("## Augmentation study")[1].split("## Provenance")[0]
    assert "| 0.25 | 3/3 | 160 | 40 |" in section, section
    assert "±" in section and "95% corrected" in section
    for name in ("study-0-metrics.svg", "study-0-difference.svg"):
        svg = (report / "figures" / name).read_text()
        ET.fromstring(svg)  # well-formed
        assert name in markdown
    html = (report / "report.html").read_text()
    assert "Augmentation study" in html and html.count("<svg") >= 2
    assert "DEMO DATA" in markdown, "the study's real shards are the demo's"


def test_balance_minority_fills_only_the_minority_class(demo_dir, synthetic, tmp_path):
    """Class 1 thinned to 5 of 20 images per patient: its synthetic share is the gap to
    class 0 (ratio 1), class 0 gets none."""
    source = tmp_path / "src"
    shutil.copytree(demo_dir, source)
    for folder in sorted(source.glob("*/1")):
        for png in sorted(folder.glob("*.png"))[5:]:
            png.unlink()
    shards = tmp_path / "shards"
    run_ingest(IngestConfig(src=str(source), out=str(shards), shard_size=40, min_shards=2))
    out = tmp_path / "study"
    args = ["study", "--real", shards, "--synthetic", synthetic, "--out", out, "--folds", "2"]
    result = invoke(*args, "--synth-ratio", "0,1", "--seeds", "0", "--balance-minority", *FAST)
    assert result.exit_code == 0, result.output
    for result in tasks_of(out).values():
        real = result["counts"]["real_train"]
        assert real["1"] < real["0"]
        gap = real["0"] - real["1"] if result["task"]["ratio"] else 0
        assert result["counts"]["synthetic_train"] == {"0": 0, "1": min(gap, SYNTHETIC_PER_CLASS)}


def test_study_without_synthetic_or_outside_a_study_is_a_clear_error(demo_shards, tmp_path):
    result = invoke("study", "--real", demo_shards, "--out", tmp_path / "s", *STUDY, *FAST)
    assert result.exit_code == 2 and "--synthetic" in result.output
    assert not (tmp_path / "s").exists(), "nothing written before the inputs are checked"
    result = invoke("study", "--out", tmp_path / "none", "--collect")
    assert result.exit_code == 2 and "not a `synthbreast study` folder" in result.output


def test_a_generator_that_saw_a_train_pool_patient_is_refused(demo_shards, synthetic, tmp_path):
    # the folds test the patients of the train pool too, not only the test pool's
    leaky = tmp_path / "leaky"
    shutil.copytree(synthetic, leaky)
    real = json.loads((Path(demo_shards) / "manifest.json").read_text())
    patient = real["pools"]["train"]["patients"][0]
    path = leaky / "class1" / "manifest.json"  # a parent of class0/ and class1/
    manifest = json.loads(path.read_text())
    manifest["source"]["training_patients"] = [patient]
    path.write_text(json.dumps(manifest))
    args = ["--real", demo_shards, "--synthetic", leaky, "--out", tmp_path / "s", *STUDY, *FAST]
    result = invoke("study", *args)
    assert result.exit_code == 2 and "'train' pool" in result.output and patient in result.output
    assert not (tmp_path / "s").exists(), "nothing written before the inputs are checked"


# --- Slurm -----------------------------------------------------------------------------------


def dry_run(*args: str) -> str:
    result = CliRunner().invoke(app, ["submit", "study", *args, "--dry-run"])
    assert result.exit_code == 0, result.output
    return result.output


def test_submit_study_dry_run_is_one_array_then_the_summary_then_the_report(tmp_path):
    common = ["--real", "r", "--synthetic", "s", "--out", str(tmp_path / "st")]
    script = dry_run(*common, "--folds", "3", "--synth-ratio", "1,0.5", "--seeds", "0,1",
                     "--max-parallel", "4", "--extra", "--epochs 3")  # fmt: skip
    lines = [line for line in script.splitlines() if "sbatch" in line]
    assert [line.split("=")[0] for line in lines] == [
        "STUDY_JOB",
        "STUDY_SUMMARY_JOB",
        "REPORT_JOB",
    ]
    study, summary, report = lines
    assert "--array=0-17%4" in study and "slurm/study.sh" in study  # 2 seeds x 3 folds x 3
    assert "EXTRA='--folds 3 --synth-ratio 0,0.5,1 --seeds 0,1 --epochs 3'" in study
    assert f"STUDY={tmp_path / 'st'}" in study and f"REAL={Path.cwd() / 'r'}" in study
    assert "--dependency=afterany:'\"$STUDY_JOB\"'" in summary and "--collect" in summary
    assert "--dependency=afterany:'\"$STUDY_SUMMARY_JOB\"'" in report
    assert f"OUT={tmp_path / 'st' / 'report'}" in report
    assert "--array=5 " in dry_run(*common, "--tasks", "5")


def submit_and_wait(cluster, command: list[str], out: Path) -> list[dict]:
    """Run a `submit study` command on the test cluster, wait for each job it recorded in
    OUT/jobs.jsonl, and assert every job and array task completed (the logs if not)."""
    import subprocess

    done = subprocess.run(command, capture_output=True, text=True, env=cluster.env)
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = [json.loads(line) for line in (out / "jobs.jsonl").read_text().splitlines()]
    for job in jobs:
        records = cluster.wait(job["job_id"], timeout=300)
        logs = "\n".join(p.read_text()[-2000:] for p in sorted((out / "logs").glob("*.out")))
        bad = [r for r in records if (r["JobState"], r["ExitCode"]) != ("COMPLETED", "0:0")]
        assert not bad, f"{job['name']}: {bad}\n{logs}"
    return jobs


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_array_study_finishes_a_local_one_to_the_local_summary(
    slurm_cluster, local_study, tmp_path
):
    """`submit study --tasks` on the one-node cluster: a copy of the local study with three
    tasks removed (one of each fold and ratio) gets those three as array tasks, then the
    summary and the report jobs; the tasks and the summary equal the local run's (each task
    depends only on its index) and the files that were there are left as they were."""

    out = tmp_path / "slurm-study"
    shutil.copytree(local_study.out, out)
    local = tasks_of(local_study.out)
    redo = [0, 4, 8]  # task = fold * 3 + ratio: the diagonal
    for index in redo:
        (out / TASKS / f"{task_list_names(local)[index]}.json").unlink()
    (out / SUMMARY).unlink()
    shutil.rmtree(out / "report", ignore_errors=True)
    kept = {p.name: p.stat().st_mtime_ns for p in (out / TASKS).glob("*.json")}
    real, synthetic = local_study.args[2], local_study.args[4]
    extra = " ".join(str(a) for a in FAST)
    command = [
        sys.executable, "-m", "synthbreast", "submit", "study", "--real", str(real),
        "--synthetic", str(synthetic), "--out", str(out), *STUDY, "--extra", extra,
        "--tasks", ",".join(map(str, redo)),
        "--sbatch-args", "--gpus-per-node=0 --gres=none --cpus-per-task=1 --mem=2G",
    ]  # fmt: skip
    started = time.monotonic()
    jobs = submit_and_wait(slurm_cluster, command, out)
    assert [job["name"] for job in jobs] == ["study", "study-summary", "report"]
    print(f"study under Slurm: {time.monotonic() - started:.0f} s")
    array = slurm_cluster.jobs(jobs[0]["job_id"])
    assert sorted(int(r["ArrayTaskId"]) for r in array) == redo, "one array task per --tasks"
    under_slurm = tasks_of(out)
    assert sorted(under_slurm) == list(range(9))
    for index, result in local.items():
        assert_close(measured(result), measured(under_slurm[index]), f"task {index}")
    assert kept == {
        p.name: p.stat().st_mtime_ns for p in (out / TASKS).glob("*.json") if p.name in kept
    }
    summary = json.loads((out / SUMMARY).read_text())
    assert_close(rows_of(json.loads((local_study.out / SUMMARY).read_text())), rows_of(summary))
    assert "Augmentation study" in (out / "report" / "report.md").read_text()
