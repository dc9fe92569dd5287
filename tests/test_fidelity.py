"""Fidelity metrics equal the reference implementations (pytorch-fid, torch-fidelity, prdc) on
the same arrays; extractors, the feature cache, missing weights; `synthbreast fidelity` end to end.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from prdc import compute_prdc
from pytorch_fid.fid_score import calculate_frechet_distance
from safetensors.torch import save_file
from torch_fidelity.metric_kid import (
    KEY_METRIC_KID_MEAN,
    KEY_METRIC_KID_STD,
    kid_features_to_metric,
)
from typer.testing import CliRunner

from synthbreast.cli import app
from synthbreast.config import FidelityConfig, GenerateConfig
from synthbreast.data.reader import shard_dataset
from synthbreast.errors import UserError
from synthbreast.eval import features as features_module
from synthbreast.eval import fidelity as F
from synthbreast.eval.features import (
    INSTALL_PRETRAINED,
    TORCHVISION_INCEPTION_FILE,
    ExtractorOptions,
    build_extractor,
    cached_features,
    pixels_extractor,
    real_source,
)
from synthbreast.eval.fidelity import run_fidelity
from synthbreast.generate import run_generate
from synthbreast.models.classifier import IMAGENET_MEAN, IMAGENET_STD, backbone_features
from synthbreast.models.msggan import Generator, MSGGANConfig
from synthbreast.train.checkpoint import save_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def arrays():
    """Two different Gaussian feature sets (float64), more images than dimensions."""
    rng = np.random.default_rng(0)
    real = rng.normal(size=(600, 48))
    mixing = np.eye(48) + 0.1 * rng.normal(size=(48, 48))
    synthetic = rng.normal(0.2, 1.0, size=(450, 48)) @ mixing
    return real, synthetic


# --- the math equals the reference packages ---------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # scipy's, inside pytorch-fid
def test_fid_equals_pytorch_fid(arrays):
    real, synthetic = arrays
    mu1, sigma1 = F.feature_statistics(real)
    mu2, sigma2 = F.feature_statistics(synthetic)
    assert np.allclose(sigma1, np.cov(real, rowvar=False))
    expected = calculate_frechet_distance(mu1, sigma1, mu2, sigma2)
    assert F.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
    assert F.fid(real, synthetic) == pytest.approx(expected, rel=1e-9)


def test_kid_equals_torch_fidelity(arrays):
    real, synthetic = arrays
    for subset_size, seed in ((100, 3), (450, 2020)):  # subsets, and all of the smaller set
        reference = kid_features_to_metric(
            torch.from_numpy(real),
            torch.from_numpy(synthetic),
            kid_subsets=20,
            kid_subset_size=subset_size,
            rng_seed=seed,
            verbose=False,
        )
        mean, std = F.kid(real, synthetic, subsets=20, subset_size=subset_size, seed=seed)
        assert mean == pytest.approx(reference[KEY_METRIC_KID_MEAN], rel=1e-9)
        assert std == pytest.approx(reference[KEY_METRIC_KID_STD], rel=1e-9)
    # large sets take the per-subset path instead of the kernels computed once
    old = F.KERNEL_ONCE
    try:
        F.KERNEL_ONCE = 10
        mean, _ = F.kid(real, synthetic, subsets=20, subset_size=100, seed=3)
    finally:
        F.KERNEL_ONCE = old
    assert mean == pytest.approx(
        kid_features_to_metric(
            torch.from_numpy(real),
            torch.from_numpy(synthetic),
            kid_subsets=20,
            kid_subset_size=100,
            rng_seed=3,
            verbose=False,
        )[KEY_METRIC_KID_MEAN],
        rel=1e-9,
    )


def test_prdc_equals_prdc_package(arrays, capsys):
    real, synthetic = arrays
    expected = compute_prdc(real, synthetic, nearest_k=5)
    # small blocks, so every statistic is gathered across many blocks
    got = F.prdc(real, synthetic, k=5, row_block=97, column_block=64)
    for key in (F.PRECISION, F.RECALL, F.DENSITY, F.COVERAGE):
        assert got[key] == pytest.approx(float(expected[key]), abs=1e-12), key
    assert 0 < got[F.PRECISION] < 1 and 0 < got[F.RECALL] < 1


def test_fid_of_a_set_with_itself_is_zero_and_a_shift_scores_worse(arrays):
    real, _ = arrays
    rng = np.random.default_rng(1)
    same_distribution = rng.normal(size=(600, 48))
    assert abs(F.fid(real, real)) < 1e-8
    # fewer images than dimensions: singular covariances, rounding of order sqrt(eps) x trace
    assert abs(F.fid(real[:30], real[:30])) < 1e-5
    near = F.fid(real, same_distribution)
    shifted = F.fid(real, same_distribution + 0.5)
    assert near < shifted
    assert shifted == pytest.approx(near + 48 * 0.25, rel=0.05)  # ||mean shift||^2 added
    kid_near, _ = F.kid(real, same_distribution, 10, 200)
    kid_shifted, _ = F.kid(real, same_distribution + 0.5, 10, 200)
    assert kid_near < kid_shifted
    assert F.prdc(real, real)[F.PRECISION] == 1.0


def test_metrics_say_which_sets_are_too_small():
    result = F.fidelity_metrics(np.zeros((1, 4)), np.ones((3, 4)))
    assert result[F.FID] is None and result[F.PRECISION] is None
    assert "at least 2" in result["note"]


# --- extractors --------------------------------------------------------------------------------


def test_torchvision_inception_without_weights_is_a_user_error_not_a_download(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    expected = tmp_path / "empty-torch-home" / "hub" / "checkpoints" / TORCHVISION_INCEPTION_FILE
    with pytest.raises(UserError) as err:
        build_extractor("inception-torchvision", ExtractorOptions())
    assert str(expected) in str(err.value) and "--weights-path" in str(err.value)
    with pytest.raises(UserError, match=r"nowhere\.pth"):
        build_extractor(
            "inception-torchvision", ExtractorOptions(weights_path=str(tmp_path / "nowhere.pth"))
        )
    # named explicitly, the job stops before reading any image
    config = FidelityConfig(
        real="unused",
        synthetic=["unused"],
        out=str(tmp_path / "f"),
        extractors=["inception-torchvision"],
    )
    with pytest.raises(UserError, match=TORCHVISION_INCEPTION_FILE):
        run_fidelity(config)


def test_torchvision_inception_loads_a_weights_file_and_gives_pool3_features(tmp_path):
    torch.manual_seed(0)
    # torch's default init (init_weights=False): quicker than Inception's truncated normals
    reference = torchvision.models.inception_v3(init_weights=False).eval()
    path = tmp_path / TORCHVISION_INCEPTION_FILE
    torch.save(reference.state_dict(), path)  # torchvision's file format, random weights
    options = ExtractorOptions(weights_path=str(path))
    extractor = build_extractor("inception-torchvision", options)
    assert extractor.name == "inception-torchvision" and extractor.dim == 2048
    assert len(extractor.settings["weights_sha256"]) == 64
    pooled = {}
    reference.avgpool.register_forward_hook(lambda m, i, out: pooled.update(x=out.flatten(1)))
    images = torch.randint(0, 256, (2, 3, 50, 50), dtype=torch.uint8)
    x = torch.nn.functional.interpolate(
        images.float() / 255, size=(299, 299), mode="bilinear", antialias=True
    )
    with torch.no_grad():
        reference((x - 0.5) / 0.5)  # the Google weights' input scale, [-1, 1]
    features = extractor(images)
    assert features.shape == (2, 2048)
    assert torch.allclose(features, pooled["x"], atol=1e-4)
    path.write_bytes(b"not a state dict")
    with pytest.raises(UserError, match="not torchvision's Inception-v3"):
        build_extractor("inception-torchvision", ExtractorOptions(weights_path=str(path)))


def classifier_run(folder: Path, input_size: str = "native") -> torchvision.models.ResNet:
    """A classify run folder as `synthbreast classify` leaves it (random weights)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2)
    folder.mkdir(parents=True)
    config = {"job": "ClassifyConfig", "backbone": "resnet18", "input_size": input_size}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(model.state_dict(), folder / "model.safetensors")
    return model.eval()


