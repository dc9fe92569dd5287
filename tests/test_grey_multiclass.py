"""Grey (1-channel) models and any number of classes: MSG-GAN with image_channels=1, grey PNGs,
classifiers on grey data (replicated for RGB stems, one channel for cnn4), multi-class metrics
against scikit-learn, fidelity features of grey images, and the mias demo films."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from synthbreast.eval import metrics
from synthbreast.eval.quality import TextureNet
from synthbreast.generate import encode_png, to_uint8
from synthbreast.images import make_grid
from synthbreast.models import classifier, msggan
from synthbreast.train.gan import check_compatible, image_transform

TINY = dict(resolution=8, latent_dim=16, width=1 / 32)


def test_grey_msggan_draws_and_reads_one_channel():
    config = msggan.MSGGANConfig(**TINY, image_channels=1, num_classes=3)
    G, D = msggan.Generator(config), msggan.Discriminator(config)
    z, labels = torch.randn(4, 16), torch.tensor([0, 1, 2, 0])
    images = G(z, labels)
    assert [tuple(x.shape) for x in images] == [(4, 1, 4, 4), (4, 1, 8, 8)]
    assert G.sample(z, labels).shape == (4, 1, 8, 8)
    assert D(images, labels).shape == (4,)
    with pytest.raises(ValueError, match="image_channels"):
        msggan.MSGGANConfig(**TINY, image_channels=2)


def test_older_checkpoint_config_without_image_channels_loads_as_rgb(tmp_path):
    config = msggan.MSGGANConfig(**TINY)
    saved = config.to_dict()
    del saved["image_channels"]  # what a checkpoint written before the field holds
    rebuilt = msggan.MSGGANConfig.from_dict(saved)
    assert rebuilt.image_channels == 3
    check_compatible(saved, config, tmp_path / "old.safetensors")  # resumes: no error
    assert msggan.Generator(rebuilt).to_rgb[0].weight.shape[0] == 3


def test_gan_transform_keeps_grey_one_channel():
    grey = Image.fromarray(np.full((16, 16), 255, np.uint8), "L")
    x = image_transform(8)(grey)
    assert x.shape == (1, 8, 8) and torch.allclose(x, torch.ones_like(x))
    rgb = Image.fromarray(np.zeros((16, 16, 3), np.uint8), "RGB")
    assert image_transform(8)(rgb).shape == (3, 8, 8)


def test_grey_samples_become_grey_pngs_and_grids():
    images = torch.linspace(-1, 1, 2 * 8 * 8).reshape(2, 1, 8, 8)
    pixels = to_uint8(images)
    assert pixels.shape == (2, 8, 8, 1)
    png = Image.open(io.BytesIO(encode_png(pixels[0], 16)))
    assert png.mode == "L" and png.size == (16, 16)
    grid = make_grid(list(pixels), scale=2)
    assert grid.mode == "RGB"
    r, g, b = (np.asarray(c, dtype=int) for c in grid.split())
    assert (r == g).all() and (g == b).all()  # grey tiles stay grey


def test_classifiers_take_grey_data_the_stated_way():
    assert classifier.input_channels("resnet18", 1) == 3
    assert classifier.grey_input("resnet18", 1) == classifier.GREY_INPUT
    assert classifier.grey_input("resnet18", 3) is None
    assert classifier.input_channels("cnn4", 1) == 1
    assert classifier.grey_input("cnn4", 1) is None
    model = classifier.build_classifier("cnn4", num_classes=3, in_channels=1)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 3)
    rebuilt = classifier.classifier_for_state("cnn4", model.state_dict())
    rebuilt.load_state_dict(model.state_dict())
    assert classifier.model_input_channels(rebuilt) == 1 and rebuilt.fc.out_features == 3
    resnet = classifier.build_classifier("resnet18", num_classes=3)
    assert classifier.classifier_for_state("resnet18", resnet.state_dict()).fc.out_features == 3
    with pytest.raises(ValueError, match="RGB stem"):
        classifier.build_classifier("resnet18", in_channels=1)


def test_texture_features_of_grey_equal_those_of_its_rgb_copy():
    net = TextureNet()
    grey = torch.rand(3, 1, 32, 32) * 2 - 1
    assert torch.allclose(net(grey), net(grey.expand(-1, 3, -1, -1)))


def _three_class_case(seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1, 2], 30)
    logits = rng.normal(size=(90, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    patients = [f"p{i // 3}" for i in range(90)]
    return y, probs, patients


def test_multiclass_metrics_match_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics")
    y, probs, patients = _three_class_case()
    found = metrics.multiclass_metrics(y, probs, patients, n_boot=200, seed=1,
                                       class_names=["healthy", "benign", "malignant"])  # fmt: skip
    pred = probs.argmax(1)
    assert found["accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
    assert found["roc_auc"] == pytest.approx(sk.roc_auc_score(y, probs, multi_class="ovr"))
    assert found["f1"] == pytest.approx(sk.f1_score(y, pred, average="macro"))
    assert found["precision"] == pytest.approx(sk.precision_score(y, pred, average="macro"))
    assert found["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, pred))
    assert found["confusion"]["counts"] == sk.confusion_matrix(y, pred).tolist()
    for c, row in enumerate(found["per_class"]):
        assert row["name"] == ["healthy", "benign", "malignant"][c]
        assert row["roc_auc"] == pytest.approx(sk.roc_auc_score(y == c, probs[:, c]))
        low, high = row["roc_auc_ci95"]
        assert low <= row["roc_auc"] <= high
    low, high = found["ci95"]["roc_auc"]
    assert low <= found["roc_auc"] <= high and found["ci95"]["method"] == "patient bootstrap"
    assert found["ci95"]["groups"] == 30


def test_multiclass_bootstrap_is_seeded_and_a_missing_class_has_no_auc():
    y, probs, patients = _three_class_case()
    first = metrics.multiclass_bootstrap_ci(y, probs, patients, n_boot=100, seed=3)
    assert first == metrics.multiclass_bootstrap_ci(y, probs, patients, n_boot=100, seed=3)
    assert first != metrics.multiclass_bootstrap_ci(y, probs, patients, n_boot=100, seed=4)
    keep = y != 2  # no malignant test image: its AUC is undefined, the macro is over two
    found = metrics.multiclass_metrics(y[keep], probs[keep], n_boot=100)
    assert found["per_class"][2]["roc_auc"] is None
    assert found["per_class"][2]["roc_auc_ci95"] is None
    defined = [row["roc_auc"] for row in found["per_class"][:2]]
    assert found["roc_auc"] == pytest.approx(np.mean(defined))


def test_binary_metrics_unchanged_by_the_multiclass_path():
    """Two classes through multiclass_metrics give the binary AUC and accuracy too."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    p1 = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, 60), 0.01, 0.99)
    binary = metrics.classification_metrics(y, p1, n_boot=50)
    multi = metrics.multiclass_metrics(y, np.stack([1 - p1, p1], 1), n_boot=50)
    assert multi["per_class"][1]["roc_auc"] == pytest.approx(binary["roc_auc"])
    assert multi["accuracy"] == pytest.approx(binary["accuracy"])
    assert binary["confusion"]["labels"] == [0, 1] and "per_class" not in binary
