"""A histology feature space trained for the job: the in-domain extractor of fidelity.

A frozen randomly initialised backbone gives random features, and ImageNet features were
learnt on photographs. So the `histology` extractor is a network trained on the real data
itself: a small CNN (models/classifier.py `cnn4`) trained from scratch, all layers, on the real
`train` pool (patients the GAN never saw), at the patches' own size. Its pooled output (256-d)
is the space. The training run is an ordinary `synthbreast classify` real-real run, so it also
says how good the space is: its real-real test figures are recorded with the features.

Cached: the run lives in CACHE/histology-<key>/real-real, the key hashing the ingest manifest's
sha256 and the training settings, and classify skips a complete run of the same config, so
every fidelity run on the same ingest shares one training.

Measured on the real sample (40 patients; 747 train, 329 test images; 2 cores): see
`HISTOLOGY_SETTINGS` below and the README.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from synthbreast.config import ClassifyConfig
from synthbreast.data.shards import MANIFEST
from synthbreast.errors import UserError
from synthbreast.fileio import read_json, sha256_file
from synthbreast.results import METRICS

HISTOLOGY_VERSION = 1  # part of the cache key: bump when the recipe changes
# A 4-block CNN trained from scratch, all layers, at the patches' own size: no ImageNet ResNet
# weights are on the package registry, and on the real sample (2 cores) it trains in about a
# minute where a ResNet18 fine-tuned from random weights takes over ten (README, "Classifier
# backbones", has both spaces' real-real figures).
HISTOLOGY_SETTINGS: dict[str, Any] = {
    "backbone": "cnn4",
    "weights": "none",
    "mode": "finetune",
    "input_size": "native",
    "epochs": 15,
    "batch_size": 64,
    "lr": 1e-3,
}
SCENARIO = "real-real"


def histology_key(real: str | Path, settings: dict[str, Any], seed: int) -> str:
    """What decides the trained space: the ingest (its manifest's bytes), recipe and seed."""
    manifest = Path(real) / MANIFEST
    if not manifest.is_file():
        raise UserError(f"{manifest} not found: --real must be a `synthbreast ingest` output")
    identity = {
        "manifest_sha256": sha256_file(manifest),
        "settings": settings,
        "seed": seed,
        "version": HISTOLOGY_VERSION,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def histology_run(
    real: str | Path,
    cache: str | Path,
    seed: int = 0,
    device: str = "auto",
    settings: dict[str, Any] | None = None,
    progress=None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train (or find) the histology network of this ingest; returns its classify run folder."""
    from synthbreast.eval.classify import run_classify  # heavy; only when a space is needed

    settings = {**HISTOLOGY_SETTINGS, **(settings or {})}
    out = Path(cache) / f"histology-{histology_key(real, settings, seed)}"
    config = ClassifyConfig(
        out=str(out), real=str(real), scenario=SCENARIO, seed=seed, device=device, n_boot=200,
        **settings,
    )  # fmt: skip
    if log and not (out / SCENARIO / METRICS).is_file():
        log(
            f"histology space: fine-tuning a {settings['backbone']} on the real train pool "
            f"({settings['epochs']} epochs) into {out}"
        )
    return run_classify(config, progress, log)


def histology_summary(run: str | Path) -> dict[str, Any]:
    """How good the space is: its classify run's real-real test figures."""
    metrics = read_json(Path(run) / METRICS)
    keep = ("accuracy", "balanced_accuracy", "roc_auc")
    return {
        "run": str(run),
        **{k: metrics.get(k) for k in keep},
        "train_images": metrics["data"]["train"]["images"],
        "test_images": metrics["data"]["test"]["images"],
        "recipe": {
            k: v for k, v in metrics["model"].items() if k in {*HISTOLOGY_SETTINGS, "image_size"}
        },
    }
