"""The BCDR thesis's study of how many SinGAN models to use: model-count arms of
`synthbreast study` (0 = real only, then images of the first K models), the same number of
added images in every arm, on the mias demo's three classes with four tiny SinGANs of the
malignant class; the choice inside an arm, the summary, the report and the refusals."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from synthbreast.cli import app
from synthbreast.config import StudyConfig
from synthbreast.data.shards import iter_shard
from synthbreast.errors import UserError
from synthbreast.eval.study import (
    SUMMARY,
    TASKS,
    arm_label,
    singan_arm_mask,
    summary_table,
    task_list,
    validate,
)

MALIGNANT = 2  # the mias demo's classes: healthy, benign, malignant
# 2 scales of 20 iterations at 32 px: a model in about a second of compute (tests/test_singan.py)
SINGAN_FAST = ["--budget", "tiny", "--max-size", "32", "--iterations", "20", "--device", "cpu"]
CLASSIFIER_FAST = ["--weights", "none", "--input-size", "native", "--epochs", "2",
                   "--device", "cpu"]  # fmt: skip
# the thesis's protocol: 3 folds, the minority classes filled up to the majority
STUDY = ["--folds", "3", "--seeds", "0", "--synth-ratio", "1", "--balance-minority"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})


@dataclass
class SinGANInputs:
    shards: Path  # the mias demo, ingested into 32 px patches of three classes
    models: Path  # train-singan --outdir: 4 models of the malignant class
    synthetic: Path  # generate-singan: 2 shards of 40, 20 images per model


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> SinGANInputs:
    """In this process (CliRunner): four processes' start-up would cost more than the work.
    The models are trained as Slurm array tasks train them, one --task-id each."""
    root = tmp_path_factory.mktemp("singan-study")
    demo, shards, models = root / "demo", root / "shards", root / "models"
    steps = [
        ["demo-data", demo, "--format", "mias", "--patients", "12"],
        ["ingest", demo, shards, "--format", "mias", "--patch-size", "32", "--min-shards", "1",
         "--workers", "1"],
    ]  # fmt: skip
    for task in range(4):
        steps.append(["train-singan", shards, "--class", MALIGNANT, "--images", "4", "--outdir",
                      models, "--task-id", task, *SINGAN_FAST])  # fmt: skip
    steps.append(["generate-singan", models, "--out", root / "synthetic", "--shards", "2",
                  "--per-shard", "40"])  # fmt: skip
    for step in steps:
        result = invoke(*step)
        assert result.exit_code == 0, f"{step[0]}: {result.output}"
    return SinGANInputs(shards, models, root / "synthetic")


@pytest.fixture(scope="module")
def model_study(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model-study") / "study"
    result = invoke("study", "--real", inputs.shards, "--synthetic", inputs.synthetic,
                    "--out", out, "--singan-models", "4,2", *STUDY, *CLASSIFIER_FAST)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "2 models" in result.output and "0 models (real only)" in result.output
    return out


def results_of(out: Path) -> list[dict]:
    found = [json.loads(p.read_text()) for p in sorted((out / TASKS).glob("*.json"))]
    return [r for r in found if "schema" in r]


def sample_models(folder: Path) -> dict[str, int]:
    """{key: model} of a generate-singan folder, read from the samples' json."""
    return {
        s["__key__"]: json.loads(s["json"])["model"]
        for path in sorted(folder.glob("synthetic-*.tar"))
        for s in iter_shard(path)
    }


# --- the arms (no data) ----------------------------------------------------------------------


def test_model_arms_are_tasks_of_their_own_and_contradictions_are_refused():
    config = StudyConfig(out="a", real="r", folds=3, seeds=[0], synth_ratios=[1],
                         singan_models=[8, 2, 4, 6, 2])  # fmt: skip
    tasks = task_list(config)
    assert len(tasks) == 3 * 5, "0 (real only) always in, counts unique"
    assert [(t.models, t.ratio) for t in tasks[:5]] == [(0, 0), (2, 1), (4, 1), (6, 1), (8, 1)]
    assert tasks[1].name == "0001-seed0-fold0-models2"
    assert [arm_label(0, 0), arm_label(1, 1), arm_label(1, 4)] == [
        "0 models (real only)", "1 model", "4 models",
    ]  # fmt: skip
    validate(config)
    # the same number of images in every arm: one ratio, not a ratio sweep
    for ratios in ([0, 0.5, 1], [0]):
        with pytest.raises(UserError, match="give one --synth-ratio above 0"):
            validate(StudyConfig(out="a", real="r", synth_ratios=ratios, singan_models=[2]))
    with pytest.raises(UserError, match="a model count above 0"):
        validate(StudyConfig(out="a", real="r", synth_ratios=[1], singan_models=[0]))
    with pytest.raises(UserError, match="whole numbers >= 0"):
        validate(StudyConfig(out="a", real="r", synth_ratios=[1], singan_models=[-2]))
    # no model arms: the ratio study as before
    assert [t.models for t in task_list(StudyConfig(out="a", real="r", folds=2))] == [None] * 30


