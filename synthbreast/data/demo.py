"""The embedded demo dataset: procedural H&E-like patches in the Kaggle IDC folder layout.

The project's demo and tests need data that behaves like the real "Breast Histopathology Images"
set without shipping or downloading patient tissue. Every patch is drawn with numpy alone:

- stain: Beer-Lambert optical density, `rgb = background * exp(-(H * h_vec + E * e_vec))`, with
  hematoxylin and eosin colour vectors, strengths and background tinted per patient, so that a
  patient-level split matters as it does on real slides;
- tissue: pink fibrous stroma, white fat (adipocytes with thin pink membranes), purple nuclei
  with chromatin texture; class 1 (IDC) has MORE, LARGER and more IRREGULAR nuclei in nests;
- confounders: a diffuse hematoxylin haze, stroma density, fat fraction and brightness vary
  independently of the class, so the mean colour of a patch is a poor predictor on its own and
  a classifier has to look at structure.

Nuclei are drawn at twice the output size and box-downsampled; the other layers have analytic
soft edges. Lengths in the code are written for a 100-unit canvas (a 50 px patch at 2x) and
scaled by `n / 100`; counts are per 50 x 50 px and scaled by area.
Each patch has its own generator seeded by (seed, patient, label, index): the same config gives
byte-identical files and a patch never depends on the ones drawn before it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from synthbreast.config import DemoDataConfig, to_dict
from synthbreast.errors import UserError
from synthbreast.fileio import fsync_dir, read_json

DEMO_MARKER = "synthbreast-demo.json"  # top-level file that says "this folder is demo data"
DEMO_KIND = "synthbreast-demo"
DEMO_README = "README-DEMO-DATA.txt"
PNG_COMMENT = "synthbreast procedural demo data - not real tissue"
SMALL_BOX = 6  # half-size in 2x pixels of the box that most normal nuclei are drawn in
SCALE = 2  # nuclei are drawn at 2x and box-downsampled: their outlines and chromatin blend

# Stain vectors in optical density (R, G, B), from Macenko et al.'s typical H&E estimates.
HEMATOXYLIN_OD = (0.5626, 0.7201, 0.4062)
EOSIN_OD = (0.2159, 0.8012, 0.5581)

# Seed-stream tags: a patient's stain and its slide offsets come from their own generators.
_STAIN_STREAM = 9999
_OFFSET_STREAM = 9998


# --- stain -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Stain:
    """One patient's staining: colour vectors (unit OD), strengths and the glass colour."""

    hematoxylin: tuple[float, float, float]
    eosin: tuple[float, float, float]
    h_strength: float
    e_strength: float
    background: tuple[float, float, float]  # 0..255, the slide where there is no tissue


def _jitter_unit(rng: np.random.Generator, base: tuple[float, ...], spread: float) -> np.ndarray:
    vector = np.asarray(base) + rng.normal(0.0, spread, 3)
    vector = np.clip(vector, 0.05, None)
    return vector / np.linalg.norm(vector)


def patient_stain(rng: np.random.Generator) -> Stain:
    """A patient's stain tint: labs and batches differ in hue, strength and glass colour."""
    glass = rng.uniform(232, 250)
    background = np.clip(glass + rng.normal(0, 3, 3), 215, 255)
    return Stain(
        hematoxylin=tuple(float(v) for v in _jitter_unit(rng, HEMATOXYLIN_OD, 0.07)),
        eosin=tuple(float(v) for v in _jitter_unit(rng, EOSIN_OD, 0.07)),
        h_strength=float(rng.uniform(0.8, 1.25)),
        e_strength=float(rng.uniform(0.75, 1.3)),
        background=tuple(float(v) for v in background),
    )


# --- noise and texture -----------------------------------------------------------------


