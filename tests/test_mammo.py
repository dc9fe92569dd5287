"""Mammography ingest: the mias and csv layouts, lesion and healthy patches, grey shards.

Small MIAS-layout folders are written here (PGM films with a bright breast and brighter
lesions at known places); the real mini-MIAS sample is used where it exists.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from synthbreast.cli import app
from synthbreast.config import IngestConfig
from synthbreast.data.ingest import run_ingest
from synthbreast.data.layouts import mias_patient, parse_mias_table
from synthbreast.data.mammo import MASK_STEP, breast_mask, pectoral_mask
from synthbreast.data.reader import shard_dataset
from synthbreast.data.shards import iter_shard, load_manifest, verify_shards
from synthbreast.errors import UserError

from .conftest import REPO

REAL_MIAS = Path(
    os.environ.get("SYNTHBREAST_REAL_MIAS", REPO.parent / "shared" / "real-sample" / "mias")
)
SIDE = 320  # fixture films: 320 x 320 (the real ones are 1024)


def pectoral_wedge(top: float = 0.3, down: float = 0.55) -> np.ndarray:
    """The fixture films' pectoral muscle: a wedge `top` x SIDE wide at the top of the left
    wall, narrowing to nothing `down` x SIDE below."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    return xx < SIDE * top * (1 - yy / (SIDE * down))


def film(lesions: list[tuple[int, int, int]], seed: int, muscle: bool = False) -> np.ndarray:
    """A grey film: black background, a half-disc breast of textured grey on the left, and a
    white disc at each (x, y_from_top, radius); with `muscle`, a brighter pectoral wedge in
    the breast's upper chest-wall corner."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    image = np.zeros((SIDE, SIDE), dtype=np.float64)
    breast = (xx / (SIDE * 0.8)) ** 2 + ((yy - SIDE / 2) / (SIDE * 0.48)) ** 2 < 1
    image[breast] = 90 + rng.normal(0, 6, size=breast.sum())
    if muscle:
        image[breast & pectoral_wedge()] += 70
    for x, y, radius in lesions:
        image[(xx - x) ** 2 + (yy - y) ** 2 < radius**2] = 250
    return np.clip(image, 0, 255).astype(np.uint8)


def write_mias(
    root: Path, rows: dict[int, list], extra_rows: str = "", muscle: bool = False
) -> Path:
    """mdbNNN.pgm for each number in rows (lesions as (B|M, x, y_top, r), or 'NORM', or a
    (B|M,) lesion without coordinates) and Info.txt with y counted from the bottom."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for number, lesions in sorted(rows.items()):
        ref = f"mdb{number:03d}"
        if lesions == "NORM":
            lines.append(f"{ref} G NORM ")
            drawn = []
        else:
            drawn = [(x, y, r) for _, *rest in lesions if rest for x, y, r in [rest]]
            for severity, *rest in lesions:
                if rest:
                    x, y, r = rest
                    lines.append(f"{ref} F CIRC {severity} {x} {SIDE - y} {r}")
                else:
                    lines.append(f"{ref} D CALC {severity} *NOTE 3*")
        Image.fromarray(film(drawn, number, muscle)).save(root / f"{ref}.pgm")
    (root / "Info.txt").write_text("\n".join(lines) + "\n" + extra_rows)
    return root


# Six women (12 films): benign and malignant lesions, one film with two lesions, one normal
# film, one lesion without coordinates.
ROWS = {
    1: [("B", 120, 100, 18)],
    2: [("M", 150, 200, 14)],
    3: [("B", 100, 220, 16), ("M", 160, 90, 12)],  # two lesions on one film
    4: "NORM",
    5: [("M", 130, 160, 20)],
    6: [("B", 90, 120, 15)],
    7: [("B", 140, 230, 17)],
    8: [("M", 110, 80, 13)],
    9: [("M",)],  # diffuse: no coordinates
    10: [("B", 150, 150, 16)],
    11: [("M", 100, 130, 15)],
    12: [("B", 120, 210, 14)],
}


def ingest(src: Path, out: Path, **options) -> dict:
    options = {"format": "mias", "patch_size": 64, "min_shards": 1, "workers": 1, **options}
    return run_ingest(IngestConfig(src=str(src), out=str(out), **options))


def samples(root: Path) -> list[tuple[str, dict, bytes, int]]:
    manifest = load_manifest(root)
    rows = []
    for shard in manifest["shards"]:
        for sample in iter_shard(root / shard["name"]):
            meta = json.loads(sample["json"])
            rows.append((shard["pool"], meta, sample["png"], int(sample["cls"])))
    return rows


