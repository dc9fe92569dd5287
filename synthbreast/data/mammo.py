"""Mammograms -> patches: lesion-centred crops and healthy crops from breast tissue.

Stages (per image): decode (PGM/PNG/JPEG/TIFF, or DICOM through pydicom) -> 8-bit grey (a
stated normalisation for >8-bit data) -> breast mask (largest bright component, not the black
background or the film labels) -> one crop per located lesion and context setting -> healthy
crops drawn from the mask (less the pectoral muscle on MLO views), clear of every lesion ->
each crop resized to the patch side and encoded as PNG. Everything depends on (seed, image
path) only, so a resumed ingest writes the same bytes.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# Canonical pathologies; the layouts translate their own spellings into these.
HEALTHY, BENIGN, BWC, MALIGNANT = "healthy", "benign", "benign_without_callback", "malignant"
PATHOLOGY_WORDS = {
    "healthy": HEALTHY,
    "normal": HEALTHY,
    "norm": HEALTHY,
    "n": HEALTHY,
    "benign": BENIGN,
    "b": BENIGN,
    "benign_without_callback": BWC,
    "malignant": MALIGNANT,
    "m": MALIGNANT,
}

DICOM_SUFFIXES = {".dcm", ".dicom"}
MASK_THRESHOLD = 20  # 8-bit grey: film background and scanner noise stay below this
MASK_STEP = 4  # the mask is computed on a 1/4 image (a 1024 image: 256x256), fast and enough
HEALTHY_TRIES = 400  # random positions tried per healthy patch before giving up (counted)
# The pectoral muscle (MLO views): a bright wedge in the upper chest-wall corner. Healthy crops
# keep out of it (it is muscle, not breast tissue); lesion crops are cut where the lesion is.
PECTORAL_MODES = ("auto", "exclude", "keep")  # auto: exclude on MLO views, keep on the rest
PECTORAL_SHARE = (0.005, 0.4)  # a wedge outside these shares of the breast is not believed
PECTORAL_CONTRAST = 15  # grey levels the wall's top corner must exceed the breast's median by


@dataclass(frozen=True)
class Lesion:
    """One annotated abnormality. x, y in source pixels from the left and from the top, unless
    `y_from_bottom` (MIAS), converted with the image height once it is decoded."""

    pathology: str  # benign | malignant | benign_without_callback
    x: float | None = None
    y: float | None = None
    radius: float | None = None
    bbox: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 (top-left origin, exclusive)
    kind: str = ""  # the set's abnormality class: CIRC, SPIC, CALC, mass, calcification ...
    ref: str = ""  # where it is written: "Info.txt:12"
    y_from_bottom: bool = False
    # ROI mask candidates (CBIS-DDSM): the one of the image's size is the mask (its series
    # also holds the cropped lesion, and the two file names are swapped in some cases)
    masks: tuple[str, ...] = ()

    @property
    def located(self) -> bool:
        return self.bbox is not None or bool(self.masks) or None not in (self.x, self.y)


# --- label mappings and context rules, chosen by name -----------------------------------


@dataclass(frozen=True)
class LabelMap:
    """Pathology -> class index; a pathology missing from `classes` is left out (counted)."""

    name: str
    class_names: tuple[str, ...]
    classes: dict[str, int]
    description: str

    def label(self, pathology: str) -> int | None:
        return self.classes.get(pathology)

    @property
    def healthy(self) -> bool:
        return HEALTHY in self.classes


LABEL_MAPS: dict[str, LabelMap] = {
    m.name: m
    for m in (
        LabelMap(
            "healthy-benign-malignant",
            ("healthy", "benign", "malignant"),
            {HEALTHY: 0, BENIGN: 1, BWC: 1, MALIGNANT: 2},
            "3 classes: healthy tissue, benign lesions (with benign-without-callback), malignant",
        ),
        LabelMap(
            "benign-malignant",
            ("benign", "malignant"),
            {BENIGN: 0, BWC: 0, MALIGNANT: 1},
            "lesions: benign (and benign-without-callback, as the CBIS-DDSM lab) vs malignant",
        ),
        LabelMap(
            "benign-malignant-strict",
            ("benign", "malignant"),
            {BENIGN: 0, MALIGNANT: 1},
            "lesions only: benign vs malignant; benign-without-callback left out",
        ),
        LabelMap(
            "healthy-lesion",
            ("healthy", "lesion"),
            {HEALTHY: 0, BENIGN: 1, BWC: 1, MALIGNANT: 1},
            "healthy tissue vs any lesion",
        ),
    )
}


@dataclass(frozen=True)
class Context:
    name: str
    description: str
    # (lesion box side in pixels, PatchSpec) -> crop sides, one patch each
    sides: Callable[[float, PatchSpec], list[int]]


def _bbox_sides(lesion_side: float, spec: PatchSpec) -> list[int]:
    return [max(2, spec.min_crop, round(lesion_side * (1 + spec.context_percent / 100)))]


def _zoom_sides(lesion_side: float, spec: PatchSpec) -> list[int]:
    return [max(2, round(spec.side * zoom)) for zoom in spec.zoom_levels]


CONTEXTS: dict[str, Context] = {
    "bbox": Context(
        "bbox",
        "the lesion's bounding box plus --context-percent of surrounding tissue, resized",
        _bbox_sides,
    ),
    "zoom": Context(
        "zoom",
        "squares of --patch-size x each --zoom level (1 = native pixels) centred on the lesion",
        _zoom_sides,
    ),
}


@dataclass(frozen=True)
class PatchSpec:
    """How patches are cut: all of it from IngestConfig, so a worker process needs nothing else."""

    side: int
    context: str = "bbox"
    context_percent: float = 20.0
    min_crop: int = 0  # bbox: the smallest crop side in source pixels (0: the box decides)
    zoom_levels: tuple[float, ...] = (1.0,)
    healthy_per_image: int = 2
    healthy_gap: int = 32
    min_tissue: float = 0.9
    label_map: str = "healthy-benign-malignant"
    channels: int = 1
    seed: int = 0
    healthy_sides: tuple[int, ...] = ()  # bbox context: healthy crops take the lesions' sides
    pectoral: str = "auto"  # PECTORAL_MODES


@dataclass
class Patch:
    """One cut patch: where it came from and its encoded PNG."""

    key: str
    kind: str  # lesion | healthy
    label: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in source pixels (may pass the border)
    png: bytes
    lesion: dict[str, Any] | None = None
    tissue: float = 0.0  # share of the crop inside the breast mask

    @property
    def centre(self) -> tuple[int, int]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) // 2, (y0 + y1) // 2

    @property
    def crop_side(self) -> int:
        return self.box[2] - self.box[0]


@dataclass
class Extracted:
    """What one image gave: patches, and counts of what could not be cut."""

    width: int = 0
    height: int = 0
    mode: str = ""
    reason: str | None = None  # a bad image: corrupt, truncated, empty_file, no_pydicom ...
    detail: str = ""
    patches: list[Patch] = field(default_factory=list)
    unlocated: list[str] = field(default_factory=list)  # lesions with no place: no crop, and
    # no healthy crop from this image (the lesion could be anywhere in it)
    unmapped: int = 0  # lesions whose pathology the label map leaves out
    healthy_short: int = 0  # healthy patches asked for but not found clear of the lesions
    off_breast: list[str] = field(default_factory=list)  # lesions centred outside the mask
    normalisation: str = ""
    # share of the breast mask found to be pectoral muscle and kept out of healthy crops;
    # None: not looked for (--pectoral keep, or a view other than MLO under auto)
    pectoral: float | None = None


# --- decoding ------------------------------------------------------------------------------


class MissingDependency(Exception):
    """pydicom is needed and not installed."""


def read_grey(path: Path) -> tuple[np.ndarray, str]:
    """The image as a 2-D array (8 or 16 bit as stored) and its mode ('L', 'I;16', 'DICOM')."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return read_dicom(path), "DICOM"
    with Image.open(path) as img:
        img.load()
        mode = img.mode
        if mode in ("L", "I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
            return np.asarray(img), mode
        return np.asarray(img.convert("L")), mode  # RGB exports of grey films


def read_dicom(path: Path) -> np.ndarray:
    """DICOM pixel data as stored (often 16-bit), MONOCHROME1 inverted to MONOCHROME2."""
    try:
        import pydicom
    except ImportError as err:
        raise MissingDependency("DICOM needs pydicom: pip install 'synthbreast[dicom]'") from err
    dataset = pydicom.dcmread(path)
    pixels = dataset.pixel_array
    if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
        pixels = pixels.max() - pixels  # bright background on MONOCHROME1: dark, as film
    return pixels


def to_uint8(pixels: np.ndarray) -> tuple[np.ndarray, str]:
    """8-bit data as is; wider data scaled over the image's own min..max (stated as such)."""
    if pixels.dtype == np.uint8:
        return pixels, "none (8-bit)"
    values = pixels.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) * 255 if high > low else np.zeros_like(values)
    return np.rint(scaled).astype(np.uint8), "min-max of each image to 0..255"


