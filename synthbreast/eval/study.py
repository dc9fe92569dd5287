"""`synthbreast study`: does adding synthetic images to the real training images help?

The augmentation study of a CBIS-DDSM lab and a BCDR thesis, on our shards: patient-level
stratified k-fold cross-validation over the real patients of the ingest's `train` and `test`
pools (never the `gan` pool: the GAN saw those patients, so testing on them would reward
memorisation), repeated over seeds. In every fold the classifier of `synthbreast classify`
trains on the other folds' real images, real-only (ratio 0) or plus, per class,
round(ratio x real training images of that class) synthetic images, chosen as classify's
real+synth-real chooses them (the smallest seeded hashes, synthbreast.eval.scenarios), and is
tested on the fold's patients. With `balance_minority` (the thesis's protocol) the synthetic
images go to the minority classes only: round(ratio x (majority count - class count)), so
ratio 1 fills each minority class up to the majority's count.

SinGAN model-count arms (`singan_models`, the BCDR thesis's question: how many SinGAN models,
one per real image, should the synthetic images come from?): the synthetic folders are
generate-singan outputs, and arm K adds images of the first K models of the train-singan
selection alone (each sample's json names its model, the folder's manifest maps it to the
selection's index). Every arm adds the same number per class: synthetic_limit of the one
ratio > 0 of `synth_ratios` (with `balance_minority`, the gap to the majority), which depends
on the fold's real images only; inside an arm the models take turns (the smallest seeded
hashes of each model first), so each gives the same share to within one. Arm 0 is real only.
An arm whose models hold fewer images of a class than that number is an error, not a smaller
arm: the arms would then differ in count as well as in models.

One task = (seed, fold, ratio), or (seed, fold, model count). The ordered task list is a pure
function of the config (`task_list`; seed-major, then fold, then arm), so a Slurm array task
needs only its index.

Stages of a run: normalise and check the config -> refuse an OUT holding another study, else
write OUT/config.json -> per seed: build the classifier (seeded), read the real and synthetic
images or classify's cached backbone features (computed once per shard, shared by every task
of the seed, and by `classify` itself when --feature-cache points there) -> split the patients
into folds (sklearn's StratifiedGroupKFold, shuffled by the seed: every patient is tested once
per seed) -> per task: train from the seeded initial weights, test, write
OUT/tasks/<task>.json atomically (a task whose file exists is skipped) -> OUT/summary.json.

The summary (`summarise`, numpy and scipy only): per ratio, mean and sd of each metric over
folds and seeds; the paired difference of each ratio to real-only (same fold, same seed) with
a 95% t interval over the pairs, and the Nadeau-Bengio corrected one. Folds share training
patients and the seeds share patients, so the pairs are not independent and the plain t
interval is too narrow (Nadeau & Bengio 2003); the corrected one widens the variance by
(1/n + n_test/n_train) x n (Bouckaert & Frank 2004) and is the one to quote.

Heavy imports (torch, the classifier) happen inside the run functions: the report reads
studies through this module without importing torch.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from synthbreast import __version__
from synthbreast.config import StudyConfig, run_only_fields, save_config, to_dict
from synthbreast.errors import UserError
from synthbreast.fileio import atomic_write_json, read_json
from synthbreast.results import CONFIG, STUDY_SUMMARY_SCHEMA, STUDY_TASK_SCHEMA, SUMMARY, TASKS

FAILED_SUFFIX = ".failed.json"
STUDY_JOB = "StudyConfig"  # the `job` of OUT/config.json: how the report finds a study
METRICS = ("auc", "balanced_accuracy", "accuracy")  # summarised, in this order
METRIC_NAMES = {"auc": "AUC", "balanced_accuracy": "balanced accuracy", "accuracy": "accuracy"}
CI_LEVEL = 0.95
# Config fields that change no task's result: a rerun differing only in them is the same study
# (OUT itself among them: a study folder copied or moved elsewhere continues there).
_RUN_ONLY_FIELDS = run_only_fields(StudyConfig)

Log = Callable[[str], None]


# --- options and the task list -----------------------------------------------------------------


def parse_ratios(text: str) -> list[float]:
    """'0,0.25,1' -> [0.0, 0.25, 1.0]."""
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--synth-ratio {text!r}: give numbers separated by commas") from None
    if not values:
        raise UserError("--synth-ratio: give at least one ratio, e.g. 0,0.5,1")
    return values


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r}: give integers separated by commas") from None
    if not values:
        raise UserError("--seeds: give at least one seed, e.g. 0,1,2")
    return values


def parse_models(text: str) -> list[int]:
    """'2,4,6,8' -> [2, 4, 6, 8]."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(
            f"--singan-models {text!r}: give model counts separated by commas, e.g. 2,4,6,8"
        ) from None
    return values


def normalise(config: StudyConfig) -> StudyConfig:
    """Ratios sorted and unique with 0 (real-only, the baseline of every pair) always in;
    seeds sorted and unique; model counts likewise, 0 (real only) in when any is given.
    `--synth-ratio 1,0.5` and `0,0.5,1` are then the same study."""
    for ratio in config.synth_ratios:
        if not math.isfinite(ratio) or ratio < 0:
            raise UserError(f"--synth-ratio {ratio} must be a finite number >= 0")
    for count in config.singan_models:
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise UserError(f"--singan-models {count!r}: model counts are whole numbers >= 0")
    ratios = sorted({0.0, *(float(r) for r in config.synth_ratios)})
    ratios = [int(r) if r.is_integer() else r for r in ratios]  # 1, not 1.0, in config.json
    seeds = sorted({int(s) for s in config.seeds})
    models = sorted({0, *config.singan_models}) if config.singan_models else []
    return dataclasses.replace(config, synth_ratios=ratios, seeds=seeds, singan_models=models)