def test_an_arm_takes_its_models_in_turns_and_refuses_to_add_fewer():
    models = [0, 1, 2, 3] * 6 + [0, 1] * 2  # class 2: 28 images of 4 models
    labels = [2] * len(models) + [0] * 3
    models += [0, 1, 2]  # class 0 has images too here: its limit is 0
    hashes = [((i * 7919) % 101) / 101 for i in range(len(models))]
    for count, wanted in ((2, 10), (2, 9), (4, 10)):
        keep = singan_arm_mask(models, labels, hashes, {0: 0, 1: 5, 2: wanted}, count)
        chosen = [m for m, k in zip(models, keep, strict=True) if k]
        assert len(chosen) == wanted, "the arm's number, class 1 (no SinGAN images) none"
        assert set(chosen) == set(range(count)), "models 0..K-1 alone"
        shares = [chosen.count(m) for m in range(count)]
        assert max(shares) - min(shares) <= 1, "every model the same share, to within one"
        # the smallest hashes of each model
        for m in range(count):
            own = sorted((h, i) for i, (h, mm, y) in enumerate(zip(hashes, models, labels,
                         strict=True)) if mm == m and y == 2)  # fmt: skip
            picked = {i for i, k in enumerate(keep) if k and models[i] == m}
            assert picked == {i for _, i in own[: len(picked)]}
    with pytest.raises(UserError, match=r"models 0\.\.1 drew 16 images of class 2 and every arm"):
        singan_arm_mask(models, labels, hashes, {2: 17}, 2)


# --- the thesis's study, end to end ------------------------------------------------------------


