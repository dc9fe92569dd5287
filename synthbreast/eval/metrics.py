"""Classification metrics as pure functions of (labels, P(class 1)), and bootstrap intervals.

Two classes: positive class = 1 (IDC+); precision, recall and F1 are those of class 1. A
prediction is class 1 when P(class 1) > 0.5, which is the argmax of two logits (ties go to
class 0). More classes (healthy / benign / malignant): `multiclass_metrics` of (labels, P(every
class)): the argmax prediction, per-class one-vs-rest AUC, precision, recall, F1 and ROC, their
macro averages (the headline `roc_auc`, `precision`, `recall`, `f1`), the K x K confusion
matrix, and the same patient bootstrap for accuracy, the macro AUC and each class's AUC.
Each function equals scikit-learn's (tests/test_metrics.py checks); they are written out here so
that the bootstrap can reuse one sort of the scores for its 1,000 resamples.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from synthbreast.results import METRICS_SCHEMA

LABELS = (0, 1)  # the two classes of a binary task (classification_metrics)
N_BOOT = 1000


def _arrays(y_true: Sequence[int], values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    y, v = np.asarray(y_true).astype(np.int64), np.asarray(values)
    if y.shape != v.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and values {v.shape} must be two equal 1-d arrays")
    return y, v


def predict(prob_1: Sequence[float]) -> np.ndarray:
    return (np.asarray(prob_1, dtype=np.float64) > 0.5).astype(np.int64)


def confusion_counts(y_true: Sequence[int], y_pred: Sequence[int]) -> list[list[int]]:
    """[[tn, fp], [fn, tp]]: rows are the true class, columns the predicted one."""
    y, p = _arrays(y_true, y_pred)
    return [[int(np.sum((y == t) & (p == q))) for q in LABELS] for t in LABELS]


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    y, p = _arrays(y_true, y_pred)
    return float(np.mean(y == p)) if len(y) else float("nan")


def precision(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    (_, fp), (_, tp) = confusion_counts(y_true, y_pred)
    return tp / (tp + fp) if tp + fp else 0.0  # scikit-learn's zero_division=0


def recall(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    _, (fn, tp) = confusion_counts(y_true, y_pred)
    return tp / (tp + fn) if tp + fn else 0.0


def f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    (_, fp), (fn, tp) = confusion_counts(y_true, y_pred)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def balanced_accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Mean recall over the classes present in y_true (as scikit-learn)."""
    counts = confusion_counts(y_true, y_pred)
    recalls = [row[i] / sum(row) for i, row in enumerate(counts) if sum(row)]
    return float(np.mean(recalls)) if recalls else float("nan")


def roc_curve(
    y_true: Sequence[int], score: Sequence[float], drop_intermediate: bool = True
) -> dict[str, list[float]]:
    """ROC points {"fpr", "tpr", "thresholds"} as scikit-learn's roc_curve (the first
    threshold is inf: nothing predicted positive). Empty lists when y_true has one class."""
    y, s = _arrays(y_true, score)
    if len(np.unique(y)) < 2:
        return {"fpr": [], "tpr": [], "thresholds": []}
    order = np.argsort(s, kind="mergesort")[::-1]
    s, y = s[order], y[order]
    last_of_value = np.r_[np.where(np.diff(s))[0], len(y) - 1]
    tps = np.cumsum(y)[last_of_value].astype(np.float64)
    fps = 1 + last_of_value - tps
    thresholds = s[last_of_value].astype(np.float64)
    if drop_intermediate and len(fps) > 2:
        # keep the corners only: drop points on a straight run of the curve
        keep = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    tps, fps, thresholds = np.r_[0, tps], np.r_[0, fps], np.r_[np.inf, thresholds]
    return {
        "fpr": (fps / fps[-1]).tolist(),
        "tpr": (tps / tps[-1]).tolist(),
        "thresholds": thresholds.tolist(),
    }


def _auc_from_ranks(
    score_rank: np.ndarray, n_ranks: int, y: np.ndarray, weight: np.ndarray
) -> float:
    """Weighted Mann-Whitney AUC: P(score of a positive > a negative's), ties counting half.
    `score_rank` indexes the sorted distinct scores, so resamples need no new sort."""
    positives = np.bincount(score_rank, weights=weight * y, minlength=n_ranks)
    negatives = np.bincount(score_rank, weights=weight * (1 - y), minlength=n_ranks)
    total_pos, total_neg = positives.sum(), negatives.sum()
    if total_pos == 0 or total_neg == 0:
        return float("nan")
    below = np.cumsum(negatives) - negatives
    return float(np.sum(positives * (below + 0.5 * negatives)) / (total_pos * total_neg))


def roc_auc(
    y_true: Sequence[int], score: Sequence[float], weight: Sequence[float] | None = None
) -> float | None:
    """Area under the ROC curve; None when y_true has one class (it is undefined)."""
    y, s = _arrays(y_true, score)
    w = np.ones(len(y)) if weight is None else np.asarray(weight, dtype=np.float64)
    distinct, rank = np.unique(s, return_inverse=True)
    value = _auc_from_ranks(rank.ravel(), len(distinct), y, w)
    return None if np.isnan(value) else value