@dataclass(frozen=True)
class Task:
    index: int
    seed: int
    fold: int
    ratio: float
    models: int | None = None  # a model-count arm: its images come from models 0..models-1

    @property
    def name(self) -> str:
        arm = f"ratio{self.ratio:g}" if self.models is None else f"models{self.models}"
        return f"{self.index:04d}-seed{self.seed}-fold{self.fold}-{arm}"

    @property
    def arm(self) -> tuple[float, int | None]:
        return (self.ratio, self.models)


def arms(config: StudyConfig) -> list[tuple[float, int | None]]:
    """The study's arms in order, the baseline first: (ratio, None) per ratio, or, with
    model-count arms, (0, 0) then (the one ratio > 0, K) per model count K."""
    config = normalise(config)
    if not config.singan_models:
        return [(ratio, None) for ratio in config.synth_ratios]
    ratio = max(config.synth_ratios)
    return [(ratio if count else 0, count) for count in config.singan_models]


def arm_label(ratio: float, models: int | None) -> str:
    """How tables name an arm: '0.25', or '0 models (real only)', '1 model', '4 models'."""
    if models is None:
        return f"{ratio:g}"
    if models == 0:
        return "0 models (real only)"
    return f"{models} model{'s' if models != 1 else ''}"


def task_list(config: StudyConfig) -> list[Task]:
    """Every task in array order: seed-major (the tasks of a seed share one backbone and one
    feature pass), then fold, then arm (real-only first)."""
    config = normalise(config)
    combos = itertools.product(config.seeds, range(config.folds), arms(config))
    return [
        Task(i, seed, fold, ratio, models) for i, (seed, fold, (ratio, models)) in enumerate(combos)
    ]


def validate(config: StudyConfig) -> None:
    """The study's own options here; the classifier's are classify's (checked in the run)."""
    if config.folds < 2:
        raise UserError(f"--folds {config.folds}: cross-validation needs at least 2 folds")
    if not config.seeds:
        raise UserError("--seeds: give at least one seed")
    if config.singan_models:
        config = normalise(config)
        if max(config.singan_models) == 0:
            raise UserError("--singan-models: give a model count above 0, e.g. 2,4,6,8")
        positive = [r for r in config.synth_ratios if r > 0]
        if len(positive) != 1:
            given = ",".join(f"{r:g}" for r in positive) or "none"
            raise UserError(
                f"--singan-models adds the same number of images in every arm: give one "
                f"--synth-ratio above 0 (e.g. --synth-ratio 1 --balance-minority), not {given}"
            )
    count = len(task_list(config))
    if config.task_id is not None and not 0 <= config.task_id < count:
        raise UserError(
            f"--task-id {config.task_id} is out of range: this study has tasks 0..{count - 1}"
        )