@lru_cache(maxsize=16)
def _pixel_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) of an n x n canvas."""
    centres = np.arange(n, dtype=np.float32) + np.float32(0.5)
    return np.meshgrid(centres, centres, indexing="ij")


def _interp_matrix(n: int, cells: int, shift: float) -> np.ndarray:
    """(n, cells + 2) weights that smoothly interpolate a coarse grid onto n pixels."""
    t = (np.arange(n) + 0.5) / n * cells + shift
    index = np.floor(t).astype(int)
    frac = t - index
    frac = frac * frac * (3.0 - 2.0 * frac)  # smoothstep: no visible grid creases
    weights = np.zeros((n, cells + 2), dtype=np.float32)
    rows = np.arange(n)
    weights[rows, index] = 1.0 - frac
    weights[rows, index + 1] = frac
    return weights


def _smooth_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Low-frequency noise (about unit scale) with `cells` bumps across: two matrix products."""
    grid = rng.standard_normal((cells + 2, cells + 2), dtype=np.float32)
    rows = _interp_matrix(n, cells, rng.uniform(0, 1))
    cols = _interp_matrix(n, cells, rng.uniform(0, 1))
    return rows @ grid @ cols.T * np.float32(1.6)


def _box_blur(image: np.ndarray, radius: int) -> np.ndarray:
    """Separable box blur by cumulative sums (edges replicated): a cheap local mean."""
    size = 2 * radius + 1
    # One extra leading row so that `sum[i + size] - sum[i]` covers exactly `size` pixels.
    summed = np.cumsum(np.pad(image, ((radius + 1, radius), (0, 0)), mode="edge"), axis=0)
    image = (summed[size:] - summed[:-size]) / size
    summed = np.cumsum(np.pad(image, ((0, 0), (radius + 1, radius)), mode="edge"), axis=1)
    return (summed[:, size:] - summed[:, :-size]) / size


def _stroma(rng: np.random.Generator, n: int) -> tuple[np.ndarray, float]:
    """Eosin density of collagen: wavy fibres that fade in and out. Returns (map, fibre angle).

    Fibres are sines across a direction, bent by smooth noise; a second smooth field sets their
    contrast so they do not look like a regular grating. Some patches get pale clefts.
    """
    yy, xx = _pixel_grid(n)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(5.0, 10.0) * n / 100
    warp = _smooth_noise(rng, n, 3) * rng.uniform(1.5, 4.0) + _smooth_noise(rng, n, 8) * 0.8
    across = xx * math.cos(angle) + yy * math.sin(angle)
    fine = 0.5 + 0.5 * np.sin(2 * math.pi * across / period + warp)
    contrast = np.clip(0.5 + 0.5 * _smooth_noise(rng, n, 5), 0, 1)
    fibres = 0.5 + (fine - 0.5) * contrast
    density = rng.uniform(0.4, 0.9) * np.clip(1.0 + 0.3 * _smooth_noise(rng, n, 3), 0.3, None)
    eosin = density * (0.5 + 0.5 * fibres)
    if rng.random() < 0.3:  # clefts: pale gaps between collagen bundles, in part of the patch
        zone = np.clip(_smooth_noise(rng, n, 2) - 0.3, 0, 1)
        eosin = eosin * (1.0 - 0.8 * zone * np.clip((0.25 - fine) / 0.25, 0, 1))
    return eosin, angle


