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


# --- FID, KID and PRDC against the reference packages: float32, and fewer images than dims ---

# (images real, images synthetic, dimensions): more images than dimensions, and fewer (the
# covariances are singular: FID's matrix square root must still agree)
SHAPES = [(600, 450, 48), (40, 30, 64)]


def feature_sets(n_real: int, n_synthetic: int, dims: int, dtype) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(n_real + dims)
    real = rng.normal(size=(n_real, dims))
    mixing = np.eye(dims) + 0.1 * rng.normal(size=(dims, dims))
    synthetic = rng.normal(0.2, 1.0, size=(n_synthetic, dims)) @ mixing
    return real.astype(dtype), synthetic.astype(dtype)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # scipy's, inside pytorch-fid
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=["n>d", "n<d"])
def test_fid_equals_pytorch_fid_in_float32_and_with_few_images(shape, dtype):
    from pytorch_fid.fid_score import calculate_frechet_distance

    from synthbreast.eval import fidelity as F

    real, synthetic = feature_sets(*shape, dtype)
    # pytorch-fid's own statistics: np.mean in the features' precision, np.cov in float64
    stats = [(np.mean(x, axis=0), np.cov(x, rowvar=False)) for x in (real, synthetic)]
    expected = calculate_frechet_distance(*stats[0], *stats[1])
    got = F.fid(real, synthetic)
    # float32: pytorch-fid's float32 mean differs in the last bits; ours is the float64 one
    assert got == pytest.approx(expected, rel=1e-7 if dtype == np.float64 else 1e-6)
    assert got == F.fid(real.astype(np.float64), synthetic.astype(np.float64))
    assert got > 1, "two different distributions"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=["n>d", "n<d"])
def test_kid_equals_torch_fidelity_in_float32_and_with_few_images(shape, dtype):
    import torch
    from torch_fidelity.metric_kid import (
        KEY_METRIC_KID_MEAN,
        KEY_METRIC_KID_STD,
        kid_features_to_metric,
    )

    from synthbreast.eval import fidelity as F

    real, synthetic = feature_sets(*shape, dtype)
    size = min(100, *shape[:2])
    expected = kid_features_to_metric(
        torch.from_numpy(real), torch.from_numpy(synthetic), kid_subsets=20,
        kid_subset_size=size, rng_seed=3, verbose=False,
    )  # fmt: skip
    mean, std = F.kid(real, synthetic, subsets=20, subset_size=size, seed=3)
    # float32: torch-fidelity takes the kernel in float32, ours in float64 (the products in
    # float32 both): they agree to float32's rounding of an MMD of order 0.3
    rel = 1e-9 if dtype == np.float64 else 1e-5
    assert mean == pytest.approx(expected[KEY_METRIC_KID_MEAN], rel=rel)
    assert std == pytest.approx(expected[KEY_METRIC_KID_STD], rel=rel * 10)
    truth, _ = F.kid(real.astype(np.float64), synthetic.astype(np.float64), 20, size, seed=3)
    assert mean == pytest.approx(truth, rel=1e-6)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=["n>d", "n<d"])
def test_prdc_equals_prdc_package_in_float32_and_with_few_images(shape, dtype, capsys):
    from prdc import compute_prdc

    from synthbreast.eval import fidelity as F

    real, synthetic = feature_sets(*shape, dtype)
    expected = compute_prdc(real, synthetic, nearest_k=5)
    got = F.prdc(real, synthetic, k=5, row_block=17, column_block=13)
    for key in (F.PRECISION, F.RECALL, F.DENSITY, F.COVERAGE):
        assert got[key] == pytest.approx(float(expected[key]), abs=1e-12), key
    assert 0 < got[F.PRECISION] < 1 and 0 < got[F.COVERAGE] < 1