def config_from_dict(data: dict[str, Any]) -> StudyConfig:
    """A StudyConfig from its config.json (unknown keys such as `job` dropped)."""
    names = {f.name for f in dataclasses.fields(StudyConfig)}
    return StudyConfig(**{k: v for k, v in data.items() if k in names})


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The identity of a config.json, with the defaults of fields added since it was written."""
    filled = to_dict(config_from_dict(config))
    return {k: v for k, v in filled.items() if k not in _RUN_ONLY_FIELDS}


def task_path(out: Path, task: Task) -> Path:
    return Path(out) / TASKS / f"{task.name}.json"


def failed_path(out: Path, task: Task) -> Path:
    return Path(out) / TASKS / f"{task.name}{FAILED_SUFFIX}"


def check_out(config: StudyConfig) -> None:
    """One study per OUT: a config.json of another study there is refused (its tasks would
    mix with ours under the same indices); otherwise config.json is written."""
    out = Path(config.out)
    path = out / CONFIG
    wanted = to_dict(config)
    if path.is_file():
        try:
            before = read_json(path)
        except (OSError, ValueError) as err:
            raise UserError(
                f"{path} cannot be read ({err}): delete it or use another --out"
            ) from None
        if before.get("job") != STUDY_JOB:
            raise UserError(
                f"{out} holds a {before.get('job', 'non-study')} run, not a study: use another "
                "--out"
            )
        if comparable(before) != comparable(wanted):
            differ = sorted(
                k for k in comparable(wanted) if comparable(before).get(k) != comparable(wanted)[k]
            )
            raise UserError(
                f"{out} holds a study of another config (differs in {', '.join(differ)}): use "
                f"another --out, or delete {out / TASKS} and {path} to start it again"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, path)


# --- folds and the synthetic share ---------------------------------------------------------------


def patient_folds(
    patients: Sequence[str], labels: Sequence[int], folds: int, seed: int
) -> dict[str, int]:
    """Patient -> fold in 0..folds-1, from sklearn's StratifiedGroupKFold shuffled by `seed`:
    the folds hold disjoint patients, every patient is in exactly one, and each fold's class
    shares are as close to the whole's as whole patients allow. Only the (patient, label) pairs
    matter, not the order they come in (the input is sorted first)."""
    from sklearn.model_selection import StratifiedGroupKFold

    order = sorted(range(len(patients)), key=lambda i: (str(patients[i]), int(labels[i])))
    groups = [str(patients[i]) for i in order]
    y = np.asarray([int(labels[i]) for i in order])
    n_patients = len(set(groups))
    if n_patients < folds:
        raise UserError(
            f"--folds {folds} needs at least {folds} patients; the real train and test pools "
            f"hold {n_patients}: use --folds {max(2, n_patients)} or more real data"
        )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    assignment: dict[str, int] = {}
    with warnings.catch_warnings():  # "the least populated class has only N members": fine
        warnings.simplefilter("ignore", UserWarning)
        for fold, (_, test) in enumerate(splitter.split(np.zeros((len(y), 1)), y, groups)):
            for i in test:
                assignment[groups[i]] = fold
    empty = sorted(set(range(folds)) - set(assignment.values()))
    if empty:
        raise UserError(
            f"fold(s) {empty} of {folds} hold no patient ({n_patients} patients of very unequal "
            "sizes): use fewer --folds"
        )
    return dict(sorted(assignment.items()))


def synthetic_limit(
    real_counts: dict[int, int], ratio: float, balance_minority: bool = False
) -> dict[int, int]:
    """Synthetic images to add per class. Default: round(ratio x real training images of the
    class), as classify's real+synth-real. Balance-minority: round(ratio x the gap to the
    majority class), so the majority gets none and ratio 1 makes the classes equal."""
    if not balance_minority:
        return {c: round(ratio * n) for c, n in sorted(real_counts.items())}
    most = max(real_counts.values(), default=0)
    return {c: round(ratio * (most - n)) for c, n in sorted(real_counts.items())}


# --- metrics of one task (pure) ----------------------------------------------------------------


def task_metrics(
    labels: Sequence[int], probs: np.ndarray, classes: Sequence[int]
) -> dict[str, Any]:
    """Per-class one-vs-rest AUC, the headline AUC (2 classes: the positive, second class's;
    more: the mean over the classes the test fold holds), balanced accuracy (mean recall over
    the classes present) and accuracy. `probs[:, j]` is P(classes[j])."""
    from synthbreast.eval.metrics import roc_auc

    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.shape != (len(y), len(classes)):
        raise ValueError(f"probabilities {p.shape} do not match {len(y)} labels x {len(classes)}")
    pred = np.asarray(classes)[p.argmax(1)]
    per_class = {str(c): roc_auc((y == c).astype(np.int64), p[:, j]) for j, c in enumerate(classes)}
    if len(classes) == 2:
        auc = per_class[str(classes[1])]
    else:
        defined = [v for v in per_class.values() if v is not None]
        auc = float(np.mean(defined)) if defined else None
    recalls = [float(np.mean(pred[y == c] == c)) for c in classes if np.any(y == c)]
    return {
        "auc": auc,
        "auc_per_class": per_class,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "accuracy": float(np.mean(pred == y)) if len(y) else None,
    }


# --- reading and summarising (no torch) ----------------------------------------------------------


def read_study(out: Path, problems: list[str] | None = None) -> tuple[dict, list[dict], dict]:
    """(config.json, the task results of this config's list, {task name: error} of failed
    tasks) of a study folder. Unreadable or foreign task files become `problems` lines."""
    out = Path(out)
    problems = problems if problems is not None else []
    if not (out / CONFIG).is_file():
        raise UserError(f"{out / CONFIG} not found: {out} is not a `synthbreast study` folder")
    config = read_json(out / CONFIG)
    if not isinstance(config, dict) or config.get("job") != STUDY_JOB:
        raise UserError(f"{out / CONFIG} is not a study's config (job {STUDY_JOB})")
    results, failed = [], {}
    for task in task_list(config_from_dict(config)):
        path = task_path(out, task)
        if path.is_file():
            try:
                result = read_json(path)
            except (OSError, ValueError) as err:
                problems.append(f"{path}: cannot be read as JSON ({err}); counted as missing")
                continue
            same = isinstance(result, dict) and result.get("schema") == STUDY_TASK_SCHEMA
            if same and result.get("task", {}).get("index") == task.index:
                results.append(result)
                continue
            problems.append(f"{path}: not task {task.index} of this study; counted as missing")
        elif failed_path(out, task).is_file():
            try:
                failed[task.name] = str(read_json(failed_path(out, task)).get("error"))
            except (OSError, ValueError, AttributeError):
                failed[task.name] = "failed (its failed.json cannot be read)"
    return config, results, failed


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sd (n - 1) and count of the values that are numbers (None: undefined, e.g. the
    AUC of a fold holding one class)."""
    v = np.asarray([x for x in values if isinstance(x, (int, float))], dtype=np.float64)
    return {
        "mean": float(v.mean()) if len(v) else None,
        "sd": float(v.std(ddof=1)) if len(v) >= 2 else None,
        "n": len(v),
    }


def paired_interval(diffs: Sequence[float], test_over_train: float | None) -> dict[str, Any]:
    """Mean paired difference with its 95% t interval over the pairs, and the Nadeau-Bengio
    corrected interval: variance (1/n + n_test/n_train) s^2 instead of s^2 / n."""
    from scipy.stats import t as student_t

    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    entry: dict[str, Any] = {**spread(d), "ci95": None, "ci95_corrected": None}
    if n < 2:
        return entry
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    critical = float(student_t.ppf(0.5 + CI_LEVEL / 2, n - 1))
    half = critical * sd / math.sqrt(n)
    entry["ci95"] = [mean - half, mean + half]
    entry["t_critical"] = critical
    if test_over_train is not None:
        half = critical * sd * math.sqrt(1 / n + test_over_train)
        entry["ci95_corrected"] = [mean - half, mean + half]
    return entry


