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


@dataclass
class TrainGANConfig:
    """`synthbreast train-gan`: MSG-GAN with WGAN-GP on one pool (and class) of the shards.

    `batch_size` is the global batch, split evenly over the processes, so one process and
    N processes train the same arithmetic. Schedules are in kimg (thousands of real images).
    """

    shards: str
    outdir: str = "runs"  # run folders are numbered inside: <outdir>/00003-<description>
    pool: str = "gan"
    class_label: int | None = None  # None: every class in one model
    resolution: int = 64
    latent_dim: int = 512
    width: float = 1.0  # channel multiplier: 1.0 = the paper; smaller for CPUs
    g_padding: str = "zeros"  # generator conv padding: zeros (the paper) | reflect
    batch_size: int = 16
    optimizer: str = "rmsprop"  # rmsprop (the paper) | adam (betas 0, 0.99: official MSG-GAN)
    lr: float = 1e-4
    gp_weight: float = 10.0
    drift: float = 0.001
    ema_kimg: float = 10.0  # EMA half-life in kimg, as in StyleGAN2-ADA
    kimg: float = 1000.0  # training length
    tick_kimg: float = 4.0  # a progress line every tick
    snapshot_kimg: float = 50.0  # sample grid of fixed latents
    checkpoint_kimg: float = 50.0
    mixed_precision: str = "no"  # no | fp16 | bf16
    seed: int = 0
    workers: int = 2  # DataLoader workers per process
    grid_size: int = 64
    resume: str | None = None  # None, "auto" (latest run of the same description) or a path
    budget: str | None = None  # tiny | small | paper: the preset this config came from


@dataclass
class GenerateConfig:
    """`synthbreast generate`: a trained generator -> synthetic shards in the real schema.

    Shard i's latents come from a seed derived from (seed, i) alone, so any shard can be made
    by any process or array task, bit for bit.
    """

    checkpoint: str  # a run folder (its latest checkpoint) or one ckpt-*.json
    out: str
    shards: int = 76
    per_shard: int = 1000
    class_label: int | None = None  # None: the class the GAN was trained on
    seed: int = 0
    shard_range: str | None = None  # "START:END", end exclusive; None = all (or Slurm's task)
    output_size: int | None = None  # None: the model's resolution; e.g. 50 = real patch size
    batch_size: int = 100