def test_classifier_extractor_gives_the_runs_avgpool_features(demo_shards, tmp_path):
    model = classifier_run(tmp_path / "real-real")
    extractor = build_extractor(
        "classifier", ExtractorOptions(classifier_run=str(tmp_path / "real-real"))
    )
    assert extractor.dim == 512 and extractor.settings["backbone"] == "resnet18"
    batch = next(iter(torch.utils.data.DataLoader(shard_dataset(demo_shards, "test"), 8)))
    images = batch["image"]
    x = images.float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        expected = backbone_features(model, x)
    assert torch.allclose(extractor(images), expected, atol=1e-5)
    with pytest.raises(UserError, match=r"config\.json"):
        build_extractor("classifier", ExtractorOptions(classifier_run=str(tmp_path)))


def test_features_are_cached_per_shard_and_settings(demo_shards, tmp_path):
    source = real_source(demo_shards, "test")
    device = torch.device("cpu")
    first = cached_features(source, pixels_extractor(16), tmp_path, device, workers=2)
    files = sorted(tmp_path.glob("pixels-*/*.safetensors"))
    # one file per shard, named by its sha256; features in manifest order, then tar order
    assert sorted(f.stem for f in files) == sorted(source.shard_sha256)
    assert first.features.shape == (source.images, 768)
    assert first.features.min() >= 0 and first.features.max() <= 1
    in_order = [s["key"] for s in shard_dataset(demo_shards, "test")]  # no workers: in order
    assert first.keys == in_order
    stamps = {f: f.stat().st_mtime_ns for f in files}
    again = cached_features(source, pixels_extractor(16), tmp_path, device, workers=0)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # read, not rewritten
    assert np.array_equal(again.features, first.features) and again.keys == first.keys
    other = cached_features(source, pixels_extractor(8), tmp_path, device, workers=0)
    assert other.features.shape[1] == 192
    assert len(list(tmp_path.glob("pixels-*"))) == 2  # one folder per settings
    files[0].write_bytes(b"damaged")  # a damaged shard is recomputed, the others read
    files[1].unlink()  # a missing one too
    redone = cached_features(source, pixels_extractor(16), tmp_path, device, workers=0)
    assert np.array_equal(redone.features, first.features)
    assert {f: f.stat().st_mtime_ns for f in files[2:]} == {f: stamps[f] for f in files[2:]}