def _fat(rng: np.random.Generator, n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Adipocytes: Voronoi cells on a jittered grid, a share of them empty (white) fat.

    Returns (interior, membrane) in 0..1: interior is where tissue is replaced by white, the
    membrane is the thin pink border between neighbouring fat cells.
    """
    empty = np.zeros((n, n), dtype=np.float32)
    if fraction <= 0:
        return empty, empty
    spacing = rng.uniform(18.0, 34.0) * n / 100
    cells = math.ceil(n / spacing) + 2
    grid_y, grid_x = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
    jitter = rng.uniform(-0.35, 0.35, (2, cells, cells))
    centre_y = ((grid_y + 0.5 + jitter[0] - 1) * spacing).astype(np.float32)
    centre_x = ((grid_x + 0.5 + jitter[1] - 1) * spacing).astype(np.float32)
    # Whole cells are fat or not: pick those where a smooth field is highest.
    field = _smooth_noise(rng, cells, 2) + 0.4 * rng.standard_normal((cells, cells))
    is_fat = field >= np.quantile(field, 1.0 - fraction)

    # Nearest and second-nearest centre among the 3 x 3 grid cells around each pixel, as a
    # running two-smallest over nine (n, n) arrays (the grid has a spare ring: no clipping).
    # Pixel positions bent by smooth noise, so that cell walls curve like real adipocytes.
    yy, xx = _pixel_grid(n)
    bend = 0.12 * spacing
    yy = np.clip(yy + bend * _smooth_noise(rng, n, 4), 0, n - 1e-6)
    xx = np.clip(xx + bend * _smooth_noise(rng, n, 4), 0, n - 1e-6)
    cell = (np.floor(yy / spacing).astype(int) + 1) * cells + np.floor(xx / spacing).astype(int) + 1
    centre_y, centre_x, is_fat = centre_y.ravel(), centre_x.ravel(), is_fat.ravel()
    d1, d2 = np.full((n, n), np.inf, np.float32), np.full((n, n), np.inf, np.float32)
    nearest_fat = np.zeros((n, n), dtype=bool)
    for step in (-cells - 1, -cells, -cells + 1, -1, 0, 1, cells - 1, cells, cells + 1):
        near = cell + step
        d = (centre_y.take(near) - yy) ** 2 + (centre_x.take(near) - xx) ** 2
        closer = d < d1
        d2 = np.where(closer, d1, np.minimum(d2, d))
        nearest_fat = np.where(closer, is_fat.take(near), nearest_fat)
        d1 = np.where(closer, d, d1)
    d1, d2 = np.sqrt(d1), np.sqrt(d2)
    width = rng.uniform(2.2, 3.2) * n / 100  # at least a pixel: a soft line, never skipped
    membrane = np.clip(1.0 - (d2 - d1) / width, 0, 1)
    interior = nearest_fat * (1.0 - membrane)
    return interior, membrane * nearest_fat


# --- nuclei ----------------------------------------------------------------------------


@dataclass
class Nuclei:
    """Parameters of N nuclei on the 2x canvas (lengths in canvas pixels)."""

    y: np.ndarray
    x: np.ndarray
    radius: np.ndarray
    aspect: np.ndarray  # long axis / short axis
    angle: np.ndarray  # direction of the long axis
    wobble: np.ndarray  # (N, 4) amplitudes of outline harmonics 2..5: 0 = a clean ellipse
    phase: np.ndarray  # (N, 4)
    intensity: np.ndarray  # hematoxylin optical density
    vesicular: np.ndarray  # 0..1: pale open chromatin with a dark rim and a nucleolus

    @staticmethod
    def concat(groups: list[Nuclei]) -> Nuclei:
        fields = Nuclei.__dataclass_fields__
        return Nuclei(**{f: np.concatenate([getattr(g, f) for g in groups]) for f in fields})

    def select(self, keep: np.ndarray) -> Nuclei:
        fields = Nuclei.__dataclass_fields__
        return Nuclei(**{f: getattr(self, f)[keep] for f in fields})


def _nuclei(
    rng: np.random.Generator,
    y: np.ndarray,
    x: np.ndarray,
    radius: np.ndarray,
    aspect: np.ndarray,
    angle: np.ndarray,
    wobble: float,
    intensity: np.ndarray,
    vesicular: np.ndarray,
) -> Nuclei:
    count = len(y)
    as32 = np.float32
    return Nuclei(
        y=y.astype(as32),
        x=x.astype(as32),
        radius=radius.astype(as32),
        aspect=aspect.astype(as32),
        angle=np.broadcast_to(angle, (count,)).astype(as32),
        wobble=(rng.uniform(0, wobble, (count, 4)) / np.arange(2, 6) ** 0.5).astype(as32),
        phase=rng.uniform(0, 2 * math.pi, (count, 4)).astype(as32),
        intensity=intensity.astype(as32),
        vesicular=vesicular.astype(as32),
    )


def _stromal_nuclei(rng: np.random.Generator, n: int, fibre_angle: float) -> Nuclei:
    """Fibroblasts: few, small, spindle-shaped, lying along the collagen fibres."""
    s = n / 100
    count = rng.poisson(rng.uniform(4, 14) * (n / 50) ** 2)
    return _nuclei(
        rng,
        y=rng.uniform(0, n, count),
        x=rng.uniform(0, n, count),
        radius=rng.uniform(1.5, 2.4, count) * s,
        aspect=rng.uniform(1.8, 3.2, count),
        angle=fibre_angle + math.pi / 2 + rng.normal(0, 0.2, count),
        wobble=0.04,
        intensity=rng.uniform(0.9, 1.3, count),
        vesicular=np.zeros(count),
    )


def _lymphocytes(rng: np.random.Generator, n: int) -> Nuclei:
    """A small cluster of lymphocytes: small, round, very dark. Found in either class."""
    s = n / 100
    count = rng.poisson(rng.uniform(4, 20) * (n / 50) ** 2)
    centre = rng.uniform(0, n, 2)
    spread = rng.uniform(6, 18) * s
    return _nuclei(
        rng,
        y=centre[0] + rng.normal(0, spread, count),
        x=centre[1] + rng.normal(0, spread, count),
        radius=rng.uniform(1.6, 2.2, count) * s,
        aspect=rng.uniform(1.0, 1.2, count),
        angle=rng.uniform(0, math.pi, count),
        wobble=0.03,
        intensity=rng.uniform(1.3, 1.7, count),
        vesicular=np.zeros(count),
    )


def _benign_duct(rng: np.random.Generator, n: int) -> tuple[Nuclei, np.ndarray]:
    """A normal duct: one ring of small regular epithelial nuclei around a white lumen."""
    s = n / 100
    yy, xx = _pixel_grid(n)
    centre = rng.uniform(0.15 * n, 0.85 * n, 2)
    ring = rng.uniform(9, 17) * s
    radius = rng.uniform(2.0, 2.6) * s
    count = max(6, round(2 * math.pi * ring / (2.4 * radius)))
    theta = np.linspace(0, 2 * math.pi, count, endpoint=False) + rng.normal(0, 0.05, count)
    distance = ring + rng.normal(0, 0.6 * s, count)
    nuclei = _nuclei(
        rng,
        y=centre[0] + distance * np.sin(theta),
        x=centre[1] + distance * np.cos(theta),
        radius=radius * rng.uniform(0.9, 1.1, count),
        aspect=rng.uniform(1.2, 1.6, count),
        angle=theta,  # long axis pointing at the lumen, like columnar cells
        wobble=0.04,
        intensity=rng.uniform(1.0, 1.3, count),
        vesicular=np.zeros(count),
    )
    lumen_radius = ring - 2.5 * radius
    lumen = np.clip(lumen_radius - np.hypot(yy - centre[0], xx - centre[1]), 0, 1)
    return nuclei, lumen


def _tumour_nuclei(rng: np.random.Generator, n: int) -> Nuclei:
    """IDC: many large pleomorphic nuclei with irregular outlines, crowded into nests."""
    s = n / 100
    count = rng.poisson(rng.uniform(30, 70) * (n / 50) ** 2)
    nests = rng.uniform(0, n, (rng.integers(1, 4), 2))
    which = rng.integers(0, len(nests), count)
    spread = rng.uniform(9, 24) * s
    scattered = rng.random(count) < 0.2
    y = np.where(
        scattered, rng.uniform(0, n, count), nests[which, 0] + rng.normal(0, spread, count)
    )
    x = np.where(
        scattered, rng.uniform(0, n, count), nests[which, 1] + rng.normal(0, spread, count)
    )
    pleomorphism = rng.uniform(0.15, 0.35)
    return _nuclei(
        rng,
        y=y,
        x=x,
        radius=np.clip(rng.uniform(2.8, 3.8) * rng.lognormal(0, pleomorphism, count), 2, 7) * s,
        aspect=rng.uniform(1.0, 1.7, count),
        angle=rng.uniform(0, math.pi, count),
        wobble=rng.uniform(0.1, 0.25),
        intensity=rng.uniform(0.6, 1.3, count),
        vesicular=np.where(rng.random(count) < 0.5, rng.uniform(0.3, 0.8, count), 0.0),
    )


def _draw_nuclei(
    rng: np.random.Generator, nuclei: Nuclei, half: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each nucleus on its own (2 half + 1)^2 box: (rows, cols, density, coverage).

    rows (N, K, 1) and cols (N, 1, K) are canvas pixel indices (may lie off the canvas); the
    outline is an ellipse whose radius is modulated by harmonics 2..5 (the irregularity).
    """
    offsets = np.arange(-half, half + 1)
    top, left = np.floor(nuclei.y).astype(int), np.floor(nuclei.x).astype(int)
    rows = (top[:, None] + offsets)[:, :, None]
    cols = (left[:, None] + offsets)[:, None, :]
    dy = rows + 0.5 - nuclei.y[:, None, None]
    dx = cols + 0.5 - nuclei.x[:, None, None]
    cos, sin = np.cos(nuclei.angle)[:, None, None], np.sin(nuclei.angle)[:, None, None]
    radius = nuclei.radius[:, None, None]
    stretch = np.sqrt(nuclei.aspect)[:, None, None]
    along = (dx * cos + dy * sin) / (radius * stretch)
    across = (dy * cos - dx * sin) / (radius / stretch)
    rho = np.hypot(along, across) + 1e-9
    # Harmonics 2..5 of the outline: Re(sum_k c_k z^k) for the unit direction z, by Horner's
    # rule (no arctan, no cos per pixel).
    z = (along + 1j * across) / rho
    coef = (nuclei.wobble * np.exp(1j * nuclei.phase))[:, :, None, None]
    poly = ((coef[:, 3] * z + coef[:, 2]) * z + coef[:, 1]) * z + coef[:, 0]
    outline = 1 + (poly * z * z).real
    distance = rho / np.maximum(outline, 0.3)  # 1 on the outline
    mask = np.clip((1 - distance) * radius + 0.5, 0, 1)  # one-pixel anti-aliased edge

    chromatin = 0.7 + 0.6 * rng.random(mask.shape, dtype=np.float32)
    vesicular = nuclei.vesicular[:, None, None]
    open_centre = 1 - 0.6 * vesicular * np.clip(1 - distance / 0.75, 0, 1)
    spot = rng.uniform(-0.3, 0.3, (2, len(nuclei.y))).astype(np.float32)[:, :, None, None] * radius
    nucleolus = np.exp(-((dy - spot[0]) ** 2 + (dx - spot[1]) ** 2) / 0.5)
    density = mask * (nuclei.intensity[:, None, None] * chromatin * open_centre)
    density += mask * vesicular * 1.2 * nucleolus
    return rows, cols, density, mask


def _stamp_nuclei(
    rng: np.random.Generator, n: int, nuclei: Nuclei
) -> tuple[np.ndarray, np.ndarray]:
    """Draw all nuclei into (hematoxylin density, coverage 0..1) maps of n x n.

    They are drawn at SCALE times the size and box-downsampled, so that outlines, chromatin
    and nucleoli of nuclei only a few pixels wide still average into the right shade.
    Nuclei are drawn in batches of similar size (one (N, K, K) array per batch, no Python loop
    over nuclei) and scattered into a padded canvas with `maximum.at`, so overlaps do not
    double up. Batching keeps one huge nucleus from making every box huge.
    """
    big = n * SCALE
    nuclei = dataclasses.replace(
        nuclei, y=nuclei.y * SCALE, x=nuclei.x * SCALE, radius=nuclei.radius * SCALE
    )
    reach = nuclei.radius * np.sqrt(nuclei.aspect) * (1 + nuclei.wobble.sum(axis=1)) + 1.5
    # Two box sizes: small for the many small nuclei, one that fits the largest of the rest.
    small = reach <= SMALL_BOX
    halves = np.where(small, SMALL_BOX, math.ceil(reach.max(initial=0)))
    # Room for a box around nuclei centred up to two radii off the canvas (see `_inside`).
    pad = 3 * int(halves.max(initial=0)) + 1
    width = big + 2 * pad
    density = np.zeros(width * width, dtype=np.float32)
    coverage = np.zeros(width * width, dtype=np.float32)
    for half in np.unique(halves):
        rows, cols, value, mask = _draw_nuclei(rng, nuclei.select(halves == half), int(half))
        flat_index = (rows + pad) * width + (cols + pad)
        drawn = mask > 0  # most of each box is outside its nucleus: skip those pixels
        flat_index = np.broadcast_to(flat_index, mask.shape)[drawn]
        np.maximum.at(density, flat_index, value[drawn])
        np.maximum.at(coverage, flat_index, mask[drawn])
    crop = (slice(pad, pad + big), slice(pad, pad + big))
    return _downsample(density.reshape(width, width)[crop]), _downsample(
        coverage.reshape(width, width)[crop]
    )


def _downsample(image: np.ndarray) -> np.ndarray:
    """Mean over SCALE x SCALE blocks."""
    n = image.shape[0] // SCALE
    return image.reshape(n, SCALE, n, SCALE).mean(axis=(1, 3))


def _inside(nuclei: Nuclei, n: int, empty: np.ndarray) -> Nuclei:
    """Drop nuclei centred off the canvas (beyond their own size) or inside fat or a lumen."""
    margin = 2 * nuclei.radius
    near = (
        (nuclei.y > -margin)
        & (nuclei.y < n + margin)
        & (nuclei.x > -margin)
        & (nuclei.x < n + margin)
    )
    iy = np.clip(nuclei.y.astype(int), 0, n - 1)
    ix = np.clip(nuclei.x.astype(int), 0, n - 1)
    return nuclei.select(near & (empty[iy, ix] < 0.5))


# --- one patch -------------------------------------------------------------------------


def _fat_fraction(rng: np.random.Generator) -> float:
    """Share of adipocyte cells that are fat: often none, sometimes most of the patch."""
    return 0.0 if rng.random() < 0.45 else float(rng.uniform(0.1, 0.65))


def _to_rgb(hema: np.ndarray, eosin: np.ndarray, stain: Stain, brightness: float) -> np.ndarray:
    """Beer-Lambert: light through the stains, as float RGB on the 0..255 scale."""
    h_vector = np.asarray(stain.hematoxylin, np.float32)
    e_vector = np.asarray(stain.eosin, np.float32)
    density = hema[..., None] * h_vector + eosin[..., None] * e_vector
    return np.asarray(stain.background, np.float32) * brightness * np.exp(-density)


def render_patch(rng: np.random.Generator, label: int, stain: Stain, size: int = 50) -> np.ndarray:
    """One H&E-like patch, uint8 (size, size, 3). Label 1 = IDC: denser, larger, irregular nuclei.

    Stages: stroma and fat -> nuclei for the class -> cytoplasm around crowded nuclei -> a
    class-independent hematoxylin haze -> stain to RGB -> sensor noise. Only the nuclei are
    drawn at 2x; the other layers have analytic soft edges that need no supersampling.
    """
    n = size
    eosin, fibre_angle = _stroma(rng, n)
    fat, membrane = _fat(rng, n, _fat_fraction(rng))

    groups, empty = [_stromal_nuclei(rng, n, fibre_angle)], fat
    if rng.random() < 0.35:
        groups.append(_lymphocytes(rng, n))
    if label == 1:
        groups.append(_tumour_nuclei(rng, n))
    elif rng.random() < 0.35:
        duct, lumen = _benign_duct(rng, n)
        groups.append(duct)
        empty = np.clip(fat + lumen, 0, 1)
    nuclei = _inside(Nuclei.concat(groups), n, empty)
    hema, coverage = _stamp_nuclei(rng, n, nuclei)

    # Crowded nuclei sit in pale purple cytoplasm that pushes the collagen aside.
    cytoplasm = np.clip(_box_blur(coverage, round(3 * n / 100)) * 2.5, 0, 1) * (1 - empty)
    eosin = eosin * (1 - 0.5 * cytoplasm) + 0.25 * cytoplasm + 0.2 * coverage
    eosin = eosin * (1 - empty) + 0.45 * membrane + 0.02
    hema = hema + 0.2 * cytoplasm

    # Haze: diffuse hematoxylin (mucin, crush, thick sections) that darkens either class.
    haze_level = rng.uniform(0.0, 0.35) if rng.random() < 0.6 else 0.0
    haze = haze_level * np.clip(0.7 + 0.5 * _smooth_noise(rng, n, 2), 0, None)
    hema = hema + haze * (1 - empty)

    hema = hema * stain.h_strength * rng.uniform(0.85, 1.15)
    eosin = eosin * stain.e_strength * rng.uniform(0.85, 1.15)
    rgb = _to_rgb(hema, eosin, stain, brightness=rng.uniform(0.93, 1.03))
    rgb += rng.normal(0, 1.5, rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# --- the dataset -----------------------------------------------------------------------


def demo_file_name(patient: str, x: int, y: int, label: int) -> str:
    """The Kaggle IDC file name, e.g. `demo03_idx5_x1051_y2501_class1.png`."""
    if "_" in patient or "/" in patient:
        raise ValueError(f"patient id {patient!r} may not contain '_' or '/' (names split on '_')")
    return f"{patient}_idx5_x{x}_y{y}_class{label}.png"


def _patient_ids(count: int) -> list[str]:
    width = max(2, len(str(count - 1)))
    return [f"demo{index:0{width}d}" for index in range(count)]


def _slide_offsets(
    rng: np.random.Generator, per_class: int, step: int
) -> dict[int, list[tuple[int, int]]]:
    """Distinct (x, y) slide offsets per class, `1 + step * k` like the real set.

    Tumour patches lie in one region of the slide, as IDC does, the rest scattered around it.
    """
    side = math.ceil(math.sqrt(6 * per_class))  # a grid three times larger than needed
    row, col = np.divmod(np.arange(side * side), side)
    centre = rng.uniform(0, side, 2)
    score = np.hypot(row - centre[0], col - centre[1]) + rng.uniform(0, side / 4, side * side)
    order = np.argsort(score, kind="stable")
    tumour = order[:per_class]
    benign = rng.choice(order[per_class:], per_class, replace=False)
    origin = rng.integers(0, 40, 2)

    def offsets(cells: np.ndarray) -> list[tuple[int, int]]:
        return [
            (1 + step * int(origin[1] + col[c]), 1 + step * int(origin[0] + row[c])) for c in cells
        ]

    return {0: offsets(benign), 1: offsets(tumour)}


def _png_bytes(image: np.ndarray) -> bytes:
    """PNG with a Comment chunk that says it is not real tissue; no timestamps: same bytes."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", PNG_COMMENT)
    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


@dataclass(frozen=True)
class DemoFormat:
    """One layout the demo data can be written in: its classes and what each unit is."""

    name: str
    class_names: tuple[str, ...]  # as the layout's ingest names them (index = label)
    description: str


DEMO_FORMATS: dict[str, DemoFormat] = {
    f.name: f
    for f in (
        DemoFormat("idc", ("0", "1"), "H&E-like 50 px RGB patches, Kaggle IDC folders"),
        DemoFormat(
            "mias",
            ("healthy", "benign", "malignant"),
            "grey 1024 px films and Info.txt, mini-MIAS (synthbreast/data/demo_mammo.py)",
        ),
    )
}


def demo_class_names(format_name: str) -> list[str]:
    """The class names an ingest of the demo data in this layout gives."""
    if format_name not in DEMO_FORMATS:
        raise UserError(
            f"--format {format_name!r} has no demo data; --demo works with "
            f"{', '.join(DEMO_FORMATS)} (or pass --data FOLDER)"
        )
    return list(DEMO_FORMATS[format_name].class_names)


def _check_config(config: DemoDataConfig) -> None:
    demo_class_names(config.format)
    if config.patients < 1:
        raise UserError(f"--patients must be at least 1 (got {config.patients})")
    if config.per_class < 1:
        raise UserError(f"--per-class must be at least 1 (got {config.per_class})")
    if config.patch_size < 8:
        raise UserError(f"patch_size must be at least 8 pixels (got {config.patch_size})")


def is_demo_dataset(path: Path) -> bool:
    """True where `path` holds a marker written by `write_demo_dataset`."""
    try:
        return read_json(Path(path) / DEMO_MARKER).get("kind") == DEMO_KIND
    except (OSError, ValueError, AttributeError):
        return False


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse before any work: an existing OUT is only replaced when asked and when safe."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another OUT")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(
            f"{out} already exists and is not empty; pass --overwrite to replace a demo dataset "
            "there, or choose another OUT"
        )
    if not is_demo_dataset(out):
        raise UserError(
            f"{out} is not a synthbreast demo dataset (it has no {DEMO_MARKER}); --overwrite "
            "will not delete it. Remove it yourself or choose another OUT"
        )


def _readme(config: DemoDataConfig, out: Path) -> str:
    return (
        "PROCEDURAL DEMO DATA - NOT REAL TISSUE\n"
        "\n"
        "Every image in this folder was drawn by a program (synthbreast/data/demo.py) from\n"
        "random numbers. None of it comes from a patient or a microscope. It imitates the\n"
        "folder layout of the Kaggle 'Breast Histopathology Images' (IDC) set so that the\n"
        "synthbreast pipeline can be demonstrated and tested without real data.\n"
        "Do not use it to draw any medical or scientific conclusion.\n"
        "\n"
        "Layout: <patient>/<label>/<patient>_idx5_x<X>_y<Y>_class<label>.png,\n"
        "label 0 = no IDC, 1 = IDC (here: denser, larger, irregular drawn nuclei).\n"
        "\n"
        f"Made with: synthbreast demo-data {out.name} --patients {config.patients} "
        f"--per-class {config.per_class} --seed {config.seed}\n"
        f"Seed: {config.seed}; patch size: {config.patch_size} px; "
        f"{config.patients * config.per_class * 2} patches.\n"
        f"The same command and seed give byte-identical files. Marker: {DEMO_MARKER}\n"
    )


def _write_patient(
    folder: Path, config: DemoDataConfig, index: int, patient: str
) -> dict[int, int]:
    """Both classes of one patient into folder/<patient>/<label>/. Returns patches per label."""
    stain = patient_stain(np.random.default_rng([config.seed, index, _STAIN_STREAM]))
    offsets = _slide_offsets(
        np.random.default_rng([config.seed, index, _OFFSET_STREAM]),
        config.per_class,
        config.patch_size,
    )
    written = {}
    for label in (0, 1):
        label_dir = folder / patient / str(label)
        label_dir.mkdir(parents=True)
        for k, (x, y) in enumerate(offsets[label]):
            rng = np.random.default_rng([config.seed, index, label, k])
            image = render_patch(rng, label, stain, config.patch_size)
            (label_dir / demo_file_name(patient, x, y, label)).write_bytes(_png_bytes(image))
        written[label] = len(offsets[label])
    return written


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished tmp folder to OUT; an old demo OUT is removed only after that."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.is_dir():
        out.rename(old)  # empty or a demo dataset (checked before any work)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old.exists():
            old.rename(out)
        raise
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_demo_dataset(
    config: DemoDataConfig, on_progress: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Write the demo dataset to `config.out`, whole or not at all.

    Everything is written into a hidden sibling `.OUT.tmp-<pid>` and renamed into place at
    the end, so an interrupted run leaves no half dataset under OUT. Calls `on_progress(n)`
    after every n patches. Returns a summary: out, patients, counts per class, seconds.
    """
    _check_config(config)
    out = Path(config.out).expanduser().absolute()
    _check_out(out, config.overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier crash of a process with our pid

    started = time.perf_counter()
    if config.format == "mias":
        return _write_mias(config, out, tmp, started, on_progress)
    patients = _patient_ids(config.patients)
    counts = {"0": 0, "1": 0}
    try:
        tmp.mkdir()
        for index, patient in enumerate(patients):
            written = _write_patient(tmp, config, index, patient)
            for label, count in written.items():
                counts[str(label)] += count
            if on_progress is not None:
                on_progress(sum(written.values()))
        # No out path and no timings in the marker: the same config gives the same bytes.
        content = {k: v for k, v in to_dict(config).items() if k not in ("out", "overwrite")}
        marker = {
            "kind": DEMO_KIND,
            "real": False,
            "note": "procedural demo data, not real tissue",
            "config": content,
            "counts": {"patients": len(patients), "images": sum(counts.values()), **counts},
        }
        (tmp / DEMO_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        (tmp / DEMO_README).write_text(_readme(config, out), encoding="utf-8")
        _check_out(out, config.overwrite)  # OUT may have appeared while we were drawing
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "out": str(out),
        "patients": patients,
        "counts": counts,
        "images": sum(counts.values()),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _write_mias(
    config: DemoDataConfig, out: Path, tmp: Path, started: float, on_progress
) -> dict[str, Any]:
    """The mias-layout demo: films and Info.txt (data/demo_mammo.py), marker and README,
    written in tmp and renamed into place like the IDC demo."""
    from synthbreast.data import demo_mammo

    try:
        tmp.mkdir()
        counts = demo_mammo.write_women(tmp, config.patients, config.seed, on_progress)
        content = {k: v for k, v in to_dict(config).items() if k not in ("out", "overwrite")}
        marker = {
            "kind": DEMO_KIND,
            "real": False,
            "note": "procedural demo data, not real mammograms",
            "config": content,
            "counts": {"patients": config.patients, **counts},
        }
        (tmp / DEMO_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        readme = demo_mammo.readme(config.patients, config.seed, out.name)
        (tmp / DEMO_README).write_text(readme, encoding="utf-8")
        _check_out(out, config.overwrite)
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "out": str(out),
        "patients": config.patients,
        "counts": counts,
        "images": counts["films"],
        "seconds": round(time.perf_counter() - started, 3),
    }
