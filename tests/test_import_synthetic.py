"""import-synthetic: a folder of any generator's images -> generate-style synthetic shards that
classify, fidelity and memorisation read unchanged. Real files and the real CLI throughout."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from synthbreast.cli import app
from synthbreast.data.shards import iter_shard, load_manifest, verify_shards
from synthbreast.eval.scenarios import load_synthetic, synthetic_folders
from synthbreast.fileio import sha256_file

runner = CliRunner()
GENERATOR = "StyleGAN2-ADA 64px, lab X"


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    # a refusal is a message and exit 2, never a traceback
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def write_image(path: Path, seed: int, size: int | tuple[int, int] = 50, mode: str = "RGB"):
    width, height = (size, size) if isinstance(size, int) else size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)


def samples(folder: Path) -> list[dict]:
    manifest = load_manifest(folder)
    return [s for entry in manifest["shards"] for s in iter_shard(folder / entry["name"])]


@pytest.fixture
def lab_folder(tmp_path) -> Path:
    """What another lab sends: class folders of PNGs and JPEGs (one grey, one RGBA), a note,
    a corrupt and a truncated file."""
    folder = tmp_path / "lab-x"
    for label in (0, 1):
        for i in range(4):
            write_image(folder / str(label) / f"img{i}.png", 10 * label + i)
        write_image(folder / str(label) / "photo.jpg", 50 + label)
    write_image(folder / "0" / "grey.png", 60, mode="L")
    write_image(folder / "1" / "deep" / "alpha.png", 61, mode="RGBA")
    (folder / "1" / "broken.png").write_bytes(b"not an image at all")
    whole = (folder / "0" / "photo.jpg").read_bytes()
    (folder / "0" / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # a transfer cut short
    (folder / "README.txt").write_text("sampled with truncation 0.7")
    return folder


def test_class_folders_a_corrupt_file_stops_or_is_a_counted_skip(lab_folder, tmp_path):
    out = tmp_path / "imported"
    refused = invoke("import-synthetic", lab_folder, "--out", out)
    assert refused.exit_code == 2
    assert "2 bad input file(s)" in refused.output and "--skip-bad" in refused.output
    assert f"corrupt          {lab_folder / '1' / 'broken.png'}" in refused.output
    assert f"truncated        {lab_folder / '0' / 'cut.jpg'}" in refused.output
    assert not out.exists(), "nothing is written before the inputs are known good"

    args = ["import-synthetic", lab_folder, "--out", out, "--skip-bad", "--generator", GENERATOR]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert synthetic_folders([out], "test") == [out / "class0", out / "class1"]
    config = json.loads((out / "config.json").read_text())
    assert config["job"] == "ImportSyntheticConfig" and config["folder"] == str(lab_folder)
    expected_paths = {
        0: {"0/grey.png", "0/photo.jpg", *(f"0/img{i}.png" for i in range(4))},
        1: {"1/deep/alpha.png", "1/photo.jpg", *(f"1/img{i}.png" for i in range(4))},
    }
    for label in (0, 1):
        folder = out / f"class{label}"
        manifest = load_synthetic(folder)  # what classify and fidelity call
        assert verify_shards(folder, manifest) == []
        assert manifest["source"]["synthetic"] and manifest["source"]["imported"]
        assert manifest["source"]["generator"] == GENERATOR
        assert manifest["source"]["folder"] == str(lab_folder)
        assert manifest["source"]["labels"]["from"] == "class folders"
        assert manifest["sample"]["image_size"] == 50
        assert manifest["pools"]["synthetic"]["counts"] == {str(label): 6}
        assert manifest["import"] == manifest["import"] | {"images": 12, "skipped": 2}
        assert manifest["skipped"]["counts"] == {"corrupt": 1, "truncated": 1}
        assert sorted(f["path"] for f in manifest["skipped"]["files"]) == [
            "0/cut.jpg", "1/broken.png",
        ]  # fmt: skip
        assert manifest["ignored_files"] == ["README.txt"]
        assert json.loads((folder / "config.json").read_text())["job"] == "ImportSyntheticConfig"
        found = set()
        for sample in samples(folder):
            meta = json.loads(sample["json"])
            assert int(sample["cls"]) == meta["label"] == label
            assert meta["synthetic"] and meta["generator"] == GENERATOR
            assert meta["sha256"] == sha256_file(lab_folder / meta["path"])
            with Image.open(io.BytesIO(sample["png"])) as image:
                assert (image.format, image.mode, image.size) == ("PNG", "RGB", (50, 50))
            found.add(meta["path"])
        assert found == expected_paths[label]

    # the same command again: complete, nothing rewritten
    shard = out / "class1" / "synthetic-000000.tar"
    stamp, digest = shard.stat().st_mtime_ns, sha256_file(shard)
    again = invoke(*args)
    assert again.exit_code == 0 and "nothing to do" in again.output
    assert shard.stat().st_mtime_ns == stamp
    # a lost shard is made again, bit for bit
    shard.unlink()
    assert invoke(*args).exit_code == 0
    assert (
        sha256_file(shard) == digest
        and verify_shards(shard.parent, load_manifest(shard.parent)) == []
    )

    # other options, or other images in FOLDER: refused, saying why
    other = invoke(*args[:-1], "a diffusion model")
    assert other.exit_code == 2 and "generator" in other.output and "new --out" in other.output
    write_image(lab_folder / "0" / "img0.png", 1234)
    changed = invoke(*args)
    assert changed.exit_code == 2 and "changed since" in changed.output
    # an OUT holding someone else's files is never written to
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    refused = invoke("import-synthetic", lab_folder, "--out", stranger, "--skip-bad")
    assert refused.exit_code == 2 and "notes.txt" in refused.output


def test_unknown_class_folders_and_loose_images(tmp_path):
    folder = tmp_path / "gen"
    write_image(folder / "0" / "a.png", 1)
    write_image(folder / "1" / "b.png", 2)
    write_image(folder / "2" / "c.png", 3)
    write_image(folder / "loose.png", 4)
    out = tmp_path / "out"
    refused = invoke("import-synthetic", folder, "--out", out)
    assert refused.exit_code == 2
    assert str(folder / "2" / "c.png") in refused.output and "unknown_class" in refused.output
    assert "classes: 0, 1" in refused.output
    assert str(folder / "loose.png") in refused.output and "no_class" in refused.output
    assert invoke("import-synthetic", folder, "--out", out, "--skip-bad").exit_code == 0
    manifest = load_manifest(out / "class0")
    assert manifest["skipped"]["counts"] == {"no_class": 1, "unknown_class": 1}
    assert not (out / "class2").exists()


def test_one_size_or_resize(tmp_path):
    folder = tmp_path / "gen"
    for label in (0, 1):
        for i in range(3):
            write_image(folder / str(label) / f"x{i}.png", 3 * label + i, size=64)
    write_image(folder / "1" / "small.png", 9, size=50)
    write_image(folder / "0" / "wide.png", 10, size=(64, 32))
    refused = invoke("import-synthetic", folder, "--out", tmp_path / "a")
    assert refused.exit_code == 2
    assert str(folder / "1" / "small.png") in refused.output and "--size 64" in refused.output
    assert str(folder / "0" / "wide.png") in refused.output and "not_square" in refused.output

    out = tmp_path / "b"
    result = invoke("import-synthetic", folder, "--out", out, "--size", "32", "--skip-bad")
    assert result.exit_code == 0, result.output
    assert load_manifest(out / "class1")["sample"]["image_size"] == 32
    assert load_manifest(out / "class1")["skipped"]["counts"] == {"not_square": 1}
    sizes = set()
    for sample in samples(out / "class1"):
        meta = json.loads(sample["json"])
        with Image.open(io.BytesIO(sample["png"])) as image:
            assert image.size == (32, 32) == (meta["width"], meta["height"])
        sizes.add(meta["source_size"])
    assert sizes == {50, 64}


def test_labels_from_a_csv(tmp_path):
    folder = tmp_path / "flat"
    for i in range(6):
        write_image(folder / f"s{i}.png", i)
    write_image(folder / "extra.png", 7)  # not in the CSV: left out, and said so
    write_image(folder / "wrong.png", 8)
    labels = tmp_path / "labels.csv"
    rows = [(f"s{i}.png", str(i % 2)) for i in range(6)] + [("gone.png", "1"), ("wrong.png", "7")]
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    out = tmp_path / "out"
    refused = invoke("import-synthetic", folder, "--labels", labels, "--out", out)
    assert refused.exit_code == 2
    assert str(folder / "gone.png") in refused.output and "row 8 of labels.csv" in refused.output
    assert str(folder / "wrong.png") in refused.output and "label '7'" in refused.output

    result = invoke("import-synthetic", folder, "--labels", labels, "--out", out, "--skip-bad")
    assert result.exit_code == 0, result.output
    assert "1 images in FOLDER are not in --labels" in result.output
    manifest = load_synthetic(out / "class1")
    assert manifest["skipped"]["counts"] == {"bad_label": 1, "missing": 1}
    assert manifest["unlisted_files"] == ["extra.png"]
    assert manifest["source"]["labels"] == {
        "from": "csv", "path": str(labels), "sha256": sha256_file(labels),
    }  # fmt: skip
    paths = {json.loads(s["json"])["path"] for s in samples(out / "class1")}
    assert paths == {"s1.png", "s3.png", "s5.png"}

    bad_header = tmp_path / "bad.csv"
    bad_header.write_text("file,class\ns0.png,0\n")
    refused = invoke("import-synthetic", folder, "--labels", bad_header, "--out", tmp_path / "c")
    assert refused.exit_code == 2 and "columns path,label" in refused.output


def test_classify_and_fidelity_read_imported_images_unchanged(demo_dir, demo_shards, tmp_path):
    """Real demo patches of the GAN pool's patients, imported as if a generator had made them:
    classify trains on them, fidelity measures them, memorisation finds copies."""
    from synthbreast.config import FidelityConfig
    from synthbreast.eval.fidelity import run_fidelity

    gan_patients = load_manifest(demo_shards)["pools"]["gan"]["patients"]
    folder = tmp_path / "copies"
    for label in (0, 1):
        files = sorted(
            p for patient in gan_patients for p in (demo_dir / patient / str(label)).iterdir()
        )
        for path in files[:24]:
            target = folder / str(label) / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    write_image(tmp_path / "big" / "0" / "x.png", 0, size=64)
    refused = invoke(
        "import-synthetic", tmp_path / "big", "--out", tmp_path / "x", "--real", demo_shards
    )
    assert refused.exit_code == 2 and "--size 50" in refused.output, "the real patch size rules"

    out = tmp_path / "synthetic"
    result = invoke("import-synthetic", folder, "--out", out, "--real", demo_shards)
    assert result.exit_code == 0, result.output

    classify_out = tmp_path / "classify"
    fast = ["--weights", "none", "--input-size", "native", "--epochs", "1"]
    for scenario in ("synth-real", "synth-synth"):
        args = ["classify", "--real", demo_shards, "--synthetic", out, "--scenario", scenario]
        result = invoke(*args, "--out", classify_out, *fast)
        assert result.exit_code == 0, result.output
        metrics = json.loads((classify_out / scenario / "metrics.json").read_text())
        train = metrics["data"]["train"]
        assert train["counts"] == (
            {"0": 24, "1": 24} if scenario == "synth-real" else train["counts"]
        )
        assert 0 <= metrics["accuracy"] <= 1

    config = FidelityConfig(
        real=str(demo_shards), synthetic=[str(out)], out=str(tmp_path / "fidelity"),
        extractors=["pixels"], kid_subsets=10, workers=0, device="cpu",
    )  # fmt: skip
    report = json.loads(run_fidelity(config).read_text())
    pixels = report["extractors"]["pixels"]
    assert pixels["overall"]["synthetic_images"] == 48
    # memorisation searches an equal-size sample of the gan pool (as large as the test pool),
    # so only the copies whose original is in that sample are found: exact ones, ratio 0
    memo = pixels["memorisation"]
    assert memo["share_below_threshold"] > 0.2 > memo["control_share_below_threshold"]