def summarise(
    config: dict[str, Any], results: list[dict[str, Any]], failed: dict[str, str] | None = None
) -> dict[str, Any]:
    """The study's summary (see the module docstring) from its config and task results."""
    failed = failed or {}
    study = config_from_dict(config)
    tasks = task_list(study)
    by_index = {r["task"]["index"]: r for r in results}
    classes = sorted({int(c) for r in results for c in r.get("classes", [])})
    metrics = list(METRICS)
    if len(classes) > 2:  # one AUC per class is the same number for 2 classes
        metrics += [f"auc_class{c}" for c in classes]

    def value(result: dict[str, Any], metric: str) -> float | None:
        if metric.startswith("auc_class"):
            return result.get("auc_per_class", {}).get(metric.removeprefix("auc_class"))
        return result.get(metric)

    def mean_of(rs: list[dict[str, Any]], key: str) -> float | None:
        return spread([r.get(key) for r in rs])["mean"]

    baseline = {(t.seed, t.fold): by_index.get(t.index) for t in tasks if t.ratio == 0}
    # test images per real training image: the Nadeau-Bengio correction's n_test / n_train
    test_images = sum(r["test_images"] for r in baseline.values() if r)
    train_images = sum(r["real_train_images"] for r in baseline.values() if r)
    test_over_train = test_images / train_images if train_images else None
    rows = []
    for ratio, models in arms(study):
        own = [t for t in tasks if t.arm == (ratio, models)]
        done = [by_index[t.index] for t in own if t.index in by_index]
        synthetic_counts = {
            str(c): spread([r["counts"]["synthetic_train"].get(str(c), 0) for r in done])["mean"]
            for c in classes
        }
        row: dict[str, Any] = {
            "ratio": ratio,
            "models": models,
            "arm": arm_label(ratio, models),
            "tasks": len(own),
            "done": len(done),
            "real_train_images": mean_of(done, "real_train_images"),
            "synthetic_train_images": mean_of(done, "synthetic_train_images"),
            "synthetic_per_class": synthetic_counts,
            "test_images": mean_of(done, "test_images"),
            "metrics": {m: spread([value(r, m) for r in done]) for m in metrics},
        }
        if models is not None:  # the images per SinGAN model of the arm, mean over its tasks
            used = sorted({m for r in done for m in r["counts"].get("synthetic_per_model", {})},
                          key=int)  # fmt: skip
            row["synthetic_per_model"] = {
                m: spread([r["counts"]["synthetic_per_model"].get(m, 0) for r in done])["mean"]
                for m in used
            }
        if ratio != 0:
            paired = {}
            for m in metrics:
                diffs = []
                for t in own:
                    base, this = baseline.get((t.seed, t.fold)), by_index.get(t.index)
                    if base and this and value(base, m) is not None and value(this, m) is not None:
                        diffs.append(value(this, m) - value(base, m))
                paired[m] = paired_interval(diffs, test_over_train)
            row["vs_real_only"] = paired
        rows.append(row)
    patients = sorted({p for r in results for p in r.get("test_patient_ids", [])})
    names = next((r["class_names"] for r in results if r.get("class_names")), None)
    missing = [t.name for t in tasks if t.index not in by_index and t.name not in failed]
    return {
        "schema": STUDY_SUMMARY_SCHEMA,
        "folds": study.folds,
        "seeds": study.seeds,
        "ratios": study.synth_ratios,
        "singan_models": study.singan_models,
        "balance_minority": study.balance_minority,
        "classes": classes,
        "class_names": names,
        "metrics": metrics,
        "patients": len(patients),
        "tasks": {
            "expected": len(tasks),
            "done": len(by_index),
            "failed": dict(sorted(failed.items())),
            "missing": missing,
        },
        "test_over_train": test_over_train,
        "intervals": (
            "mean +- sd over folds and seeds; differences to real-only paired by (seed, fold), "
            "95% t interval over the pairs, and the Nadeau-Bengio corrected interval "
            "(variance x (1/n + n_test/n_train) n: folds share training patients, so the plain "
            "one is too narrow)"
        ),
        "rows": rows,
        "config": config,
        "created_by": f"synthbreast {__version__}",
    }


def write_summary(out: Path, problems: list[str] | None = None) -> Path:
    """OUT/summary.json from the task results there now (complete or not)."""
    config, results, failed = read_study(Path(out), problems)
    path = Path(out) / SUMMARY
    atomic_write_json(path, summarise(config, results, failed))
    return path


def mean_sd(entry: dict[str, Any], digits: int = 3) -> str:
    """'0.912 ± 0.031' ('-' for no value, no '±' for one value)."""
    if entry.get("mean") is None:
        return "-"
    text = f"{entry['mean']:.{digits}f}"
    return text + (f" ± {entry['sd']:.{digits}f}" if entry.get("sd") is not None else "")


def interval_text(entry: dict[str, Any] | None, key: str = "ci95", digits: int = 3) -> str:
    """'+0.012 [-0.004, +0.028]'."""
    if not entry or entry.get("mean") is None:
        return "-"
    text = f"{entry['mean']:+.{digits}f}"
    if entry.get(key):
        low, high = entry[key]
        text += f" [{low:+.{digits}f}, {high:+.{digits}f}]"
    return text