@pytest.fixture(scope="module")
def mias_dir(tmp_path_factory) -> Path:
    # mdb013 is named in Info.txt but absent, as most rows are in the real sample
    return write_mias(tmp_path_factory.mktemp("mias") / "src", ROWS, "mdb013 G NORM \n")


@pytest.fixture(scope="module")
def mias_shards(mias_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mias-shards") / "s"
    ingest(mias_dir, out)
    return out


# --- the Info.txt table ---------------------------------------------------------------------


def test_info_table_rows_and_quirks():
    lesions, normal, problems = parse_mias_table(
        "mdb001 G CIRC B 535 425 197\n"
        "mdb005 F CIRC B 477 133 30\n"
        "mdb005 F CIRC B 500 168 26\n"
        "mdb003 D NORM \n"
        "mdb059 F CIRC B\n"
        "mdb216 D CALC M *NOTE 3* \n"
        "\n"
        "mdb300 F SPIC Q 1 2 3\n"
    )
    assert normal == {"mdb003"}
    assert [(les.x, les.y, les.radius) for les in lesions["mdb005"]] == [
        (477, 133, 30),
        (500, 168, 26),
    ]
    assert lesions["mdb001"][0].y_from_bottom and lesions["mdb001"][0].ref == "Info.txt:1"
    assert not lesions["mdb059"][0].located and not lesions["mdb216"][0].located
    assert lesions["mdb216"][0].pathology == "malignant"
    # a bad row is named by line, and its film's lesions become unknown (no healthy crops)
    assert [(p.path, p.reason) for p in problems] == [("Info.txt:8", "bad_row")]
    assert not lesions["mdb300"][0].located


def test_left_and_right_films_are_one_patient():
    assert mias_patient(1) == mias_patient(2) == "mdb001-002"
    assert mias_patient(3) == mias_patient(4) != mias_patient(2)
    assert mias_patient(314) == "mdb313-314"


# --- patches ------------------------------------------------------------------------------


def test_lesion_patches_are_centred_on_the_lesion(mias_shards):
    """y counts from the bottom in Info.txt: a crop at (x, y) unflipped would miss the disc."""
    lesions = [(pool, meta, png) for pool, meta, png, _ in samples(mias_shards)]
    lesions = [(meta, png) for _, meta, png in lesions if meta["kind"] == "lesion"]
    assert len(lesions) == sum(
        1 for rows in ROWS.values() if rows != "NORM" for r in rows if len(r) == 4
    )
    for meta, png in lesions:
        pixels = np.asarray(Image.open(io.BytesIO(png)))
        ys, xs = np.nonzero(pixels > 200)
        assert len(xs) > 50, meta["path"]
        assert abs(xs.mean() - 31.5) < 2 and abs(ys.mean() - 31.5) < 2, meta
        # the disc fills the lesion box, which is 1/1.2 of the crop (bbox context, 20 %)
        assert 0.35 < (pixels > 200).mean() < 0.7


def test_manifest_records_source_position_and_scale(mias_shards):
    manifest = load_manifest(mias_shards)
    listed = {p["key"]: p for p in manifest["patches"]["list"]}
    rows = samples(mias_shards)
    assert len(listed) == len(rows) == manifest["totals"]["images"]
    for pool, meta, _, label in rows:
        key = next(k for k, p in listed.items() if p["box"] == meta["box"] and p["pool"] == pool)
        entry = listed[key]
        assert entry["source"] == meta["path"] and entry["label"] == label
        x0, y0, x1, y1 = entry["box"]
        assert x1 - x0 == y1 - y0 and entry["scale"] == pytest.approx(64 / (x1 - x0), abs=1e-5)
        if meta["kind"] == "lesion":
            number = int(meta["path"][3:6])
            cx, cy = meta["lesion"]["centre"]
            assert any(abs(cx - x) < 1 and abs(cy - y) < 1 for _, x, y, _ in ROWS[number])


def test_healthy_patches_are_breast_tissue_clear_of_every_lesion(mias_shards):
    manifest = load_manifest(mias_shards)
    healthy = [(m, png) for _, m, png, _ in samples(mias_shards) if m["kind"] == "healthy"]
    # 2 per film, none from mdb009 (its lesion has no place)
    assert len(healthy) == 2 * (len(ROWS) - 1)
    assert all(m["path"] != "mdb009.pgm" for m, _ in healthy)
    for meta, png in healthy:
        pixels = np.asarray(Image.open(io.BytesIO(png)))
        assert meta["tissue"] >= 0.9
        assert (pixels < 20).mean() < 0.15, "a healthy patch of black background"
        assert (pixels > 200).mean() == 0, f"a lesion inside the healthy patch {meta}"
        x0, y0, x1, y1 = meta["box"]
        lesions = [] if ROWS[int(meta["path"][3:6])] == "NORM" else ROWS[int(meta["path"][3:6])]
        for _, x, y, r in [les for les in lesions if len(les) == 4]:
            dx, dy = max(x0 - x, 0, x - x1), max(y0 - y, 0, y - y1)
            assert dx * dx + dy * dy > (r + 32) ** 2
    assert manifest["patches"]["unlocated_lesions"] == ["Info.txt:10"]


def test_pectoral_wedge_is_found_against_either_chest_wall():
    wedge = pectoral_wedge()[::MASK_STEP, ::MASK_STEP]
    for flip in (lambda a: a, np.fliplr):  # the wall on the left, then on the right
        image = flip(film([], 0, muscle=True))
        breast = breast_mask(image)
        found = pectoral_mask(image, breast)
        truth = flip(wedge) & breast
        assert found is not None
        overlap = (found & truth).sum() / (found | truth).sum()
        assert overlap > 0.8, f"intersection over union {overlap:.2f}"
    assert pectoral_mask(film([], 0), breast_mask(film([], 0))) is None  # no muscle, none found


def test_healthy_patches_keep_out_of_the_pectoral_muscle(tmp_path):
    """MIAS films are MLO views: under the default --pectoral auto no healthy crop has more
    than a sliver of muscle; --pectoral keep lets them fall on it (the muscle is bright breast
    by the mask alone)."""
    src = write_mias(tmp_path / "src", ROWS, muscle=True)
    wedge = pectoral_wedge()

    def muscle_shares(out: Path) -> list[float]:
        boxes = [m["box"] for _, m, _, _ in samples(out) if m["kind"] == "healthy"]
        return [wedge[max(0, y0) : y1, max(0, x0) : x1].mean() for x0, y0, x1, y1 in boxes]

    manifest = ingest(src, tmp_path / "auto", healthy_per_image=4)
    # every film but mdb009 (a lesion without a place: no healthy crop from it is searched)
    films = [f"mdb{n:03d}.pgm" for n in ROWS if n != 9]
    assert manifest["patches"]["pectoral"] == {"mode": "auto", "searched": 11, "found": films}
    assert max(muscle_shares(tmp_path / "auto")) < 0.1
    kept = ingest(src, tmp_path / "keep", healthy_per_image=4, pectoral="keep")
    assert kept["patches"]["pectoral"]["searched"] == 0
    assert max(muscle_shares(tmp_path / "keep")) > 0.5


def test_classes_pools_and_pairs(mias_shards):
    manifest = load_manifest(mias_shards)
    assert manifest["source"]["class_names"] == ["healthy", "benign", "malignant"]
    assert manifest["sample"]["channels"] == 1
    assert manifest["source"]["absent_images"] == ["mdb013"]
    written = manifest["patches"]["written"]
    assert written["lesion"] == {"benign": 6, "malignant": 5}
    assert written["healthy"] == {"healthy": 22}
    pool_of = {}
    for pool, meta, _, _ in samples(mias_shards):
        assert pool_of.setdefault(meta["patient"], pool) == pool
    # the patient is the pair: mdb001 and mdb002 in one pool, under one name
    patients = {meta["path"]: meta["patient"] for _, meta, _, _ in samples(mias_shards)}
    assert patients["mdb001.pgm"] == patients["mdb002.pgm"] == "mdb001-002"
    assert len(set(pool_of)) == 6
    assert verify_shards(mias_shards, manifest) == []


def test_shards_are_grey_and_the_reader_keeps_them_grey(mias_shards):
    for _, _, png, _ in samples(mias_shards)[:5]:
        assert Image.open(io.BytesIO(png)).mode == "L"
    item = next(iter(shard_dataset(mias_shards, "gan")))
    assert tuple(item["image"].shape) == (1, 64, 64)
    forced = next(iter(shard_dataset(mias_shards, "gan", channels=3)))
    assert tuple(forced["image"].shape) == (3, 64, 64)
    assert (forced["image"][0] == forced["image"][2]).all()


def test_three_channels_asked_for(mias_dir, tmp_path):
    manifest = ingest(mias_dir, tmp_path / "rgb", channels=3)
    assert manifest["sample"]["channels"] == 3
    _, _, png, _ = samples(tmp_path / "rgb")[0]
    assert Image.open(io.BytesIO(png)).mode == "RGB"
    item = next(iter(shard_dataset(tmp_path / "rgb", "gan")))
    assert item["image"].shape[0] == 3


def test_benign_vs_malignant_leaves_healthy_out(mias_dir, tmp_path):
    manifest = ingest(mias_dir, tmp_path / "bm", labels="benign-malignant")
    assert manifest["source"]["class_names"] == ["benign", "malignant"]
    kinds = Counter((meta["kind"], label) for _, meta, _, label in samples(tmp_path / "bm"))
    assert kinds == {("lesion", 0): 6, ("lesion", 1): 5}


def test_zoom_levels_cut_each_lesion_at_each_scale(mias_dir, tmp_path):
    manifest = ingest(mias_dir, tmp_path / "z", context="zoom", zoom_levels=[1.0, 2.0])
    lesions = [p for p in manifest["patches"]["list"] if p["kind"] == "lesion"]
    assert Counter(p["scale"] for p in lesions) == {1.0: 11, 0.5: 11}
    healthy = [p for p in manifest["patches"]["list"] if p["kind"] == "healthy"]
    # each healthy place at both zooms; places where the wider crop reaches a lesion (small
    # fixture films) are counted as short, not dropped silently
    found = Counter(p["scale"] for p in healthy)
    assert found[1.0] == found[0.5] == 22 - manifest["patches"]["healthy_short"] > 0
    for p in lesions:  # the same centre at both zooms
        x0, _, x1, _ = p["box"]
        assert x1 - x0 == 64 / p["scale"]


def test_min_crop_floors_the_crop_side_of_small_lesions(mias_dir, mias_shards, tmp_path):
    """Fixture lesions have radius 12-20: box + 20% is 29-48 px; --min-crop 40 lifts the small
    ones to 40 around the same centre and leaves the larger as they were."""
    before = {p["key"]: p["box"] for p in load_manifest(mias_shards)["patches"]["list"]}
    manifest = ingest(mias_dir, tmp_path / "m", min_crop=40)
    lesions = [p for p in manifest["patches"]["list"] if p["kind"] == "lesion"]
    lifted = 0
    for p in lesions:
        x0, y0, x1, y1 = p["box"]
        b0, c0, b1, c1 = before[p["key"]]
        assert x1 - x0 == y1 - y0 == max(40, b1 - b0)
        assert abs((x0 + x1) - (b0 + b1)) <= 1 and abs((y0 + y1) - (c0 + c1)) <= 1  # centre
        lifted += b1 - b0 < 40
    assert 0 < lifted < len(lesions)
    assert min(p["box"][2] - p["box"][0] for p in manifest["patches"]["list"]) == 40  # healthy too


def test_same_job_same_bytes_and_resume(mias_dir, mias_shards, tmp_path):
    again = ingest(mias_dir, tmp_path / "again")
    first = load_manifest(mias_shards)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in first["shards"]]
    # an interrupted job: a shard deleted, the manifest incomplete; --resume rewrites it alike
    victim = tmp_path / "again" / again["shards"][0]["name"]
    victim.unlink()
    resumed = ingest(mias_dir, tmp_path / "again", resume=True)
    assert resumed["shards"] == again["shards"] and resumed["resumed_shards"] == 2


