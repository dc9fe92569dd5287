"""The procedural demo dataset: IDC layout, determinism, safe writes, and learnable structure."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from synthbreast.config import DemoDataConfig
from synthbreast.data import demo
from synthbreast.data.demo import (
    DEMO_MARKER,
    DEMO_README,
    PNG_COMMENT,
    demo_file_name,
    patient_stain,
    render_patch,
    write_demo_dataset,
)
from synthbreast.errors import UserError
from synthbreast.fileio import read_json, sha256_file

IDC_PATH = re.compile(
    r"^(?P<patient>[^/_]+)/(?P<folder>[01])/(?P=patient)_idx5_x(?P<x>\d+)_y(?P<y>\d+)"
    r"_class(?P=folder)\.png$"
)


def _files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def _pixels(root: Path) -> np.ndarray:
    return np.stack(
        [np.asarray(Image.open(p)) for p in _files(root).values() if p.suffix == ".png"]
    )


def _write(out: Path, **kwargs) -> dict:
    config = {"patients": 2, "per_class": 3, "seed": 0} | kwargs
    return write_demo_dataset(DemoDataConfig(str(out), **config))


# --- determinism and layout ------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_pixels(tmp_path):
    # Same folder name in two places: the README quotes the command, which names OUT.
    first, second, other = tmp_path / "a" / "d", tmp_path / "b" / "d", tmp_path / "c" / "d"
    _write(first)
    _write(second)
    _write(other, seed=1)
    hashes = {name: sha256_file(path) for name, path in _files(first).items()}
    assert hashes == {name: sha256_file(path) for name, path in _files(second).items()}
    assert DEMO_MARKER in hashes and DEMO_README in hashes
    assert not np.array_equal(_pixels(first), _pixels(other))


def test_layout_parses_as_idc(tmp_path):
    out = tmp_path / "idc"
    summary = _write(out, patients=3, per_class=4)
    assert summary["counts"] == {"0": 12, "1": 12}
    assert summary["patients"] == ["demo00", "demo01", "demo02"]
    counts, places = {"0": 0, "1": 0}, set()
    for name, path in _files(out).items():
        if "/" not in name:
            assert name in (DEMO_MARKER, DEMO_README)
            continue
        match = IDC_PATH.match(name)
        assert match, name
        counts[match["folder"]] += 1
        x, y = int(match["x"]), int(match["y"])
        assert (x - 1) % 50 == 0 and (y - 1) % 50 == 0
        places.add((match["patient"], x, y))
        with Image.open(path) as image:
            assert image.size == (50, 50) and image.mode == "RGB"
    assert counts == {"0": 12, "1": 12}
    assert len(places) == 24  # (patient, x, y) unique


def test_file_name_and_patient_ids():
    assert demo_file_name("demo03", 1051, 2501, 1) == "demo03_idx5_x1051_y2501_class1.png"
    with pytest.raises(ValueError):
        demo_file_name("demo_03", 1, 1, 0)
    assert demo._patient_ids(3) == ["demo00", "demo01", "demo02"]
    assert demo._patient_ids(101)[-1] == "demo100"


def test_render_patch_shape_and_size():
    stain = patient_stain(np.random.default_rng(0))
    for size in (8, 50, 64):
        patch = render_patch(np.random.default_rng(1), 1, stain, size)
        assert patch.shape == (size, size, 3) and patch.dtype == np.uint8


def test_says_it_is_not_real(tmp_path):
    out = tmp_path / "d"
    _write(out, seed=7)
    marker = read_json(out / DEMO_MARKER)
    assert marker["kind"] == "synthbreast-demo" and marker["real"] is False
    assert "not real" in marker["note"]
    assert marker["config"]["seed"] == 7 and marker["config"]["per_class"] == 3
    assert marker["counts"] == {"patients": 2, "images": 12, "0": 6, "1": 6}
    readme = (out / DEMO_README).read_text()
    assert "NOT REAL TISSUE" in readme and "--seed 7" in readme
    for path in (out / "demo01" / "1").iterdir():
        with Image.open(path) as image:
            assert image.text["Comment"] == PNG_COMMENT


def test_progress_counts_every_patch(tmp_path):
    seen = []
    write_demo_dataset(DemoDataConfig(str(tmp_path / "d"), 3, 2), on_progress=seen.append)
    assert sum(seen) == 12


# --- refusing, overwriting, interrupting ----------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [("patients", 0, "--patients"), ("per_class", 0, "--per-class"), ("patch_size", 4, "8")],
)
def test_bad_config(tmp_path, field, value, words):
    with pytest.raises(UserError, match=re.escape(words)):
        _write(tmp_path / "d", **{field: value})
    assert not (tmp_path / "d").exists()


def test_refuses_non_empty_out_without_overwrite(tmp_path):
    out = tmp_path / "d"
    _write(out)
    before = {name: sha256_file(path) for name, path in _files(out).items()}
    with pytest.raises(UserError, match="--overwrite") as error:
        _write(out, seed=1)
    assert str(out) in str(error.value)
    assert before == {name: sha256_file(path) for name, path in _files(out).items()}


def test_overwrite_replaces_a_demo_dataset(tmp_path):
    out = tmp_path / "d"
    _write(out, patients=3)
    _write(out, patients=1, seed=5, overwrite=True)
    assert read_json(out / DEMO_MARKER)["config"]["seed"] == 5
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["demo00"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary or old folder left


def test_writes_into_an_empty_folder(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    _write(out)
    assert (out / DEMO_MARKER).is_file()


def test_will_not_delete_a_folder_that_is_not_demo_data(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="not a synthbreast demo dataset"):
        _write(out, overwrite=True)
    assert (out / "thesis.tex").read_text() == "years of work"
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]


def test_interrupted_run_leaves_nothing(tmp_path):
    out = tmp_path / "d"

    def interrupt(n: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_demo_dataset(DemoDataConfig(str(out), 3, 2), on_progress=interrupt)
    assert list(tmp_path.iterdir()) == []


# --- the classes differ in structure, not in mean colour ------------------------------

# Ruifrok & Johnston's H and E vectors plus their cross product: fixed, not the patient's tint.
_H, _E = np.array([0.65, 0.70, 0.29]), np.array([0.07, 0.99, 0.11])
_STAINS = np.stack([_H, _E, np.cross(_H, _E)])
_UNMIX = np.linalg.inv(_STAINS / np.linalg.norm(_STAINS, axis=1, keepdims=True))


def _structure_features(image: np.ndarray) -> list[float]:
    """Nuclei as dark hematoxylin blobs above their neighbourhood: count, size, cover, edges."""
    density = -np.log((image.astype(float) + 1) / 256)
    hema = (density.reshape(-1, 3) @ _UNMIX)[:, 0].reshape(image.shape[:2])
    above = hema - ndimage.uniform_filter(hema, 7)  # a local threshold ignores diffuse haze
    features = []
    for threshold in (0.1, 0.2, 0.3):
        blobs, count = ndimage.label(above > threshold)
        areas = np.bincount(blobs.ravel())[1:] if count else np.zeros(1)
        features += [np.log1p(count), np.log1p(areas.mean()), (above > threshold).mean()]
    grad_y, grad_x = np.gradient(hema)
    return [*features, np.hypot(grad_x, grad_y).mean(), above.std(), np.log(hema.var() + 1e-6)]


def _patient_split_accuracy(features: np.ndarray, labels: np.ndarray, patients: np.ndarray):
    train = patients < np.median(patients)  # half the patients train, the other half test
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(features[train], labels[train])
    return model.score(features[~train], labels[~train])


def test_classes_differ_in_structure_not_mean_colour(tmp_path):
    # Measured (seed 0, 10 patients x 40 per class, test on 5 unseen patients): mean RGB 0.61,
    # structure features 0.98 (seeds 1-3: mean 0.58-0.61, structure 0.95-0.97).
    out = tmp_path / "d"
    write_demo_dataset(DemoDataConfig(str(out), patients=10, per_class=40, seed=0))
    mean_rgb, structure, labels, patients = [], [], [], []
    for name, path in _files(out).items():
        match = IDC_PATH.match(name)
        if not match:
            continue
        image = np.asarray(Image.open(path).convert("RGB"))
        mean_rgb.append(image.reshape(-1, 3).mean(axis=0))
        structure.append(_structure_features(image))
        labels.append(int(match["folder"]))
        patients.append(int(match["patient"].removeprefix("demo")))
    labels, patients = np.array(labels), np.array(patients)
    colour_only = _patient_split_accuracy(np.array(mean_rgb), labels, patients)
    by_structure = _patient_split_accuracy(np.array(structure), labels, patients)
    assert colour_only <= 0.75, colour_only
    assert by_structure >= 0.9, by_structure
    assert by_structure - colour_only >= 0.2