def bootstrap_ci(
    y_true: Sequence[int],
    prob_1: Sequence[float],
    groups: Sequence[str] | None = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, Any]:
    """Percentile 95% intervals of accuracy and ROC AUC.

    With `groups` (patient ids) whole patients are resampled with replacement, each bringing all
    its images: images of one patient are not independent, and an image bootstrap would give
    too narrow an interval. Without, images are resampled. Same seed, same interval.
    """
    y, s = _arrays(y_true, prob_1)
    correct = (predict(s) == y).astype(np.float64)
    if groups is None:
        group_of, n_groups = np.arange(len(y)), len(y)
    else:
        names, group_of = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
        group_of, n_groups = group_of.ravel(), len(names)
    distinct, rank = np.unique(s, return_inverse=True)
    rank = rank.ravel()
    rng = np.random.default_rng(seed)
    accuracies, aucs = np.empty(n_boot), np.empty(n_boot)
    for b in range(n_boot):
        drawn = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
        weight = drawn[group_of].astype(np.float64)
        accuracies[b] = np.sum(weight * correct) / np.sum(weight)
        aucs[b] = _auc_from_ranks(rank, len(distinct), y, weight)
    aucs = aucs[~np.isnan(aucs)]  # resamples that drew a single class have no AUC
    auc_interval = None
    if len(np.unique(y)) == 2 and len(aucs) >= n_boot // 2:
        auc_interval = np.percentile(aucs, [2.5, 97.5]).tolist()
    return {
        "method": "patient bootstrap" if groups is not None else "image bootstrap",
        "n_boot": n_boot,
        "seed": seed,
        "groups": n_groups,
        "accuracy": np.percentile(accuracies, [2.5, 97.5]).tolist(),
        "roc_auc": auc_interval,
    }


def classification_metrics(
    y_true: Sequence[int],
    prob_1: Sequence[float],
    patients: Sequence[str] | None = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, Any]:
    """Every metric field of a classify run's metrics.json (see notes/contracts). JSON-ready:
    the ROC's infinite first threshold is written as null."""
    y, s = _arrays(y_true, prob_1)
    if len(y) == 0:
        raise ValueError("no test images: nothing to measure")
    pred = predict(s)
    counts = confusion_counts(y, pred)
    roc = roc_curve(y, s)
    roc["thresholds"] = [t if np.isfinite(t) else None for t in roc["thresholds"]]
    return {
        "accuracy": accuracy(y, pred),
        "precision": precision(y, pred),
        "recall": recall(y, pred),
        "f1": f1(y, pred),
        "balanced_accuracy": balanced_accuracy(y, pred),
        "roc_auc": roc_auc(y, s),
        "roc": roc,
        "confusion": {
            "labels": list(LABELS),
            "counts": counts,
            "row_percent": [
                [100 * n / sum(row) if sum(row) else 0.0 for n in row] for row in counts
            ],
        },
        "ci95": bootstrap_ci(y, s, patients, n_boot=n_boot, seed=seed),
    }


# --- any number of classes ---------------------------------------------------------------------


def _probabilities(y_true: Sequence[int], probs: Any) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(y_true).astype(np.int64), np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or y.shape != (len(p),):
        raise ValueError(f"labels {y.shape} and probabilities {p.shape} must be (N,) and (N, K)")
    return y, p


def predict_classes(probs: Any) -> np.ndarray:
    """The argmax class of each row (ties go to the lower class, as `predict` for two)."""
    return np.asarray(probs, dtype=np.float64).argmax(axis=1).astype(np.int64)


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], classes: int) -> list[list[int]]:
    """K x K counts: rows are the true class, columns the predicted one."""
    y, p = _arrays(y_true, y_pred)
    return [[int(np.sum((y == t) & (p == q))) for q in range(classes)] for t in range(classes)]