def test_every_arm_adds_the_same_number_and_arm_two_only_models_zero_and_one(model_study, inputs):
    results = results_of(model_study)
    assert sorted(r["task"]["models"] for r in results) == [0, 0, 0, 2, 2, 2, 4, 4, 4]
    by_fold: dict[int, dict[int, dict]] = {}
    for result in results:
        by_fold.setdefault(result["task"]["fold"], {})[result["task"]["models"]] = result
    for fold, arms in by_fold.items():
        real, two, four = arms[0], arms[2], arms[4]
        assert real["synthetic_train_images"] == 0 and real["counts"]["synthetic_train"] == {
            "0": 0, "1": 0, "2": 0,
        }  # fmt: skip
        gap = two["counts"]["real_train"]["0"] - two["counts"]["real_train"]["2"]
        assert gap > 0, "malignant is a minority class of the demo"
        # the same images added in arms 2 and 4: the malignant gap to the majority; benign is
        # a minority too, but no SinGAN drew it
        for arm in (two, four):
            assert arm["counts"]["synthetic_train"] == {"0": 0, "1": 0, "2": gap}, fold
            assert arm["counts"]["real_train"] == real["counts"]["real_train"]
            assert arm["test_patient_ids"] == real["test_patient_ids"]
        assert set(two["counts"]["synthetic_per_model"]) == {"0", "1"}
        assert sorted(two["counts"]["synthetic_per_model"].values()) == [gap // 2, gap - gap // 2]
        shares = four["counts"]["synthetic_per_model"]
        assert set(shares) == {"0", "1", "2", "3"} and sum(shares.values()) == gap
        assert max(shares.values()) - min(shares.values()) <= 1
    # the folder holds 20 images of each of the 4 models (what arm 4 draws from)
    models = sample_models(inputs.synthetic)
    assert sorted(list(models.values()).count(m) for m in range(4)) == [20] * 4


def test_summary_has_per_class_auc_mean_and_sd_per_arm(model_study):
    summary = json.loads((model_study / SUMMARY).read_text())
    assert summary["singan_models"] == [0, 2, 4] and summary["tasks"]["done"] == 9
    assert summary["class_names"] == ["healthy", "benign", "malignant"]
    assert [r["arm"] for r in summary["rows"]] == ["0 models (real only)", "2 models", "4 models"]
    assert [r["models"] for r in summary["rows"]] == [0, 2, 4]
    assert summary["metrics"][-3:] == ["auc_class0", "auc_class1", "auc_class2"]
    results = results_of(model_study)
    for row in summary["rows"]:
        own = [r for r in results if r["task"]["models"] == row["models"]]
        values = [r["auc_per_class"]["2"] for r in own]
        entry = row["metrics"]["auc_class2"]
        assert set(entry) == {"mean", "sd", "n"} and entry["n"] == 3
        assert entry["mean"] == pytest.approx(sum(values) / 3)
        assert entry["sd"] is not None
        if row["models"]:
            assert row["vs_real_only"]["auc_class2"]["n"] == 3, "paired with 0 models"
            assert sum(row["synthetic_per_model"].values()) == pytest.approx(
                row["synthetic_train_images"]
            )
    header, rows = summary_table(summary)
    assert header[0] == "SinGAN models" and "AUC malignant (mean ± sd)" in header
    assert [r[0] for r in rows] == ["0 models (real only)", "2 models", "4 models"]


def test_report_shows_the_model_count_table_and_plots(model_study, tmp_path):
    report = tmp_path / "report"
    result = invoke("report", model_study, "--out", report)
    assert result.exit_code == 0, result.output
    markdown = (report / "report.md").read_text()
    section = markdown.split("## Augmentation study")[1].split("## Provenance")[0]
    assert "| SinGAN models | tasks |" in section and "AUC malignant (mean ± sd)" in section
    assert "| 0 models (real only) | 3/3 |" in section and "| 4 models | 3/3 |" in section
    assert "per SinGAN model count" in section and "each model an equal share" in section
    svg = (report / "figures" / "study-0-metrics.svg").read_text()
    ET.fromstring(svg)  # well-formed
    assert "AUC malignant" in svg and "SinGAN models" in svg


def test_rerun_skips_and_another_model_count_is_another_study(model_study, inputs, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(model_study, out)
    args = ["study", "--real", inputs.shards, "--synthetic", inputs.synthetic, "--out", out,
            *STUDY, *CLASSIFIER_FAST]  # fmt: skip
    again = invoke(*args, "--singan-models", "2,4")
    assert again.exit_code == 0 and "9 of 9 tasks complete, skipped" in again.output
    other = invoke(*args, "--singan-models", "2,3")
    assert other.exit_code == 2 and "singan_models" in other.output


# --- refusals ----------------------------------------------------------------------------------


def test_model_arms_refuse_what_contradicts_them(inputs, tmp_path):
    base = ["study", "--real", inputs.shards, "--out", tmp_path / "s", *CLASSIFIER_FAST,
            "--folds", "3", "--seeds", "0"]  # fmt: skip
    singan = ["--synthetic", inputs.synthetic]

    def refused(*extra, words: tuple[str, ...]):
        result = invoke(*base, *extra)
        assert result.exit_code == 2, result.output
        for word in words:
            assert word in result.output, result.output
        assert "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) <= 3  # one line, wrapped by the console
        assert not (tmp_path / "s").exists(), "nothing written before the inputs are checked"

    # more models than the folder holds
    refused(*singan, "--singan-models", "2,8", "--synth-ratio", "1",
            words=("--singan-models 8", "samples of 4 SinGAN models"))  # fmt: skip
    # a ratio sweep: the arms would add different numbers
    refused(*singan, "--singan-models", "2,4", words=("give one --synth-ratio above 0",))
    # no synthetic folder
    refused("--singan-models", "2", "--synth-ratio", "1", words=("--singan-models", "--synthetic"))
    # a folder that generate-singan did not make (no SinGAN models in its manifest)
    plain = tmp_path / "plain"
    shutil.copytree(inputs.synthetic, plain)
    manifest = json.loads((plain / "manifest.json").read_text())
    manifest["source"].pop("models")
    manifest["source"]["model_name"] = "msggan"
    (plain / "manifest.json").write_text(json.dumps(manifest))
    refused("--synthetic", plain, "--singan-models", "2", "--synth-ratio", "1",
            words=("was not made by", "generate-singan"))  # fmt: skip
    # two folders of different train-singan selections
    other = tmp_path / "other"
    shutil.copytree(inputs.synthetic, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["source"]["models"][1]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    refused(*singan, "--synthetic", other, "--singan-models", "2", "--synth-ratio", "1",
            words=("different models 1", "same train-singan --outdir"))  # fmt: skip


def test_an_arm_with_too_few_images_stops_before_any_task(inputs, tmp_path):
    few = tmp_path / "few"  # 8 images: 2 per model
    done = invoke("generate-singan", inputs.models, "--out", few, "--shards", "1",
                  "--per-shard", "8")  # fmt: skip
    assert done.exit_code == 0, done.output
    out = tmp_path / "s"
    result = invoke("study", "--real", inputs.shards, "--synthetic", few, "--out", out,
                    "--singan-models", "2", *STUDY, *CLASSIFIER_FAST)  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--singan-models 2: models 0..1 drew 4 images of class 2" in result.output
    assert "generate-singan --shards/--per-shard" in result.output
    assert not [p for p in (out / TASKS).glob("*.json") if "failed" not in p.name]


def test_submit_study_passes_the_model_arms_to_every_task(tmp_path):
    result = CliRunner().invoke(app, [
        "submit", "study", "--real", "r", "--synthetic", "s", "--out", str(tmp_path / "st"),
        "--folds", "3", "--synth-ratio", "1", "--seeds", "0", "--balance-minority",
        "--singan-models", "2,4,6,8", "--dry-run",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    study = next(line for line in result.output.splitlines() if "slurm/study.sh" in line)
    assert "--array=0-14 " in study, "3 folds x (0, 2, 4, 6, 8 models)"
    assert "--singan-models 0,2,4,6,8" in study and "--balance-minority" in study
    bad = CliRunner().invoke(app, ["submit", "study", "--real", "r", "--out", str(tmp_path),
                                   "--singan-models", "2", "--dry-run"])  # fmt: skip
    assert bad.exit_code == 2 and "give one --synth-ratio" in bad.output


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_array_finishes_the_model_count_study_to_the_local_table(
    slurm_cluster, model_study, inputs, tmp_path
):
    """`submit study --singan-models` on the one-node cluster: a copy of the local study with
    three tasks removed (one per arm and fold) gets them as array tasks, then the summary and
    the report jobs; the tasks, the per-class table and the report's section equal the local
    run's."""
    import sys

    from tests.test_study import (
        assert_close,
        measured,
        submit_and_wait,
        task_list_names,
        tasks_of,
    )

    out = tmp_path / "slurm-study"
    shutil.copytree(model_study, out)
    local = tasks_of(model_study)
    redo = [0, 4, 8]
    for index in redo:
        (out / TASKS / f"{task_list_names(local)[index]}.json").unlink()
    (out / SUMMARY).unlink()
    command = [
        sys.executable, "-m", "synthbreast", "submit", "study", "--real", str(inputs.shards),
        "--synthetic", str(inputs.synthetic), "--out", str(out), "--singan-models", "2,4",
        *STUDY, "--extra", " ".join(CLASSIFIER_FAST), "--tasks", ",".join(map(str, redo)),
        "--sbatch-args", "--gpus-per-node=0 --gres=none --cpus-per-task=1 --mem=2G",
    ]  # fmt: skip
    jobs = submit_and_wait(slurm_cluster, command, out)
    array = slurm_cluster.jobs(jobs[0]["job_id"])
    assert sorted(int(r["ArrayTaskId"]) for r in array) == redo
    under_slurm = tasks_of(out)
    assert sorted(under_slurm) == list(range(9))
    for index in redo:
        assert_close(measured(local[index]), measured(under_slurm[index]), f"task {index}")
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["singan_models"] == [0, 2, 4]
    assert_close(json.loads((model_study / SUMMARY).read_text())["rows"], summary["rows"])
    section = (out / "report" / "report.md").read_text().split("## Augmentation study")[1]
    assert "| 0 models (real only) | 3/3 |" in section and "| 4 models | 3/3 |" in section