def metric_name(metric: str, summary: dict[str, Any] | None = None) -> str:
    """'AUC', 'balanced accuracy', ... or 'AUC malignant' (the class's name when known)."""
    if not metric.startswith("auc_class"):
        return METRIC_NAMES.get(metric, metric)
    label = metric.removeprefix("auc_class")
    names = (summary or {}).get("class_names") or []
    if label.isdigit() and int(label) < len(names):
        return f"AUC {names[int(label)]}"
    return f"AUC class {label}"


def per_class_metrics(summary: dict[str, Any]) -> list[str]:
    """The per-class AUC metrics of a summary (more than 2 classes), in class order."""
    return [m for m in summary.get("metrics", []) if m.startswith("auc_class")]


def summary_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the study table: one row per arm (a ratio, or a SinGAN model count),
    with each class's AUC when there are more than 2 classes."""
    per_class = per_class_metrics(summary)
    header = ["SinGAN models" if summary.get("singan_models") else "ratio"]
    header += ["tasks", "real train", "synthetic train"]
    header += [f"{METRIC_NAMES[m]} (mean ± sd)" for m in METRICS]
    header += [f"{metric_name(m, summary)} (mean ± sd)" for m in per_class]
    header += ["ΔAUC vs real-only [95% t]", "ΔAUC [95% corrected]"]
    rows = []
    for row in summary["rows"]:
        paired = (row.get("vs_real_only") or {}).get("auc")
        rows.append(
            [
                row.get("arm") or f"{row['ratio']:g}",
                f"{row['done']}/{row['tasks']}",
                "-" if row["real_train_images"] is None else f"{row['real_train_images']:.0f}",
                "-"
                if row["synthetic_train_images"] is None
                else f"{row['synthetic_train_images']:.0f}",
                *(mean_sd(row["metrics"][m]) for m in METRICS),
                *(mean_sd(row["metrics"][m]) for m in per_class),
                interval_text(paired) if row["ratio"] else "(baseline)",
                interval_text(paired, "ci95_corrected") if row["ratio"] else "",
            ]
        )
    return header, rows


# --- running tasks (torch from here on, imported inside) ----------------------------------------


@dataclass
class Sources:
    """Which shards the study reads, from the manifests alone."""

    real: Any  # DataPlan: the real train and test pools, every sample
    synthetic: Any | None  # Part: every synthetic shard (None when every ratio is 0)
    classes: list[int]
    patient_level: bool
    inputs: dict[str, Any]  # the manifests and their sha256, recorded in every task result
    class_names: list[str] | None = None
    # model-count arms: {manifest path: selection index of the sample json's `model` m}
    singan_index: dict[str, list[int]] | None = None


def plan_sources(config: StudyConfig) -> Sources:
    from synthbreast.eval.scenarios import (
        ALL,
        REAL_TEST_POOL,
        REAL_TRAIN_POOL,
        SCENARIOS,
        DataPlan,
        check_provenance,
        plan_scenario,
        synthetic_folders,
    )

    needs_synthetic = any(r > 0 for r in config.synth_ratios)
    if needs_synthetic:
        needed_by = "--singan-models" if config.singan_models else "--synth-ratio above 0"
        synthetic_folders(config.synthetic, needed_by)  # the study's own message
    name = "real+synth-real" if needs_synthetic else "real-real"
    plan = plan_scenario(SCENARIOS[name], 0, config.real, config.synthetic)
    sizes = plan.image_sizes()
    if len(sizes) > 1:
        listed = "; ".join(f"{s} px: {', '.join(m)}" for s, m in sizes.items())
        raise UserError(
            f"the study's images differ in size ({listed}); generate at the real patch size "
            "(`synthbreast generate --output-size 50`)"
        )
    real_train, real_test = plan.train.parts[0], plan.test.parts[0]
    real = DataPlan((real_train, real_test))  # both pools, every image: the folds split them
    synthetic = dataclasses.replace(plan.train.parts[1], select=ALL) if needs_synthetic else None
    classes = sorted(
        {int(c) for ref in real_train.shards + real_test.shards for c, n in ref.counts.items() if n}
    )
    if len(classes) < 2:
        raise UserError(f"--real {config.real}: the train and test pools hold one class {classes}")
    inputs = {
        "real": real.manifests(),
        "synthetic": DataPlan((synthetic,)).manifests() if synthetic else [],
    }
    real_manifest_path = Path(real_train.shards[0].manifest)
    real_manifest = read_json(real_manifest_path)
    # the folds test every patient of both pools, not only the test pool's: a generator that
    # saw one of them (trained on the train pool) would be scored on its memory of them
    for entry in inputs["synthetic"]:
        path = Path(entry["path"])
        pools = (REAL_TRAIN_POOL, REAL_TEST_POOL)
        check_provenance(
            real_manifest_path.parent, real_manifest, pools, path.parent, read_json(path)
        )
    names = real_manifest["source"].get("class_names")
    singan_index = None
    if config.singan_models:
        singan_index = singan_selection_index(inputs["synthetic"], config.singan_models)
    return Sources(real, synthetic, classes, real.patient_level, inputs, names, singan_index)