def test_resume_refuses_an_edited_table(mias_dir, tmp_path):
    src = tmp_path / "src"
    write_mias(src, ROWS)
    ingest(src, tmp_path / "out")
    text = (src / "Info.txt").read_text().replace(" 120 220 18", " 121 220 18")
    assert text != (src / "Info.txt").read_text()
    (src / "Info.txt").write_text(text)  # the same size: the table's content is compared
    with pytest.raises(UserError, match="SRC files differ"):
        ingest(src, tmp_path / "out", resume=True)


# --- bad input -----------------------------------------------------------------------------


def test_film_not_in_table_is_one_line_or_a_counted_skip(tmp_path):
    src = write_mias(tmp_path / "src", ROWS)
    Image.fromarray(film([], 99)).save(src / "mdb099.pgm")
    with pytest.raises(UserError) as err:
        ingest(src, tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and "mdb099.pgm" in message and "--skip-bad" in message
    manifest = ingest(src, tmp_path / "out", skip_bad=True)
    assert manifest["skipped"]["counts"] == {"not_in_table": 1}


def test_bad_row_is_named_by_line(tmp_path):
    src = write_mias(tmp_path / "src", ROWS, "mdb001 G CIRC X 1 2 3\n")
    with pytest.raises(UserError, match=r"bad_row .*Info.txt:14"):
        ingest(src, tmp_path / "out")
    manifest = ingest(src, tmp_path / "out", skip_bad=True)
    # its film's lesions are unknown now: no healthy crops from mdb001
    assert not [
        p
        for p in manifest["patches"]["list"]
        if p["source"] == "mdb001.pgm" and p["kind"] == "healthy"
    ]


def test_corrupt_film_and_missing_table(tmp_path):
    src = write_mias(tmp_path / "src", ROWS)
    (src / "mdb005.pgm").write_bytes(b"P5\n320 320\n255\n" + b"\0" * 100)
    with pytest.raises(UserError, match=r"truncated|corrupt"):
        ingest(src, tmp_path / "out")
    (src / "Info.txt").unlink()
    with pytest.raises(UserError, match=r"Info\.txt not found"):
        ingest(src, tmp_path / "out2")


def test_options_checked_before_any_work(mias_dir, tmp_path):
    for options, word in [
        ({"channels": 2}, "--channels"),
        ({"labels": "nope"}, "--labels"),
        ({"context": "nope"}, "--context"),
        ({"zoom_levels": [0.0]}, "--zoom-levels"),
        ({"min_tissue": 0.0}, "--min-tissue"),
        ({"min_crop": -1}, "--min-crop"),
        ({"pectoral": "nope"}, "--pectoral"),
        ({"table": "x.csv"}, "--table"),
    ]:
        with pytest.raises(UserError, match=word):
            ingest(mias_dir, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_cli_prints_patch_counts(mias_dir, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "ingest",
            str(mias_dir),
            str(tmp_path / "o"),
            "--format",
            "mias",
            "--patch",
            "48",
            "--min-shards",
            "1",
            "--workers",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "lesion patches: benign 6, malignant 5" in result.output
    assert "1 images named in the table absent" in result.output
    bad = CliRunner().invoke(
        app,
        ["ingest", str(mias_dir), str(tmp_path / "p"), "--format", "mias", "--zoom-levels", "1,x"],
    )
    assert bad.exit_code == 2 and "--zoom-levels" in bad.output and "Traceback" not in bad.output


# --- the csv layout -------------------------------------------------------------------------


def write_table(path: Path, rows: list[dict]) -> None:
    columns = ["path", "label", "patient", "x", "y", "radius", "x_min", "y_min", "x_max", "y_max"]
    columns += ["view"] if any("view" in row for row in rows) else []
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


@pytest.fixture
def csv_dir(tmp_path) -> Path:
    """Films in folders, one table: circles, boxes, normal films, two lesions on one."""
    root = tmp_path / "bcdr"
    rows = []
    for i in range(8):
        folder = root / f"case{i}"
        folder.mkdir(parents=True)
        x, y, r = 100 + 5 * i, 120 + 10 * i, 16
        Image.fromarray(film([(x, y, r)] if i < 6 else [], i)).save(folder / "img.png")
        if i < 3:
            rows.append(
                {
                    "path": f"case{i}/img.png",
                    "label": "benign",
                    "patient": f"p{i // 2}",
                    "x": x,
                    "y": y,
                    "radius": r,
                }
            )
        elif i < 6:
            rows.append(
                {
                    "path": f"case{i}/img.png",
                    "label": "Malignant",
                    "patient": f"p{i // 2}",
                    "x_min": x - r,
                    "y_min": y - r,
                    "x_max": x + r,
                    "y_max": y + r,
                }
            )
        else:
            rows.append({"path": f"case{i}/img.png", "label": "normal", "patient": f"p{i // 2}"})
    write_table(root / "table.csv", rows)
    return root


def test_csv_circles_boxes_and_normal_films(csv_dir, tmp_path):
    manifest = ingest(csv_dir, tmp_path / "out", format="csv", gan_fraction=0.0, test_fraction=0.5)
    assert manifest["source"]["class_names"] == ["healthy", "benign", "malignant"]
    assert manifest["patches"]["written"]["lesion"] == {"benign": 3, "malignant": 3}
    assert manifest["patches"]["written"]["healthy"] == {"healthy": 16}
    for _, meta, png, _ in samples(tmp_path / "out"):
        if meta["kind"] == "lesion":
            pixels = np.asarray(Image.open(io.BytesIO(png)))
            ys, xs = np.nonzero(pixels > 200)
            assert abs(xs.mean() - 31.5) < 2 and abs(ys.mean() - 31.5) < 2, meta


def test_csv_view_column_says_where_the_pectoral_muscle_is_looked_for(tmp_path):
    root = tmp_path / "films"
    root.mkdir()
    rows = []
    views = ["MLO", "cc", ""]  # a third each; every film has a muscle
    for i in range(18):
        name, label = f"f{i:02d}.png", ("benign", "malignant", "normal")[i % 3]
        place = {"x": 150, "y": 200, "radius": 14} if label != "normal" else {}
        Image.fromarray(film([(150, 200, 14)] if place else [], i, muscle=True)).save(root / name)
        rows.append({"path": name, "label": label, "patient": f"p{i}", "view": views[i // 3 % 3]})
        rows[-1].update(place)
    write_table(root / "t.csv", rows)
    manifest = ingest(root, tmp_path / "s", format="csv")
    mlo = [row["path"] for row in rows if row["view"] == "MLO"]
    assert manifest["patches"]["pectoral"] == {"mode": "auto", "searched": 6, "found": mlo}
    every = ingest(root, tmp_path / "e", format="csv", pectoral="exclude")
    assert every["patches"]["pectoral"]["searched"] == 18


def test_csv_bad_rows(csv_dir, tmp_path):
    table = csv_dir / "table.csv"
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    rows.append(
        {
            "path": "case9/img.png",
            "label": "benign",
            "patient": "p9",
            "x": "1",
            "y": "2",
            "radius": "3",
        }
    )  # no such file
    rows.append({"path": "case0/img.png", "label": "benign", "patient": "p0", "x": "5"})
    write_table(table, rows)
    with pytest.raises(UserError) as err:
        ingest(csv_dir, tmp_path / "out", format="csv")  # stops before any split
    text = str(err.value)
    assert "missing_file" in text and "table.csv:10" in text
    assert "bad_row" in text and "table.csv:11" in text and "--skip-bad" in text
    manifest = ingest(
        csv_dir, tmp_path / "out", format="csv", skip_bad=True, gan_fraction=0, test_fraction=0.5
    )
    assert manifest["skipped"]["counts"] == {"bad_row": 1, "missing_file": 1}


def test_csv_without_columns_or_table(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(UserError, match="--table"):
        ingest(tmp_path / "a", tmp_path / "out", format="csv")
    (tmp_path / "a" / "t.csv").write_text("file,class\nx.png,1\n")
    with pytest.raises(UserError, match="no column path, label, patient"):
        ingest(tmp_path / "a", tmp_path / "out", format="csv")


def test_csv_without_coordinates_keeps_images_as_they_are(tmp_path):
    root = tmp_path / "plain"
    rows = []
    for i in range(12):
        (root / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(film([], i)[:48, :48]).save(root / "img" / f"{i}.png")
        rows.append(
            {"path": f"img/{i}.png", "label": ["calm", "busy"][i % 2], "patient": f"p{i // 2}"}
        )
    write_table(root / "t.csv", rows)
    manifest = ingest(root, tmp_path / "out", format="csv", patch_size=None)
    assert manifest["source"]["class_names"] == ["busy", "calm"]
    assert "patches" not in manifest and manifest["sample"]["channels"] == 1
    data = {meta["path"]: png for _, meta, png, _ in samples(tmp_path / "out")}
    assert data["img/3.png"] == (root / "img" / "3.png").read_bytes()


# --- the real mini-MIAS sample ---------------------------------------------------------------


@pytest.fixture(scope="module")
def real_mias(tmp_path_factory) -> tuple[Path, dict]:
    if not REAL_MIAS.is_dir():
        pytest.skip(f"real mini-MIAS sample not found at {REAL_MIAS} (set SYNTHBREAST_REAL_MIAS)")
    out = tmp_path_factory.mktemp("real-mias") / "s"
    return out, ingest(REAL_MIAS, out, patch_size=128, workers=2)


def test_real_mias_counts(real_mias):
    _, manifest = real_mias
    patches = manifest["patches"]
    # 34 benign and 29 malignant rows; mdb233 and mdb245 (malignant) have no coordinates
    assert patches["written"]["lesion"] == {"benign": 34, "malignant": 27}
    assert sorted(patches["unlocated_lesions"]) == ["Info.txt:239", "Info.txt:252"]
    # two healthy patches asked of each of the 55 films whose lesions all have a place; MIAS
    # films are MLO views, and with the pectoral muscle kept out two of them find no second
    # place clear of the muscle and the lesions (counted)
    assert patches["written"]["healthy"] == {"healthy": 108}
    assert patches["healthy_short"] == 2
    pectoral = patches["pectoral"]
    assert pectoral["searched"] == 55 and len(pectoral["found"]) == 45
    assert {"mdb001.pgm", "mdb010.pgm", "mdb063.pgm"} <= set(pectoral["found"])  # seen by eye
    assert len(manifest["source"]["absent_images"]) == 322 - 57


def test_real_mias_crops_follow_info_txt(real_mias):
    """Each lesion crop is centred on Info.txt's (x, 1024 - y), the pairs in one pool."""
    out, manifest = real_mias
    table = {}
    for number, line in enumerate((REAL_MIAS / "Info.txt").read_text().splitlines(), 1):
        words = line.split()
        if len(words) == 7:
            table[f"Info.txt:{number}"] = (int(words[4]), 1024 - int(words[5]), int(words[6]))
    rows = samples(out)
    lesions = [meta for _, meta, _, _ in rows if meta["kind"] == "lesion"]
    for meta in lesions:
        x, y, r = table[meta["lesion"]["ref"]]
        x0, y0, x1, y1 = meta["box"]
        assert abs((x0 + x1) / 2 - x) <= 1 and abs((y0 + y1) / 2 - y) <= 1
        assert x1 - x0 == round(2 * r * 1.2)
    pools = {}
    for pool, meta, _, _ in rows:
        number = int(meta["path"][3:6])
        assert pools.setdefault((number + 1) // 2, pool) == pool
    assert verify_shards(out, manifest) == []


# --- the cbis-ddsm layout --------------------------------------------------------------------

CBIS_HEADER = [
    "patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
    "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
    "image file path", "cropped image file path", "ROI mask file path",
]  # fmt: skip
H, W = 200, 160
# (patient, pathology, lesions as (x, y, r) on the one film); P_00003's film has two
CBIS_CASES = [
    ("P_00001", ["MALIGNANT"], [(60, 80, 14)]),
    ("P_00002", ["BENIGN"], [(70, 120, 12)]),
    ("P_00003", ["BENIGN_WITHOUT_CALLBACK", "MALIGNANT"], [(50, 60, 10), (80, 150, 13)]),
    ("P_00004", ["BENIGN"], [(65, 100, 15)]),
]


def cbis_film(lesions, seed: int) -> np.ndarray:
    """16-bit: breast ~20000, lesions 60000, background 0."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    image = np.zeros((H, W))
    breast = (xx / (W * 0.85)) ** 2 + ((yy - H / 2) / (H * 0.48)) ** 2 < 1
    image[breast] = 20000 + rng.normal(0, 800, size=breast.sum())
    for x, y, r in lesions:
        image[(xx - x) ** 2 + (yy - y) ** 2 < r**2] = 60000
    return np.clip(image, 0, 65535).astype(np.uint16)


def disc_mask(x, y, r) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    return (((xx - x) ** 2 + (yy - y) ** 2 < r**2) * 255).astype(np.uint8)


def write_dicom(path: Path, pixels: np.ndarray, series: str) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.SeriesInstanceUID, ds.StudyInstanceUID = series, generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = pixels.astype(f"<u{bits // 8}").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_cbis(root: Path, layout: str) -> Path:
    """The published CSV + DICOM layout (`dicom`: files at the CSV's paths, except P_00004's
    film in the new TCIA folder names, found by its SeriesInstanceUID) or Kaggle's JPEG
    export (`jpeg`: jpeg/<series>/1-N.jpg, the CSVs in csv/)."""
    rows = []
    for n, (patient, pathologies, lesions) in enumerate(CBIS_CASES):
        case = f"Mass-Training_{patient}_LEFT_CC"
        uid = f"1.3.6.1.4.1.9590.100.1.2.{n + 1}"  # no part may start with 0
        study, series = f"{uid}1", f"{uid}2"
        full = f"{case}/{study}/{series}/000000.dcm"
        film_pixels = cbis_film(lesions, n)
        if layout == "jpeg":
            (root / "jpeg" / series).mkdir(parents=True)
            Image.fromarray((film_pixels // 257).astype(np.uint8)).save(
                root / "jpeg" / series / "1-1.jpg"
            )
        elif patient == "P_00004":
            write_dicom(root / "CBIS-DDSM" / case / "07-20-2016-DDSM-1" / "1-full-2" / "1-1.dcm",
                        film_pixels, series)  # fmt: skip
        else:
            write_dicom(root / full, film_pixels, series)
        for i, (pathology, (x, y, r)) in enumerate(zip(pathologies, lesions, strict=True)):
            roi_series = f"{uid}3{i}"
            roi_case = f"{case}_{i + 1}/{study}/{roi_series}"
            crop_pixels = film_pixels[y - r : y + r, x - r : x + r]
            swapped = patient == "P_00002"  # the crop and mask names swapped, as in the set
            names = ("000001.dcm", "000000.dcm") if swapped else ("000000.dcm", "000001.dcm")
            if layout == "jpeg":
                folder = root / "jpeg" / roi_series
                folder.mkdir(parents=True)
                Image.fromarray((crop_pixels // 257).astype(np.uint8)).save(folder / "1-1.jpg")
                Image.fromarray(disc_mask(x, y, r)).save(folder / "1-2.jpg")
            else:
                write_dicom(root / roi_case / names[0], crop_pixels, roi_series)
                write_dicom(root / roi_case / names[1], disc_mask(x, y, r), roi_series)
            rows.append(
                [patient, 3, "LEFT", "CC", i + 1, "mass", "OVAL", "CIRCUMSCRIBED", 4, pathology, 3,
                 full, f"{roi_case}/{names[0]}\n", f"{roi_case}/{names[1]}\n"]
            )  # fmt: skip
    folder = root / "csv" if layout == "jpeg" else root
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "mass_case_description_train_set.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CBIS_HEADER)
        writer.writerows(rows)
    return root


@pytest.mark.parametrize("layout", ["dicom", "jpeg"])
def test_cbis_ddsm_crops_on_the_roi_masks(layout, tmp_path):
    if layout == "dicom":
        pytest.importorskip("pydicom", reason="DICOM needs the dicom extra (pydicom)")
    src = write_cbis(tmp_path / layout, layout)
    options = {"format": "cbis-ddsm", "gan_fraction": 0.0, "test_fraction": 0.5}
    manifest = ingest(src, tmp_path / "out", **options)
    assert manifest["source"]["class_names"] == ["benign", "malignant"]
    # benign-without-callback counted as benign, as the lab did
    assert manifest["patches"]["written"]["lesion"] == {"benign": 3, "malignant": 2}
    method = "min-max of each image to 0..255" if layout == "dicom" else "none (8-bit)"
    assert manifest["patches"]["normalisation"] == {method: 4}
    for _, meta, png, _ in samples(tmp_path / "out"):
        pixels = np.asarray(Image.open(io.BytesIO(png)))
        ys, xs = np.nonzero(pixels > 200)
        assert abs(xs.mean() - 31.5) < 2.5 and abs(ys.mean() - 31.5) < 2.5, meta
        assert meta["patient"] in {c[0] for c in CBIS_CASES}
    strict = ingest(src, tmp_path / "strict", labels="benign-malignant-strict", **options)
    assert strict["patches"]["unmapped_lesions"] == 1


def test_cbis_ddsm_jpeg_and_dicom_give_the_same_crops(tmp_path):
    pytest.importorskip("pydicom", reason="DICOM needs the dicom extra (pydicom)")
    boxes = {}
    for layout in ("dicom", "jpeg"):
        src = write_cbis(tmp_path / layout, layout)
        options = {"format": "cbis-ddsm", "gan_fraction": 0.0, "test_fraction": 0.5}
        manifest = ingest(src, tmp_path / f"out-{layout}", **options)
        boxes[layout] = sorted(p["box"] for p in manifest["patches"]["list"])
    assert boxes["dicom"] == boxes["jpeg"]


def test_cbis_ddsm_missing_image_is_named(tmp_path):
    src = write_cbis(tmp_path / "k", "jpeg")
    victim = next((src / "jpeg" / "1.3.6.1.4.1.9590.100.1.2.22").iterdir())
    victim.unlink()
    with pytest.raises(UserError) as err:
        ingest(src, tmp_path / "out", format="cbis-ddsm")
    text = str(err.value)
    assert "\n" not in text and "missing_file" in text
    assert "csv/mass_case_description_train_set.csv:3" in text and "--skip-bad" in text
