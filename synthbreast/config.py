"""One dataclass per job, saved as `config.json` beside the job's outputs before any work."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synthbreast.fileio import atomic_write_json


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a job config, with its kind so a reader knows which job wrote it."""
    return {"job": type(config).__name__, **dataclasses.asdict(config)}


def save_config(config: Any, path: Path) -> None:
    atomic_write_json(path, to_dict(config))


def dumps(config: Any) -> str:
    return json.dumps(to_dict(config), indent=2)


@dataclass
class DemoDataConfig:
    """`synthbreast demo-data`: the procedural, clearly-not-real IDC-layout demo dataset."""

    out: str
    patients: int = 20
    per_class: int = 50  # patches per class per patient
    seed: int = 0
    patch_size: int = 50
    overwrite: bool = False


@dataclass
class IngestConfig:
    """`synthbreast ingest`: an image folder -> WebDataset shards split by patient into pools."""

    src: str
    out: str
    format: str = "idc"
    patient_regex: str | None = None  # imagefolder: a regex with a (?P<patient>...) group
    patch_size: int | None = None  # expected side in pixels; None = the format's default
    small_patches: str = "error"  # error | pad | drop, for patches smaller than patch_size
    skip_bad: bool = False  # skip (and count) corrupt, truncated, empty or mislabelled files
    seed: int = 0
    gan_fraction: float = 0.5  # share of images (by whole patients) the GAN may see
    test_fraction: float = 0.3  # share of the classification pool held out for testing
    balance: str = "none"  # none | undersample (equal classes inside every pool)
    max_per_class: int | None = None  # sample at most this many images per class (paper: 78,000)
    shard_size: int = 5000  # at most this many samples per shard
    min_shards: int = 8  # per pool, so that ranks x workers all get shards
    workers: int = 2  # processes that decode and check images
    overwrite: bool = False
    resume: bool = False


@dataclass
class InspectConfig:
    """`synthbreast inspect`: verify shards against their manifest, count, and draw grids."""

    shards: str
    out: str | None = None  # where the grids go; default SHARDS/inspect
    grid_per_class: int = 64
    seed: int = 0
    count: bool = True  # read every shard to count pool/class/patient