def test_an_interrupted_feature_pass_keeps_the_shards_it_finished(demo_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    source = real_source(shards, "test")
    last = source.shards[-1]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])  # cut: unreadable
    cache, device = tmp_path / "cache", torch.device("cpu")
    with pytest.raises(UserError, match=last.name):
        cached_features(source, pixels_extractor(16), cache, device, workers=0)
    kept = {f.stem for f in cache.glob("pixels-*/*.safetensors")}
    assert kept == set(source.shard_sha256[:-1])  # every shard before the damaged one
    shutil.copy(demo_shards / last.name, last)  # mended: only that shard is embedded now
    stamps = {f: f.stat().st_mtime_ns for f in cache.glob("pixels-*/*.safetensors")}
    whole = cached_features(source, pixels_extractor(16), cache, device, workers=0)
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps and len(whole) == source.images


# --- end to end --------------------------------------------------------------------------------


def generated(out: Path, run_dir: Path, label: int) -> Path:
    """Synthetic shards of one class from the real `generate`, with an untrained tiny G."""
    torch.manual_seed(label)
    model = MSGGANConfig(resolution=16, latent_dim=32, width=0.0625)
    G = Generator(model)
    state = {
        "config": {"class_label": label, "resolution": 16, "latent_dim": 32},
        "model": model.to_dict(),
        "G": G.state_dict(),
        "G_ema": {k: v.clone() for k, v in G.state_dict().items()},
        "kimg": 0.0,
        "step": 1,
    }
    save_checkpoint(run_dir, 1, state)
    config = GenerateConfig(
        checkpoint=str(run_dir), out=str(out), shards=2, per_shard=30, output_size=50
    )
    run_generate(config, env={})
    return out


def test_fidelity_command_end_to_end(demo_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no torchvision weights
    # nor the FID Inception (it would be in the default list, and slow on a CPU)
    monkeypatch.setattr(features_module, "FID_HELPER_PACKAGE", "no_such_package_here")
    synthetic = tmp_path / "synthetic"
    for label in (0, 1):
        generated(synthetic / f"class{label}", tmp_path / f"gan{label}", label)
    out = tmp_path / "fidelity"
    args = ["fidelity", "--real", str(demo_shards), "--synthetic", str(synthetic)]
    args += ["--out", str(out), "--kid-subsets", "20", "--workers", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output

    report = json.loads((out / "fidelity.json").read_text())
    assert report["schema"] == F.FIDELITY_SCHEMA
    assert json.loads((out / "config.json").read_text())["job"] == "FidelityConfig"
    # the default: no weights needed; histology is trained on the real train pool
    assert list(report["extractors"]) == ["pixels", "texture", "histology"]
    assert INSTALL_PRETRAINED in report["skipped"]["inception"]
    texture = report["extractors"]["texture"]["overall"]
    assert texture["recall"] < 0.5  # an untrained generator's noise is unlike the tissue
    pixels = report["extractors"]["pixels"]
    assert set(F.METRIC_KEYS) <= set(pixels["overall"]) and set(pixels["per_class"]) == {"0", "1"}
    assert pixels["overall"][F.FID] > 0 and pixels["overall"]["synthetic_images"] == 120
    memo = pixels["memorisation"]
    assert memo["share_below_threshold"] == 0.0  # untrained G: noise, copies nothing
    for name in (memo["closest_pairs_png"], pixels["pca_png"], report["histograms_png"]):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 100
    assert report["pca_png"] == pixels["pca_png"]
    assert list((out / "features").glob("pixels-*/*.safetensors"))

    # complete: skipped; other settings: refused; --force: redone
    stamp = os.stat(out / "fidelity.json").st_mtime_ns
    assert runner.invoke(app, args).exit_code == 0
    assert os.stat(out / "fidelity.json").st_mtime_ns == stamp
    refused = runner.invoke(app, [*args, "--copy-threshold", "0.3"])
    assert refused.exit_code == 2 and "--force" in refused.output
    assert runner.invoke(app, [*args, "--copy-threshold", "0.3", "--force"]).exit_code == 0
    assert (
        json.loads((out / "fidelity.json").read_text())["extractors"]["pixels"]["memorisation"][
            "threshold"
        ]
        == 0.3
    )
