"""The mias-layout demo: procedural grey films, labelled demo, read by the real mias layout."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from synthbreast.config import DemoDataConfig
from synthbreast.data import demo_mammo
from synthbreast.data.demo import DEMO_MARKER, DEMO_README, demo_class_names, write_demo_dataset
from synthbreast.data.layouts import LAYOUTS
from synthbreast.errors import UserError
from synthbreast.fileio import read_json


def test_film_is_grey_with_lesions_where_the_table_says(tmp_path):
    rng = np.random.default_rng([0, 1])
    image, lesions = demo_mammo.render_film(rng, "G", "malignant", right=True, n=512)
    assert image.dtype == np.uint8 and image.shape == (512, 512)
    assert lesions and all(les.severity == "M" for les in lesions)
    assert image[:, :40].mean() < image[:, -100:].mean()  # right film: breast on the right
    again, _ = demo_mammo.render_film(np.random.default_rng([0, 1]), "G", "malignant", True, 512)
    assert np.array_equal(image, again)  # the same seed, the same film
    for row, lesion in zip(demo_mammo.info_rows("mdb002", "G", lesions, 512), lesions, strict=True):
        words = row.split()
        assert words[:4] == ["mdb002", "G", lesion.kind, "M"]
        assert int(words[5]) == 512 - lesion.y  # y counted from the bottom, as MIAS


def test_demo_data_in_the_mias_layout(tmp_path):
    out = tmp_path / "films"
    summary = write_demo_dataset(DemoDataConfig(str(out), patients=2, format="mias"))
    assert summary["counts"]["films"] == 4
    assert sorted(p.name for p in out.glob("*.pgm")) == [f"mdb00{i}.pgm" for i in range(1, 5)]
    marker = read_json(out / DEMO_MARKER)
    assert marker["real"] is False and marker["config"]["format"] == "mias"
    assert "NOT REAL MAMMOGRAMS" in (out / DEMO_README).read_text()
    assert b"not a real mammogram" in (out / "mdb001.pgm").read_bytes()[:80]
    with Image.open(out / "mdb001.pgm") as film:
        assert film.mode == "L" and film.size == (1024, 1024)
    scan = LAYOUTS["mias"].scan(out)
    assert not scan.problems and len(scan.records) == 4
    assert {r.patient for r in scan.records} == {"mdb001-002", "mdb003-004"}  # pairs
    lesions = [les for r in scan.records for les in r.lesions]
    assert len(lesions) == summary["counts"]["lesions_B"] + summary["counts"]["lesions_M"]
    assert demo_class_names("mias") == ["healthy", "benign", "malignant"]


def test_demo_format_unknown_is_one_line():
    with pytest.raises(UserError, match="--format 'csv' has no demo data"):
        demo_class_names("csv")