def _macro(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def multiclass_bootstrap_ci(
    y_true: Sequence[int],
    probs: Any,
    groups: Sequence[str] | None = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, Any]:
    """Percentile 95% intervals of accuracy, the macro one-vs-rest AUC and each class's AUC,
    resampling whole patients (with `groups`) or images, as `bootstrap_ci`."""
    y, p = _probabilities(y_true, probs)
    classes = p.shape[1]
    correct = (predict_classes(p) == y).astype(np.float64)
    if groups is None:
        group_of, n_groups = np.arange(len(y)), len(y)
    else:
        names, group_of = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
        group_of, n_groups = group_of.ravel(), len(names)
    ranks = []
    for c in range(classes):
        distinct, rank = np.unique(p[:, c], return_inverse=True)
        ranks.append((rank.ravel(), len(distinct), (y == c).astype(np.int64)))
    rng = np.random.default_rng(seed)
    accuracies, aucs = np.empty(n_boot), np.full((n_boot, classes), np.nan)
    for b in range(n_boot):
        drawn = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
        weight = drawn[group_of].astype(np.float64)
        accuracies[b] = np.sum(weight * correct) / np.sum(weight)
        for c, (rank, n_ranks, positive) in enumerate(ranks):
            aucs[b, c] = _auc_from_ranks(rank, n_ranks, positive, weight)

    def interval(values: np.ndarray, defined: bool) -> list[float] | None:
        values = values[~np.isnan(values)]  # resamples without both sides have no AUC
        if not defined or len(values) < n_boot // 2:
            return None
        return np.percentile(values, [2.5, 97.5]).tolist()

    present = [bool(np.any(y == c)) and bool(np.any(y != c)) for c in range(classes)]
    with warnings.catch_warnings():  # a resample without both sides of every class: nan
        warnings.simplefilter("ignore", RuntimeWarning)
        macro = np.nanmean(np.where(present, aucs, np.nan), axis=1) if any(present) else None
    return {
        "method": "patient bootstrap" if groups is not None else "image bootstrap",
        "n_boot": n_boot,
        "seed": seed,
        "groups": n_groups,
        "accuracy": np.percentile(accuracies, [2.5, 97.5]).tolist(),
        "roc_auc": interval(macro, True) if macro is not None else None,
        "per_class_roc_auc": [interval(aucs[:, c], present[c]) for c in range(classes)],
    }


def multiclass_metrics(
    y_true: Sequence[int],
    probs: Any,
    patients: Sequence[str] | None = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Every metric field of a classify run's metrics.json for K >= 2 classes from P(each class)
    (N, K). The headline precision, recall, F1 and `roc_auc` are macro averages over the classes
    (AUC: over those the test set holds, one-vs-rest); `per_class` has each class's figures and
    ROC, `ci95` the patient bootstrap of accuracy, macro AUC and each class's AUC."""
    y, p = _probabilities(y_true, probs)
    if len(y) == 0:
        raise ValueError("no test images: nothing to measure")
    classes = p.shape[1]
    names = list(class_names) if class_names is not None else [str(c) for c in range(classes)]
    pred = predict_classes(p)
    counts = confusion_matrix(y, pred, classes)
    ci = multiclass_bootstrap_ci(y, p, patients, n_boot=n_boot, seed=seed)
    per_class = []
    for c in range(classes):
        positive, predicted = (y == c).astype(np.int64), (pred == c).astype(np.int64)
        roc = roc_curve(positive, p[:, c])
        roc["thresholds"] = [t if np.isfinite(t) else None for t in roc["thresholds"]]
        per_class.append(
            {
                "class": c,
                "name": names[c],
                "support": int(positive.sum()),
                "precision": precision(positive, predicted),
                "recall": recall(positive, predicted),
                "f1": f1(positive, predicted),
                "roc_auc": roc_auc(positive, p[:, c]),
                "roc_auc_ci95": ci["per_class_roc_auc"][c],
                "roc": roc,
            }
        )
    macro = {
        key: _macro([row[key] for row in per_class])
        for key in ("precision", "recall", "f1", "roc_auc")
    }
    recalls = [row[i] / sum(row) for i, row in enumerate(counts) if sum(row)]
    return {
        "accuracy": accuracy(y, pred),
        "precision": macro["precision"],
        "recall": macro["recall"],
        "f1": macro["f1"],
        "balanced_accuracy": float(np.mean(recalls)) if recalls else float("nan"),
        "roc_auc": macro["roc_auc"],
        "averaging": "macro over classes, one-vs-rest",
        "class_names": names,
        "per_class": per_class,
        "macro": macro,
        "roc": None,  # one curve per class: per_class[c]["roc"]
        "confusion": {
            "labels": list(range(classes)),
            "names": names,
            "counts": counts,
            "row_percent": [
                [100 * n / sum(row) if sum(row) else 0.0 for n in row] for row in counts
            ],
        },
        "ci95": ci,
    }


# --- a classify run's result file ------------------------------------------------------------

# What classify's summary line and the report read from every metrics.json.
RESULT_KEYS = ("scenario", "accuracy", "roc_auc", "ci95", "data")


def result_problem(metrics: Any) -> str | None:
    """Why a parsed metrics.json is not a whole classify result, or None when it is one.
    classify redoes a scenario whose result has a problem; the report names it."""
    if not isinstance(metrics, dict):
        return f"not a JSON object but {type(metrics).__name__}"
    if metrics.get("schema") != METRICS_SCHEMA:
        return f"schema {metrics.get('schema')!r}, not {METRICS_SCHEMA!r}"
    missing = [key for key in RESULT_KEYS if key not in metrics]
    if missing:
        return f"no {', '.join(missing)}"
    if not isinstance(metrics["ci95"], dict) or not isinstance(metrics["data"], dict):
        return "ci95 or data is not a JSON object"
    return None
