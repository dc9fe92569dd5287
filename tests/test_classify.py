"""Classification: the frozen ResNet, cached features = the plain loop, run folders, the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from typer.testing import CliRunner

from synthbreast.cli import app
from synthbreast.config import ClassifyConfig
from synthbreast.errors import UserError
from synthbreast.eval.classify import fit, run_classify
from synthbreast.models.classifier import (
    backbone_features,
    build_classifier,
    load_imagenet_state,
    set_trainable,
    train_mode,
)
from tests.test_scenarios import ORDER, make_synthetic

runner = CliRunner()
FAST = ["--weights", "none", "--input-size", "native", "--epochs", "2"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def small_synthetic(tmp_path_factory) -> Path:
    """32 images of 32 px: the plain loop runs the whole ResNet every step, keep it small."""
    return make_synthetic(tmp_path_factory.mktemp("small"), shards=2, per_shard=8, size=32)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tiny_config(out: Path, synthetic: Path, **overrides) -> ClassifyConfig:
    """synth-synth on the synthetic images alone: the cheapest scenario that trains."""
    defaults = dict(
        out=str(out), synthetic=[str(synthetic)], scenario="synth-synth", weights="none",
        input_size="native", epochs=3, batch_size=8, n_boot=100,
    )  # fmt: skip
    return ClassifyConfig(**{**defaults, **overrides})


def test_features_then_fc_is_the_torchvision_forward():
    torch.manual_seed(0)
    model = build_classifier("resnet18").eval()
    x = torch.randn(4, 3, 50, 50)
    with torch.no_grad():
        assert torch.allclose(model(x), model.fc(backbone_features(model, x)), atol=1e-6)
    assert model.fc.out_features == 2


def test_frozen_trains_only_the_fc_and_keeps_batchnorm_statistics():
    torch.manual_seed(0)
    model = build_classifier("resnet18")
    trainable = set_trainable(model, "frozen")
    assert [p.shape for p in trainable] == [torch.Size([2, 512]), torch.Size([2])]
    train_mode(model, "frozen")
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batchnorms and not any(m.training for m in batchnorms)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 3, 40, 40), torch.tensor([0, 1] * 4)
    config = ClassifyConfig(out="unused", epochs=1, batch_size=4)
    fit(model, trainable, x, y, lambda v: v, config, torch.device("cpu"))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}, "running means and conv weights untouched"

    assert len(set_trainable(model, "finetune")) == len(list(model.parameters()))
    train_mode(model, "finetune")
    assert all(m.training for m in batchnorms)


def test_imagenet_weights_come_from_a_file_never_a_download(tmp_path, monkeypatch, small_synthetic):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    expected = str(checkpoints / "resnet18-f37072fd.pth")
    with pytest.raises(UserError) as missing:
        load_imagenet_state("resnet18")
    assert expected in str(missing.value) and "--weights none" in str(missing.value)
    # the CLI default is imagenet: a clear exit 2 naming the file, before any training
    out = tmp_path / "cli"
    result = invoke("classify", "--synthetic", small_synthetic, "--task-id", "1", "--out", out)
    assert result.exit_code == 2 and "resnet18-f37072fd.pth" in result.output
    assert "resnet18-f37072fd.pth" in (out / "synth-synth" / "failed.json").read_text()
    # a stand-in for torchvision's file: a resnet18 state dict saved with torch.save
    torch.manual_seed(1)
    stand_in = torchvision.models.resnet18().state_dict()
    checkpoints.mkdir(parents=True)
    torch.save(stand_in, checkpoints / "resnet18-f37072fd.pth")
    model = build_classifier("resnet18", load_imagenet_state("resnet18"))
    assert torch.equal(model.conv1.weight, stand_in["conv1.weight"])
    assert model.fc.weight.shape == (2, 512)

    # an arbitrary pickled object is refused, not run
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(1), "obj": Path("x")}, evil)
    with pytest.raises(UserError, match="not a readable torch weights file"):
        load_imagenet_state("resnet18", evil)

    config = tiny_config(tmp_path / "out", small_synthetic, weights="imagenet", epochs=1)
    run = run_classify(config)
    model_info = json.loads((run / "metrics.json").read_text())["model"]
    assert model_info["weights"] == "imagenet"
    assert model_info["weights_file"] == str(checkpoints / "resnet18-f37072fd.pth")


@pytest.mark.slow
def test_cached_features_train_exactly_like_the_plain_loop(tmp_path, small_synthetic):
    cached = run_classify(tiny_config(tmp_path / "cached", small_synthetic))
    plain = run_classify(tiny_config(tmp_path / "plain", small_synthetic, cache_features=False))
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (cached, plain))
    assert (a["model"]["cached_features"], b["model"]["cached_features"]) == (True, False)
    # the 70% and the 30% come from the same 4 shards: computed for one, read back for the other
    assert a["model"]["feature_shards"] == {"computed": 4, "reused": 4}
    assert len(list((tmp_path / "cached" / "features").glob("*/*.safetensors"))) == 4
    for one, two in zip(a["history"], b["history"], strict=True):
        assert one["train_loss"] == pytest.approx(two["train_loss"], abs=1e-5)
        assert one["train_accuracy"] == two["train_accuracy"]
    assert a["history"][0]["train_loss"] != a["history"][-1]["train_loss"], "it trained"
    for field in ("accuracy", "roc_auc", "f1", "ci95"):
        assert a[field] == b[field] or a[field] == pytest.approx(b[field], abs=1e-5)
    rows_a, rows_b = (read_csv(d / "predictions.csv") for d in (cached, plain))
    assert [r["key"] for r in rows_a] == [r["key"] for r in rows_b]
    for x, y in zip(rows_a, rows_b, strict=True):
        assert float(x["prob_1"]) == pytest.approx(float(y["prob_1"]), abs=1e-5)
    fc_a, fc_b = (load_file(d / "model.safetensors")["fc.weight"] for d in (cached, plain))
    assert torch.allclose(fc_a, fc_b, atol=1e-5)


def test_images_of_different_sizes_are_refused(tmp_path, demo_shards):
    big = make_synthetic(tmp_path / "big", shards=1, per_shard=4, size=64)
    config = tiny_config(tmp_path / "out", big, real=str(demo_shards), scenario="real-synth")
    with pytest.raises(UserError, match=r"differ in size.*--output-size 50"):
        run_classify(config)
    failed = json.loads((tmp_path / "out" / "real-synth" / "failed.json").read_text())
    assert "differ in size" in failed["error"] and failed["task_id"] == 2


@pytest.mark.slow
def test_cli_every_scenario_end_to_end(tmp_path, demo_shards, synthetic):
    out = tmp_path / "classify"
    # without synthetic data a synthetic scenario fails clearly and leaves failed.json
    result = invoke(
        "classify", "--real", demo_shards, "--scenario", "synth-real", "--out", out, *FAST
    )
    assert result.exit_code == 2
    assert "--synthetic DIR" in result.output and "synthbreast generate" in result.output
    assert "--synthetic" in json.loads((out / "synth-real" / "failed.json").read_text())["error"]

    args = ["--real", demo_shards, "--synthetic", synthetic, "--out", out, *FAST]
    result = invoke("classify", "--scenario", "all", *args)
    assert result.exit_code == 0, result.output
    computed = 0
    for task_id, name in enumerate(ORDER):
        run = out / name
        assert not (run / "failed.json").exists(), "a success removes the old failure"
        metrics = json.loads((run / "metrics.json").read_text())
        config = json.loads((run / "config.json").read_text())
        assert (config["job"], config["scenario"], config["task_id"]) == (
            "ClassifyConfig", name, task_id,
        )  # fmt: skip
        assert metrics["schema"] == "synthbreast-classify-metrics/1"
        assert (metrics["scenario"], metrics["task_id"]) == (name, task_id)
        assert 0 <= metrics["accuracy"] <= 1 and metrics["roc_auc"] is not None
        assert metrics["model"] == metrics["model"] | {
            "backbone": "resnet18", "weights": "none", "mode": "frozen", "input_size": "native",
            "epochs": 2, "batch_size": 32, "lr": 0.001, "cached_features": True,
        }  # fmt: skip
        assert len(metrics["history"]) == 2
        assert metrics["data"]["test"]["images"] == sum(metrics["data"]["test"]["counts"].values())
        real_test = name.endswith("-real")
        assert metrics["ci95"]["method"] == (
            "patient bootstrap" if real_test else "image bootstrap"
        )
        rows = read_csv(run / "predictions.csv")
        assert len(rows) == metrics["data"]["test"]["images"]
        assert all(bool(r["patient"]) == real_test for r in rows)
        assert name in result.output  # the summary line
        computed += metrics["model"]["feature_shards"]["computed"]
    assert computed == 12, (
        "each of the 8 real and 4 synthetic shards went through the backbone once"
    )
    real_train = json.loads((out / "real+synth-real" / "metrics.json").read_text())["data"]["train"]
    assert real_train["images"] == 160 + 48, "real train pool plus all 48 synthetic (ratio 1)"

    state = load_file(out / "real-real" / "model.safetensors")
    torchvision.models.resnet18(num_classes=2).load_state_dict(state)

    # --task-id 0 is the same job as --scenario real-real: complete, so skipped
    metrics_file = out / "real-real" / "metrics.json"
    stamp = metrics_file.stat().st_mtime_ns
    result = invoke("classify", "--task-id", "0", *args)
    assert result.exit_code == 0, result.output
    assert metrics_file.stat().st_mtime_ns == stamp
    # the same folder spelled another way (through a symlink, with '.') is the same job
    alias = tmp_path / "alias"
    alias.symlink_to(Path(demo_shards).parent)
    spelled = alias / "." / Path(demo_shards).name
    moved = ["--real", spelled, "--synthetic", synthetic, "--out", out, *FAST]
    result = invoke("classify", "--task-id", "0", *moved)
    assert result.exit_code == 0 and "complete, skipped" in result.output, result.output
    assert metrics_file.stat().st_mtime_ns == stamp
    # another config in a finished folder is refused; --force redoes it (features kept)
    result = invoke("classify", "--task-id", "0", *args, "--epochs", "3")
    assert result.exit_code == 2 and "--force" in result.output and "epochs" in result.output
    result = invoke("classify", "--task-id", "0", *args, "--force")
    assert result.exit_code == 0, result.output
    assert metrics_file.stat().st_mtime_ns != stamp
    redone = json.loads(metrics_file.read_text())["model"]["feature_shards"]
    assert redone == {"computed": 0, "reused": 8}


def test_dry_run_and_bad_flags(tmp_path):
    result = invoke("classify", "--task-id", "3", "--out", tmp_path, "--dry-run")
    assert result.exit_code == 0
    config = json.loads(result.output)
    assert config["job"] == "ClassifyConfig" and config["task_id"] == 3
    assert (config["weights"], config["input_size"], config["epochs"]) == ("imagenet", "224", 150)
    result = invoke("classify", "--task-id", "1", "--scenario", "real-real", "--out", tmp_path)
    assert result.exit_code == 2 and "disagree" in result.output
    result = invoke("classify", "--scenario", "real-real", "--out", tmp_path, "--mode", "x")
    assert result.exit_code == 2 and "finetune" in result.output
    assert not any(tmp_path.iterdir()), "nothing written for a bad flag"


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda text: text[: len(text) // 2], "not JSON"),  # cut short by a full disk or a kill
        (lambda text: json.dumps({**json.loads(text), "accuracy": None} | {"ci95": 1}), "ci95"),
        (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "data"}),
         "no data"),
    ],
)  # fmt: skip
def test_an_unreadable_metrics_json_is_not_complete_and_is_redone(
    tmp_path, small_synthetic, damage, why
):
    """A damaged metrics.json: one line saying so, the scenario redone, its summary printed;
    never 'complete, skipped' and a traceback."""
    args = ["classify", "--synthetic", small_synthetic, "--out", tmp_path, "--task-id", "1"]
    args += [*FAST[:-1], "1", "--batch-size", "8"]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    metrics = tmp_path / "synth-synth" / "metrics.json"
    whole = metrics.read_text()
    metrics.write_text(damage(whole))
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert result.exception is None and "Traceback" not in result.output
    assert "complete, skipped" not in result.output
    told = [line for line in result.output.splitlines() if "is unreadable" in line]
    assert len(told) == 1 and str(metrics) in told[0] and why in told[0], result.output
    assert "not complete, redone" in told[0]
    redone = json.loads(metrics.read_text())
    assert redone["accuracy"] == json.loads(whole)["accuracy"], "the same job, the same result"
    assert "synth-synth      accuracy" in result.output
    again = invoke(*args)
    assert "complete, skipped" in again.output and "is unreadable" not in again.output
