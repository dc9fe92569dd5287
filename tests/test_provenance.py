"""Provenance: a synthetic set records which real patients its GAN saw; classify and fidelity
refuse one whose GAN saw the patients they test on; a finished scenario is redone when the
data it read changed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from synthbreast.config import ClassifyConfig, FidelityConfig, GenerateConfig
from synthbreast.data.shards import load_manifest
from synthbreast.errors import UserError
from synthbreast.eval.classify import run_classify
from synthbreast.eval.fidelity import run_fidelity
from synthbreast.generate import run_generate
from synthbreast.models.msggan import Generator, MSGGANConfig
from synthbreast.train.checkpoint import save_checkpoint


def gan_run(run_dir: Path, shards: Path, pool: str) -> Path:
    """A checkpoint of an untrained tiny conditional G whose training config names `pool`."""
    torch.manual_seed(0)
    config = MSGGANConfig(resolution=16, latent_dim=16, width=1 / 16, num_classes=2)
    G = Generator(config)
    save_checkpoint(run_dir, 1, {
        "model_name": "msggan-cond", "model": config.to_dict(), "G_ema": G.state_dict(),
        "config": {"shards": str(shards), "pool": pool, "class_label": None}, "step": 1,
    })  # fmt: skip
    return run_dir


def synthetic(out: Path, run: Path, seed: int = 0) -> Path:
    for label in (0, 1):
        job = GenerateConfig(
            checkpoint=str(run), out=str(out / f"class{label}"), shards=1, per_shard=12,
            class_label=label, output_size=50, seed=seed + label,
        )  # fmt: skip
        run_generate(job, env={})
    return out


def classify_config(out: Path, shards: Path, synth: Path, scenario: str) -> ClassifyConfig:
    return ClassifyConfig(
        out=str(out), real=str(shards), synthetic=[str(synth)], scenario=scenario,
        weights="none", input_size="native", epochs=1, batch_size=16, n_boot=20,
    )  # fmt: skip


def test_a_gan_trained_on_the_test_pool_is_refused_naming_both_manifests(demo_shards, tmp_path):
    run = gan_run(tmp_path / "gan", demo_shards, pool="test")
    synth = synthetic(tmp_path / "synthetic", run)
    source = load_manifest(synth / "class0")["source"]
    assert source["training_pool"] == "test"
    assert source["training_patients"] == sorted(
        load_manifest(demo_shards)["pools"]["test"]["patients"]
    )
    assert source["training_manifest_sha256"] and source["training_split_seed"] == 0
    for scenario in ("synth-real", "real+synth-real"):
        config = classify_config(tmp_path / "c", demo_shards, synth, scenario)
        with pytest.raises(UserError) as refused:
            run_classify(config)
        said = str(refused.value)
        assert "trained on" in said and "'test' pool" in said and "--pool gan" in said
        assert str(demo_shards / "manifest.json") in said, "both manifests named"
    fidelity = FidelityConfig(str(demo_shards), [str(synth)], out=str(tmp_path / "f"))
    with pytest.raises(UserError, match="'test' pool"):
        run_fidelity(fidelity)
    # synth-synth reads no real patients: nothing to refuse
    assert run_classify(classify_config(tmp_path / "c", demo_shards, synth, "synth-synth"))


@pytest.mark.slow
def test_a_finished_scenario_is_redone_when_its_data_changed(demo_shards, tmp_path, capsys):
    run = gan_run(tmp_path / "gan", demo_shards, pool="gan")
    synth = synthetic(tmp_path / "synthetic", run)
    config = classify_config(tmp_path / "c", demo_shards, synth, "synth-real")
    metrics = run_classify(config) / "metrics.json"
    first = json.loads(metrics.read_text())
    stamp = os.stat(metrics).st_mtime_ns
    run_classify(config)
    assert os.stat(metrics).st_mtime_ns == stamp, "same data: skipped"

    shutil.rmtree(synth)
    synthetic(synth, run, seed=7)  # regenerated: other images, other manifests
    said = []
    run_classify(config, log=said.append)
    assert os.stat(metrics).st_mtime_ns != stamp, "redone"
    assert any("data changed" in line and "class0" in line for line in said)
    second = json.loads(metrics.read_text())
    shas = [m["sha256"] for m in second["data"]["train"]["manifests"]]
    assert shas != [m["sha256"] for m in first["data"]["train"]["manifests"]]
