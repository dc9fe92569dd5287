"""Metrics equal scikit-learn's on fixed predictions; bootstrap intervals are seeded and sane."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as sk

from synthbreast.eval import metrics as m


@pytest.fixture(scope="module")
def predictions():
    """300 images of 30 patients; scores informative but imperfect, with ties (rounded)."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    prob = np.clip(0.5 + 0.35 * (y - 0.5) + rng.normal(0, 0.25, 300), 0, 1).round(2)
    patients = np.array([f"p{i % 30:02d}" for i in range(300)])
    return y, prob, patients


def test_point_metrics_equal_scikit_learn(predictions):
    y, prob, _ = predictions
    pred = (prob > 0.5).astype(int)
    assert np.array_equal(m.predict(prob), pred)
    assert m.accuracy(y, pred) == pytest.approx(sk.accuracy_score(y, pred))
    assert m.precision(y, pred) == pytest.approx(sk.precision_score(y, pred))
    assert m.recall(y, pred) == pytest.approx(sk.recall_score(y, pred))
    assert m.f1(y, pred) == pytest.approx(sk.f1_score(y, pred))
    assert m.balanced_accuracy(y, pred) == pytest.approx(sk.balanced_accuracy_score(y, pred))
    assert m.roc_auc(y, prob) == pytest.approx(sk.roc_auc_score(y, prob))
    weight = np.random.default_rng(2).integers(0, 4, len(y))
    assert m.roc_auc(y, prob, weight) == pytest.approx(
        sk.roc_auc_score(y, prob, sample_weight=weight)
    )
    assert m.confusion_counts(y, pred) == sk.confusion_matrix(y, pred, labels=[0, 1]).tolist()
    for drop in (True, False):
        fpr, tpr, thresholds = sk.roc_curve(y, prob, drop_intermediate=drop)
        ours = m.roc_curve(y, prob, drop_intermediate=drop)
        assert np.allclose(ours["fpr"], fpr) and np.allclose(ours["tpr"], tpr)
        assert np.array_equal(ours["thresholds"], thresholds)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_degenerate_predictions_follow_scikit_learn():
    y, nothing_positive = [0, 1, 1, 0], [0, 0, 0, 0]
    assert m.precision(y, nothing_positive) == sk.precision_score(
        y, nothing_positive, zero_division=0
    )
    assert m.f1(y, nothing_positive) == sk.f1_score(y, nothing_positive, zero_division=0)
    one_class = [1, 1, 1]
    assert m.roc_auc(one_class, [0.2, 0.9, 0.6]) is None
    assert m.roc_curve(one_class, [0.2, 0.9, 0.6]) == {"fpr": [], "tpr": [], "thresholds": []}
    assert m.balanced_accuracy(one_class, [1, 0, 1]) == pytest.approx(
        sk.balanced_accuracy_score(one_class, [1, 0, 1])
    )


def test_metrics_json_fields(predictions):
    y, prob, patients = predictions
    result = m.classification_metrics(y, prob, patients, n_boot=200, seed=0)
    json.dumps(result, allow_nan=False)  # strict JSON: the inf threshold became null
    assert result["roc"]["thresholds"][0] is None
    confusion = result["confusion"]
    assert confusion["labels"] == [0, 1]
    assert sum(map(sum, confusion["counts"])) == len(y)
    for row in confusion["row_percent"]:
        assert sum(row) == pytest.approx(100)
    assert result["ci95"]["method"] == "patient bootstrap" and result["ci95"]["groups"] == 30


def test_bootstrap_is_seeded_and_contains_the_estimate(predictions):
    y, prob, patients = predictions
    accuracy = m.accuracy(y, m.predict(prob))
    auc = m.roc_auc(y, prob)
    by_patient = m.bootstrap_ci(y, prob, patients, n_boot=300, seed=3)
    assert by_patient == m.bootstrap_ci(y, prob, patients, n_boot=300, seed=3)
    assert by_patient != m.bootstrap_ci(y, prob, patients, n_boot=300, seed=4)
    by_image = m.bootstrap_ci(y, prob, None, n_boot=300, seed=3)
    assert by_image["method"] == "image bootstrap"
    for ci in (by_patient, by_image):
        low, high = ci["accuracy"]
        assert low < accuracy < high
        low, high = ci["roc_auc"]
        assert low < auc < high


def test_patient_bootstrap_is_wider_when_patients_differ():
    # each patient is either all right or all wrong: images are far from independent
    rng = np.random.default_rng(0)
    patients = np.repeat([f"p{i}" for i in range(20)], 25)
    y = rng.integers(0, 2, 500)
    right = np.repeat(rng.random(20) < 0.7, 25)
    prob = np.where(right == (y == 1), 0.8, 0.2)
    wide = m.bootstrap_ci(y, prob, patients, n_boot=300, seed=0)["accuracy"]
    narrow = m.bootstrap_ci(y, prob, None, n_boot=300, seed=0)["accuracy"]
    assert wide[1] - wide[0] > 2 * (narrow[1] - narrow[0])