# --- the breast mask and crops --------------------------------------------------------------


def breast_mask(image: np.ndarray) -> np.ndarray:
    """Breast tissue at 1/MASK_STEP resolution: the largest bright connected component, holes
    filled (the black background, film labels and scanner marks are left out)."""
    from scipy import ndimage

    small = image[::MASK_STEP, ::MASK_STEP]
    bright = ndimage.binary_opening(small > MASK_THRESHOLD, structure=np.ones((3, 3)))
    labels, count = ndimage.label(bright)
    if count == 0:
        return np.zeros_like(bright)
    sizes = ndimage.sum_labels(bright, labels, index=np.arange(1, count + 1))
    return ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))


def pectoral_mask(image: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """The pectoral muscle of an MLO view as a mask like `mask` (1/MASK_STEP resolution), or
    None where no wedge is found.

    The chest wall is the breast mask's fuller vertical edge (MIAS films are padded with black
    on both sides, so the image's own edge is not it). From the top of the wall, each row's
    run of pixels brighter than halfway between the muscle (the wall's top corner) and the
    breast's median is measured; a straight line fitted to the first rows' run ends is the
    muscle's edge (it narrows going down), and the wedge is what lies between it and the wall.
    A wedge that is too small or too large for a muscle is not believed (None)."""
    from scipy import ndimage

    cols = mask.sum(axis=0)
    filled = np.nonzero(cols)[0]
    if len(filled) == 0:
        return None
    c0, c1 = int(filled[0]), int(filled[-1])
    on_left = cols[c0] >= cols[c1]
    flip = (lambda a: a) if on_left else (lambda a: a[:, ::-1])  # the wall at column 0
    # smoothed inside the breast's columns: the black beyond the wall must not darken it
    small = image[::MASK_STEP, ::MASK_STEP][:, c0 : c1 + 1].astype(np.float32)
    grey, breast = ndimage.uniform_filter(flip(small), 5), flip(mask[:, c0 : c1 + 1])
    height, width = breast.shape
    wall_rows = np.nonzero(breast[:, 1])[0]
    if len(wall_rows) == 0:
        return None
    top = int(wall_rows[0])
    muscle, tissue = float(np.median(grey[top : top + 10, 1:8])), float(np.median(grey[breast]))
    if muscle < tissue + PECTORAL_CONTRAST:
        return None  # no bright corner: no muscle on this film (or a breast as dense as it)
    bright = (grey >= (muscle + tissue) / 2) & breast
    rows = np.arange(top, min(height, top + int(0.7 * height)))

    def run(row: np.ndarray) -> int:  # bright pixels from the wall before the first dark one
        return 0 if not row[1] else (width if row[1:].all() else int(np.argmin(row[1:])) + 1)

    runs = np.array([run(bright[r]) for r in rows])
    touching = np.nonzero(runs > 0)[0]
    gaps = np.nonzero(np.diff(touching) > 4)[0]
    first = touching[: gaps[0] + 1] if len(gaps) else touching  # the first band of rows
    if len(first) < 5:
        return None
    slope, start = np.polyfit(rows[first] - top, runs[first], 1)
    if slope >= 0:
        return None  # a muscle narrows going down the wall
    r, c = np.mgrid[0:height, 0:width]
    wedge = (c < start + slope * (r - top)) & (r >= top) & breast
    share = wedge.sum() / max(1, breast.sum())
    if not PECTORAL_SHARE[0] < share < PECTORAL_SHARE[1]:
        return None
    found = np.zeros_like(mask)
    found[:, c0 : c1 + 1] = flip(wedge)
    return found


def tissue_share(mask: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Share of a source-pixel box that lies in the (small) mask; outside the image counts 0."""
    x0, y0, x1, y1 = (round(v / MASK_STEP) for v in box)
    area = max(1, (x1 - x0) * (y1 - y0))
    h, w = mask.shape
    inside = mask[max(0, y0) : max(0, min(h, y1)), max(0, x0) : max(0, min(w, x1))]
    return float(inside.sum()) / area


def _in_mask(mask: np.ndarray, x: float, y: float) -> bool:
    row, col = int(y // MASK_STEP), int(x // MASK_STEP)
    return 0 <= row < mask.shape[0] and 0 <= col < mask.shape[1] and bool(mask[row, col])


def crop(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The box of the image; what lies outside it is black (the film background)."""
    x0, y0, x1, y1 = box
    h, w = image.shape
    out = np.zeros((y1 - y0, x1 - x0), dtype=image.dtype)
    sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


def encode(pixels: np.ndarray, side: int, channels: int) -> bytes:
    """A crop resized to side x side (Lanczos) as a 1- or 3-channel 8-bit PNG."""
    img = Image.fromarray(pixels, mode="L")
    if img.size != (side, side):
        img = img.resize((side, side), Image.LANCZOS)
    if channels == 3:
        img = img.convert("RGB")  # grey replicated: asked for with --channels 3
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def square(cx: float, cy: float, side: int) -> tuple[int, int, int, int]:
    """The side x side box centred on (cx, cy), in continuous coordinates (pixel i spans
    i..i+1), rounded half up so that equal inputs give equal boxes."""
    x0, y0 = math.floor(cx - side / 2 + 0.5), math.floor(cy - side / 2 + 0.5)
    return x0, y0, x0 + side, y0 + side


def mask_box(root: Path, masks: tuple[str, ...], shape: tuple[int, int]):
    """The bounding box of the ROI mask among `masks` that has the image's shape."""
    sizes = []
    for rel in masks:
        pixels, _ = read_grey(root / rel)
        if pixels.shape == shape:
            ys, xs = np.nonzero(pixels > pixels.max() / 2)
            if not len(xs):
                raise ValueError(f"{rel} is an empty mask")
            return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        sizes.append(f"{rel} {pixels.shape[1]}x{pixels.shape[0]}")
    raise ValueError(f"no ROI mask of the image's size {shape[1]}x{shape[0]} ({'; '.join(sizes)})")


def lesion_geometry(
    lesion: Lesion, shape: tuple[int, int], root: Path | None = None
) -> tuple[float, float, float] | None:
    """(centre x, centre y from the top, box side) of a located lesion, else None."""
    if lesion.masks and root is not None:
        box = mask_box(root, lesion.masks, shape)
    elif lesion.bbox is not None:
        box = lesion.bbox
    else:
        box = None
    if box is not None:
        x0, y0, x1, y1 = box
        return (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0)
    if lesion.x is None or lesion.y is None:
        return None
    # a pixel index; its centre is half a pixel further (MIAS: row height - y, as `1024 - y`)
    row = shape[0] - lesion.y if lesion.y_from_bottom else lesion.y
    radius = lesion.radius if lesion.radius else 0.0
    return lesion.x + 0.5, row + 0.5, 2 * radius


def _clear(box: tuple[int, int, int, int], zones: list[tuple[float, float, float]]) -> bool:
    """True when the box keeps out of every (x, y, radius) zone."""
    x0, y0, x1, y1 = box
    for x, y, radius in zones:
        dx = max(x0 - x, 0, x - x1)
        dy = max(y0 - y, 0, y - y1)
        if dx * dx + dy * dy <= radius * radius:
            return False
    return True


def _overlaps(box, boxes) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in boxes)


def extract(
    root: Path,
    rel: str,
    key: str,
    lesions: tuple[Lesion, ...],
    spec: PatchSpec,
    view: str = "",
) -> Extracted:
    """Every patch of one image (see the module's stages); a bad file comes back as a reason.
    `view` (MLO, CC or unknown "") decides whether the pectoral muscle is looked for."""
    path = root / rel
    result = Extracted()
    try:
        if path.stat().st_size == 0:
            result.reason, result.detail = "empty_file", "0 bytes"
            return result
        pixels, result.mode = read_grey(path)
    except MissingDependency as err:
        result.reason, result.detail = "needs_pydicom", str(err)
        return result
    except (OSError, SyntaxError, ValueError, AttributeError, EOFError) as err:
        text = str(err) or type(err).__name__
        result.reason = "truncated" if "truncated" in text.lower() else "corrupt"
        result.detail = text[:200]
        return result
    if pixels.ndim != 2:
        result.reason, result.detail = "corrupt", f"pixel array of shape {pixels.shape}"
        return result
    image, result.normalisation = to_uint8(pixels)
    result.height, result.width = image.shape
    labels = LABEL_MAPS[spec.label_map]
    context = CONTEXTS[spec.context]
    mask = breast_mask(image)

    # Lesion crops: one per lesion and context side, centred on the lesion.
    zones = []  # (x, y, radius) that healthy crops keep out of
    for i, lesion in enumerate(lesions):
        try:
            geometry = lesion_geometry(lesion, image.shape, root)
        except (OSError, ValueError, SyntaxError, MissingDependency) as err:
            result.reason = "bad_mask"
            result.detail = f"ROI mask of {lesion.ref}: {str(err)[:200]}"
            return result
        if geometry is None:
            result.unlocated.append(lesion.ref)
            continue
        cx, cy, lesion_side = geometry
        zones.append((cx, cy, lesion_side / 2 + spec.healthy_gap))
        if not _in_mask(mask, cx, cy):
            result.off_breast.append(lesion.ref)  # kept, as published; the manifest lists it
        label = labels.label(lesion.pathology)
        if label is None:
            result.unmapped += 1
            continue
        info = {
            "pathology": lesion.pathology,
            "kind": lesion.kind,
            "ref": lesion.ref,
            "centre": [round(cx, 1), round(cy, 1)],
            "side": round(lesion_side, 1),
        }
        for j, crop_side in enumerate(context.sides(lesion_side, spec)):
            box = square(cx, cy, crop_side)
            patch = Patch(f"{key}-l{i}-c{j}", "lesion", label, box, b"", info)
            patch.png = encode(crop(image, box), spec.side, spec.channels)
            patch.tissue = round(tissue_share(mask, box), 3)
            result.patches.append(patch)

    # Healthy crops: in the breast, clear of every lesion; none where a lesion has no place
    # (it could be anywhere in the image).
    if labels.healthy and spec.healthy_per_image and not result.unlocated:
        if spec.pectoral == "exclude" or (spec.pectoral == "auto" and view.upper() == "MLO"):
            muscle = pectoral_mask(image, mask)
            result.pectoral = 0.0
            if muscle is not None:
                result.pectoral = round(float(muscle.sum() / max(1, mask.sum())), 4)
                mask = mask & ~muscle
        ys, xs = np.nonzero(mask)
        rng = random.Random(f"healthy-{spec.seed}-{rel}")
        taken: list[tuple[int, int, int, int]] = []
        for n in range(spec.healthy_per_image):
            if spec.context == "bbox":  # the lesions' sides; native pixels when none is known
                sides = [rng.choice(spec.healthy_sides) if spec.healthy_sides else spec.side]
            else:
                sides = context.sides(0, spec)
            found = None
            for _ in range(HEALTHY_TRIES if len(xs) else 0):
                i = rng.randrange(len(xs))
                cx, cy = (xs[i] + 0.5) * MASK_STEP, (ys[i] + 0.5) * MASK_STEP
                boxes = [square(cx, cy, s) for s in sides]
                widest = max(boxes, key=lambda b: b[2] - b[0])
                if _overlaps(widest, taken) or not _clear(widest, zones):
                    continue
                share = tissue_share(mask, min(boxes, key=lambda b: b[2] - b[0]))
                if share >= spec.min_tissue:
                    found = boxes, share
                    break
            if found is None:
                result.healthy_short += 1
                continue
            boxes, share = found
            taken.append(max(boxes, key=lambda b: b[2] - b[0]))
            for j, box in enumerate(boxes):
                patch = Patch(f"{key}-h{n}-c{j}", "healthy", labels.label(HEALTHY), box, b"")
                patch.png = encode(crop(image, box), spec.side, spec.channels)
                patch.tissue = round(share, 3)
                result.patches.append(patch)
    return result