def singan_selection_index(
    manifests: list[dict[str, str]], counts: Sequence[int]
) -> dict[str, list[int]]:
    """{manifest path: [selection index of model m]} of generate-singan folders, refusing
    other folders, folders of two different train-singan selections, and an arm asking for
    more models than the folders hold (arm K needs models 0..K-1)."""
    index: dict[str, list[int]] = {}
    seen: dict[int, tuple[str, str]] = {}  # selection index -> (model sha256, manifest)
    for entry in manifests:
        source = read_json(Path(entry["path"])).get("source", {})
        folder = Path(entry["path"]).parent
        if source.get("model_name") != "singan" or not source.get("models"):
            raise UserError(
                f"--singan-models: --synthetic {folder} was not made by `synthbreast "
                "generate-singan` (its manifest lists no SinGAN models): give generate-singan "
                "--out folders only"
            )
        index[entry["path"]] = [int(m["index"]) for m in source["models"]]
        for model in source["models"]:
            before = seen.setdefault(int(model["index"]), (model["sha256"], str(folder)))
            if before[0] != model["sha256"]:
                raise UserError(
                    f"--singan-models: --synthetic {before[1]} and {folder} hold different "
                    f"models {model['index']} (two train-singan selections): generate every "
                    "folder from the same train-singan --outdir"
                )
    present = set(seen)
    for count in counts:
        if not set(range(count)) <= present:
            have = len([i for i in range(max(counts)) if i in present])
            raise UserError(
                f"--singan-models {count}: the --synthetic folders hold samples of {have} "
                f"SinGAN models ({', '.join(map(str, sorted(present)))}); give counts up to "
                f"{have}, or train and generate more (train-singan --images, generate-singan "
                "--num-models)"
            )
    return index


def classify_config(config: StudyConfig, seed: int):
    """The classify config of the same classifier: what classify's functions take."""
    from synthbreast.config import ClassifyConfig

    return ClassifyConfig(
        out=config.out,
        real=config.real,
        synthetic=list(config.synthetic),
        backbone=config.backbone,
        weights=config.weights,
        weights_path=config.weights_path,
        mode=config.mode,
        input_size=config.input_size,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=seed,
        cache_features=config.cache_features,
        feature_cache=config.feature_cache,
        feature_batch_size=config.feature_batch_size,
        device=config.device,
    )


@dataclass
class Prepared:
    """One seed's classifier (its seeded initial state kept) and every image it reads."""

    model: Any
    initial: dict[str, Any]
    real: Any  # Samples of both real pools
    synthetic: Any | None  # Samples of every synthetic image
    synthetic_shards: list[str]  # each synthetic sample's shard sha256 (the selection hash)
    synthetic_models: list[int] | None  # model-count arms: each sample's model (selection index)
    forward: Callable
    prepare: Callable
    cached: bool
    feature_dir: str | None


def prepare_seed(
    config: StudyConfig, seed: int, sources: Sources, device, progress=None, log: Log | None = None
) -> Prepared:
    """Build the seed's classifier and read the images (or their cached features) once."""
    import torch
    from torch import nn

    from synthbreast.eval.classify import (
        FEATURES,
        FeatureCache,
        Samples,
        load_plan,
        parse_input_size,
        preprocess,
        read_shard,
        uses_cache,
    )
    from synthbreast.eval.scenarios import DataPlan
    from synthbreast.models.classifier import backbone_spec, build_classifier, load_imagenet_state

    size = parse_input_size(config.input_size)
    imagenet = None
    if config.weights == "imagenet":
        imagenet = load_imagenet_state(config.backbone, config.weights_path)
    torch.manual_seed(seed)  # the random backbone (weights none) and the new fc
    model = build_classifier(config.backbone, imagenet)
    if len(sources.classes) != 2:
        model.fc = nn.Linear(model.fc.in_features, len(sources.classes))
    model = model.to(device)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    cached = uses_cache(classify_config(config, seed))
    feature_dir = None
    plans = [sources.real] + ([DataPlan((sources.synthetic,))] if sources.synthetic else [])
    if cached:
        cache_root = Path(config.feature_cache or Path(config.out) / FEATURES)
        loader = FeatureCache(
            cache_root, model, config.backbone, size, device, config.feature_batch_size,
            progress, log,
        )  # fmt: skip
        loader.plan(plans)
        feature_dir = str(loader.dir)
        forward = model.fc

        def prepare(x):
            return x

    else:
        loader = read_shard
        forward = model
        norm = (backbone_spec(config.backbone).mean, backbone_spec(config.backbone).std)

        def prepare(x):
            return preprocess(x, size, device, *norm)

    real = load_plan(sources.real, seed, loader)
    synthetic, shards, models = None, [], None
    if sources.synthetic is not None:
        loaded = [loader(ref, "synthetic") for ref in sources.synthetic.shards]
        synthetic = Samples.concat(loaded)
        shards = [
            r.sha256 for r, s in zip(sources.synthetic.shards, loaded, strict=True) for _ in s.keys
        ]
        if sources.singan_index is not None:
            models = sample_models(sources.synthetic.shards, sources.singan_index, synthetic.keys,
                                   shards)  # fmt: skip
    if cached:
        real.x = real.x.to(device)
        if synthetic is not None:
            synthetic.x = synthetic.x.to(device)
    return Prepared(model, initial, real, synthetic, shards, models, forward, prepare, cached,
                    feature_dir)  # fmt: skip


def sample_models(
    refs: Sequence[Any], singan_index: dict[str, list[int]], keys: Sequence[str],
    shards: Sequence[str],
) -> list[int]:  # fmt: skip
    """Each synthetic sample's model as its index in the train-singan selection: the `model`
    m of its json (the m-th model generate-singan used), mapped through its manifest's list
    of models. In the order of `keys` (with their shards' sha256, `shards`)."""
    from synthbreast.data.shards import iter_shard

    found: dict[tuple[str, str], int] = {}
    for ref in refs:
        positions = singan_index[ref.manifest]
        for sample in iter_shard(ref.path):
            model = json.loads(sample["json"]).get("model")
            if not isinstance(model, int) or not 0 <= model < len(positions):
                raise UserError(
                    f"--singan-models: sample {sample['__key__']} of {ref.path} names no model "
                    f"of {ref.manifest} ({model!r}): make the folder again with generate-singan"
                )
            found[(ref.sha256, sample["__key__"])] = positions[model]
    return [found[(s, k)] for s, k in zip(shards, keys, strict=True)]


def singan_arm_mask(
    models: Sequence[int], labels: Sequence[int], hashes: Sequence[float],
    limit: dict[int, int], count: int,
) -> list[bool]:  # fmt: skip
    """Arm `count` of a model-count study: per class, `limit[c]` of its samples of models
    0..count-1, the models taking turns (each model's smallest hashes first), so every model
    gives the same share to within one. Fewer than `limit[c]` there: a UserError, as the arms
    must add the same number; a class no model drew (the SinGANs are of one class) adds none."""
    keep = [False] * len(models)
    for label, wanted in sorted(limit.items()):
        own = [i for i, y in enumerate(labels) if y == label]
        if not own or not wanted:
            continue
        by_model: dict[int, list[int]] = {}
        for i in own:
            if models[i] < count:
                by_model.setdefault(models[i], []).append(i)
        turns = sorted(
            (rank, model, i)
            for model, members in by_model.items()
            for rank, i in enumerate(sorted(members, key=lambda i: hashes[i]))
        )
        if len(turns) < wanted:
            raise UserError(
                f"--singan-models {count}: models 0..{count - 1} drew {len(turns)} images of "
                f"class {label} and every arm adds {wanted}: generate more images per model "
                "(generate-singan --shards/--per-shard), or lower --synth-ratio"
            )
        for _, _, i in turns[:wanted]:
            keep[i] = True
    return keep


def run_task(
    config: StudyConfig,
    task: Task,
    folds: dict[str, int],
    prepared: Prepared,
    sources: Sources,
    device,
) -> dict[str, Any]:
    """Train on the other folds' real images (+ the task's synthetic share), test on the
    fold's patients; the task's result record."""
    import torch

    from synthbreast.eval.classify import Samples, fit, threads
    from synthbreast.eval.scenarios import PER_CLASS_LIMIT, keep_mask
    from synthbreast.models.classifier import set_trainable, train_mode

    started = time.perf_counter()
    classes = sources.classes
    real = prepared.real
    in_test = [folds[p] == task.fold for p in real.patients]
    train_real, test = real.select([not t for t in in_test]), real.select(in_test)
    real_counts = {c: int((train_real.labels == c).sum()) for c in classes}
    limit = synthetic_limit(real_counts, task.ratio, config.balance_minority)
    train, synthetic_counts = train_real, {str(c): 0 for c in classes}
    per_model: dict[str, int] = {}
    if sum(limit.values()) > 0 and prepared.synthetic is not None:
        synth = prepared.synthetic
        if task.models is not None:
            keep = arm_mask(task, prepared, limit)
            per_model = dict.fromkeys(map(str, range(task.models)), 0)
            for model, kept in zip(prepared.synthetic_models, keep, strict=True):
                if kept:
                    per_model[str(model)] += 1
        else:
            part = dataclasses.replace(sources.synthetic, select=PER_CLASS_LIMIT, limit=limit)
            keep = keep_mask(
                part, prepared.synthetic_shards, synth.keys, synth.labels.tolist(), task.seed
            )
        chosen = synth.select(keep)
        synthetic_counts.update({str(c): int((chosen.labels == c).sum()) for c in classes})
        train = Samples.concat([train_real, chosen])
    missing = [c for c in classes if c not in set(train.labels.tolist())]
    if missing:
        raise UserError(
            f"task {task.name}: the training images hold no class {missing}; use fewer --folds"
        )

    # Train from the seed's initial weights (the same for every fold and ratio of the seed).
    model = prepared.model
    model.load_state_dict(prepared.initial)
    parameters = set_trainable(model, config.mode)
    index = torch.full((max(classes) + 1,), -1, dtype=torch.long)
    index[torch.tensor(classes)] = torch.arange(len(classes))
    targets = index[train.labels]
    train_mode(model, config.mode)
    torch.manual_seed(task.seed)  # dropout of a finetuned EfficientNet: same draws however run
    with threads(1 if prepared.cached and device.type == "cpu" else None):
        history = fit(
            prepared.forward, parameters, train.x, targets, prepared.prepare,
            classify_config(config, task.seed), device,
        )  # fmt: skip

    # Test.
    model.eval()
    with torch.no_grad():
        probs = []
        for start in range(0, len(test), config.feature_batch_size):
            logits = prepared.forward(
                prepared.prepare(test.x[start : start + config.feature_batch_size])
            )
            probs.append(torch.softmax(logits.float(), dim=1).cpu())
        prob = torch.cat(probs).double().numpy()
    measured = task_metrics(test.labels.numpy(), prob, classes)
    test_counts = {str(c): int((test.labels == c).sum()) for c in classes}
    counts: dict[str, Any] = {
        "real_train": {str(c): n for c, n in real_counts.items()},
        "synthetic_train": synthetic_counts,
        "synthetic_limit": {str(c): n for c, n in limit.items()},
        "test": test_counts,
    }
    if task.models is not None:
        counts["synthetic_per_model"] = per_model
    return {
        "schema": STUDY_TASK_SCHEMA,
        "task": {**dataclasses.asdict(task), "name": task.name, "of": len(task_list(config))},
        "classes": classes,
        "class_names": sources.class_names,
        **measured,
        "real_train_images": len(train_real),
        "synthetic_train_images": sum(synthetic_counts.values()),
        "test_images": len(test),
        "train_patients": len(set(train_real.patients)),
        "test_patients": len(set(test.patients)),
        "test_patient_ids": sorted(set(test.patients)),
        "counts": counts,
        "patient_level": sources.patient_level,
        "inputs": sources.inputs,
        "model": {
            "backbone": config.backbone,
            "weights": config.weights,
            "mode": config.mode,
            "input_size": config.input_size,
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "lr": config.lr,
            "cached_features": prepared.cached,
            "feature_cache": prepared.feature_dir,
        },
        "history": history,
        "seconds": round(time.perf_counter() - started, 3),
        "device": str(device),
        "config": to_dict(config),
        "created_by": f"synthbreast {__version__}",
    }


def arm_mask(task: Task, prepared: Prepared, limit: dict[int, int]) -> list[bool]:
    """Which synthetic samples a model-count task adds (singan_arm_mask, hashes of its seed)."""
    from synthbreast.eval.scenarios import sample_hash

    synth = prepared.synthetic
    hashes = [
        sample_hash(task.seed, s, k)
        for s, k in zip(prepared.synthetic_shards, synth.keys, strict=True)
    ]
    return singan_arm_mask(
        prepared.synthetic_models, synth.labels.tolist(), hashes, limit, task.models
    )


def check_arms(config: StudyConfig, tasks: Sequence[Task], folds: dict[str, int],
               prepared: Prepared, classes: Sequence[int]) -> None:  # fmt: skip
    """Every model-count task of a seed can add its number of images: checked before the
    first trains, so a short arm stops the run before it spends any time."""
    real = prepared.real
    for task in tasks:
        if not task.models or prepared.synthetic is None:
            continue
        train = [folds[p] != task.fold for p in real.patients]
        labels = [y for y, t in zip(real.labels.tolist(), train, strict=True) if t]
        counts = {c: labels.count(c) for c in classes}  # as run_task counts them
        arm_mask(task, prepared, synthetic_limit(counts, task.ratio, config.balance_minority))


def task_done(out: Path, task: Task, sources: Sources) -> bool:
    """The task's result exists; one made from other shards (a manifest changed) is an error."""
    path = task_path(out, task)
    if not path.is_file():
        return False
    try:
        result = read_json(path)
    except (OSError, ValueError):
        return False  # a damaged file: redo the task
    if result.get("task", {}).get("name") != task.name:
        return False
    if result.get("inputs") != sources.inputs:
        raise UserError(
            f"{path} was computed from other shards (a manifest changed since): use another "
            f"--out, or delete {path.parent} to redo every task"
        )
    return True


def run_study(config: StudyConfig, progress=None, log: Log | None = None) -> Path:
    """Run the study's tasks (one with task_id, else every one not done yet) into OUT.
    Returns OUT/summary.json (every task) or the task's result file (task_id)."""
    from synthbreast.devices import choose_device
    from synthbreast.eval.classify import validate as validate_classifier

    config = normalise(config)
    validate(config)
    # the classifier's own checks; a study task trains on real (+ synthetic) and tests on
    # real, the scenario classify's validate asks for
    validate_classifier(
        dataclasses.replace(classify_config(config, config.seeds[0]), scenario="real+synth-real")
    )
    sources = plan_sources(config)  # the inputs checked before OUT is written to
    check_out(config)
    out = Path(config.out)
    tasks = task_list(config)
    chosen = tasks if config.task_id is None else [tasks[config.task_id]]
    if not sources.patient_level and log:
        log("the real shards have no patient ids (one per image): the folds split images")
    todo = [t for t in chosen if config.force or not task_done(out, t, sources)]
    if log and len(todo) < len(chosen):
        log(f"{len(chosen) - len(todo)} of {len(chosen)} tasks complete, skipped (--force redoes)")
    device = choose_device(config.device)
    bar = None
    if progress is not None and todo:
        bar = progress.add_task("study tasks", total=len(chosen), completed=len(chosen) - len(todo))
    (out / TASKS).mkdir(parents=True, exist_ok=True)
    for seed, group in itertools.groupby(todo, key=lambda t: t.seed):
        prepared = prepare_seed(config, seed, sources, device, progress, log)
        folds = patient_folds(
            prepared.real.patients, prepared.real.labels.tolist(), config.folds, seed
        )
        group = list(group)
        check_arms(config, group, folds, prepared, sources.classes)
        for task in group:
            try:
                result = run_task(config, task, folds, prepared, sources, device)
            except Exception as err:
                atomic_write_json(
                    failed_path(out, task),
                    {
                        "task": task.name,
                        "error": f"{type(err).__name__}: {err}",
                        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    },
                )
                raise
            atomic_write_json(task_path(out, task), result)
            failed_path(out, task).unlink(missing_ok=True)
            if log:
                log(
                    f"{task.name}: AUC {_fmt(result['auc'])}, balanced accuracy "
                    f"{_fmt(result['balanced_accuracy'])} ({result['real_train_images']} real + "
                    f"{result['synthetic_train_images']} synthetic, {result['test_patients']} "
                    "test patients)"
                )
            if bar is not None:
                progress.advance(bar)
    if config.task_id is not None:
        return task_path(out, chosen[0])
    return write_summary(out)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
