"""Procedural demo mammograms in the mini-MIAS layout: grey films drawn with numpy alone.

`synthbreast demo-data OUT --format mias` (and `pipeline --demo --format mias`) writes
`mdbNNN.pgm` films beside an `Info.txt` in the set's own format, so that the mias layout, its
lesion and healthy patches and the 3-class chain (healthy / benign / malignant) run with
nothing downloaded. It is demo data, not real anatomy: every file says so (a comment in each
PGM header, the marker, the README).

A film (FILM_SIDE square, 8-bit, black background like the digitised MIAS films):
- breast: a half-ellipse against the chest wall (left or right: a woman's films are a pair,
  mdb001 / mdb002), its edge wobbling, darker towards the skin line where the breast is thin;
  the pectoral muscle as a bright band in the upper chest-wall corner (an MLO view);
- tissue: fatty (grey) with fibroglandular (bright) tissue of the woman's density F / G / D,
  strands running from the chest wall to the nipple, fine quantum-like noise;
- a film label: a bright rectangle in the background on some films (the breast mask must
  leave it out, as on the real films);
- lesions, each its own Info.txt row (x, y from the BOTTOM, radius, as MIAS writes them):
  round masses (CIRC; benign with sharp margins, malignant ill-defined and lobulated),
  spiculated masses (SPIC; a dense core with radiating spicules, mostly malignant) and
  micro-calcification clusters (CALC; tiny bright specks, malignant ones more numerous,
  smaller and more varied).

Each film has its own generator seeded by (seed, woman, side): the same config gives
byte-identical files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synthbreast.data.demo import _interp_matrix, _smooth_noise

FILM_SIDE = 1024  # mini-MIAS films are 1024 x 1024
PGM_COMMENT = b"# synthbreast procedural demo data - not a real mammogram\n"
TISSUES = ("F", "G", "D")  # fatty, fatty-glandular, dense-glandular (MIAS's column 2)
DENSITY = {"F": 0.25, "G": 0.45, "D": 0.7}  # share of the breast that is glandular
# film status -> chance; an abnormal film holds 1..MAX_LESIONS lesions of that severity
# (MIAS has more normal films; the demo draws lesions often, so that a dozen women give a test
# pool with every class)
STATUS = (("normal", 0.2), ("benign", 0.4), ("malignant", 0.4))
MAX_LESIONS = 4
KINDS = {  # severity -> (MIAS class, chance)
    "B": (("CIRC", 0.6), ("CALC", 0.25), ("SPIC", 0.15)),
    "M": (("SPIC", 0.5), ("CALC", 0.3), ("CIRC", 0.2)),
}
CLASS_NAMES = ["healthy", "benign", "malignant"]  # what the mias layout's label map gives


@dataclass(frozen=True)
class DemoLesion:
    kind: str  # CIRC | SPIC | CALC
    severity: str  # B | M
    x: int  # from the left
    y: int  # from the top (Info.txt gets FILM_SIDE - y)
    radius: int


def _choose(rng: np.random.Generator, options) -> str:
    names, weights = zip(*options, strict=True)
    return str(rng.choice(names, p=np.asarray(weights) / sum(weights)))


def _breast(rng: np.random.Generator, n: int, right: bool) -> tuple[np.ndarray, np.ndarray]:
    """(soft breast mask 0..1, thickness 0..1) of a half-ellipse on the chest-wall side."""
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    depth = (n - 1 - x) if right else x  # distance from the chest wall
    reach = n * rng.uniform(0.5, 0.68)  # how far the breast extends from the wall
    centre = n * rng.uniform(0.5, 0.6)
    half = n * rng.uniform(0.38, 0.46)  # half-height at the wall
    wobble = 1 + 0.015 * _smooth_noise(rng, n, 3)
    r = np.sqrt((depth / reach) ** 2 + ((y - centre) / half) ** 2) / wobble
    mask = np.clip((1.0 - r) * 40, 0, 1)
    thickness = np.clip((1.0 - r) / 0.3, 0, 1) ** 0.7  # thin at the skin line: darker there
    return mask, thickness


def _streaks(rng: np.random.Generator, n: int, across: int, along: int) -> np.ndarray:
    """Noise with `across` bumps over the height and `along` over the width: streaks that
    run from the chest wall towards the nipple."""
    grid = rng.standard_normal((across + 2, along + 2), dtype=np.float32)
    rows = _interp_matrix(n, across, rng.uniform(0, 1))
    cols = _interp_matrix(n, along, rng.uniform(0, 1))
    return rows @ grid @ cols.T * np.float32(1.6)


def _pectoral(rng: np.random.Generator, n: int, right: bool) -> np.ndarray:
    """The pectoral muscle: a bright wedge from the top of the chest wall (0..1)."""
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    depth = (n - 1 - x) if right else x
    top, down = n * rng.uniform(0.18, 0.3), n * rng.uniform(0.35, 0.55)
    edge = top * (1 - y / down)  # the wedge narrows to nothing at `down`
    return np.clip((edge - depth) / 6, 0, 1)


def _tissue(rng: np.random.Generator, n: int, density: float, right: bool) -> np.ndarray:
    """Fibroglandular tissue 0..1: blobs of the woman's density, denser near the wall, with
    strands stretched along the wall-nipple direction."""
    x = np.mgrid[0:n, 0:n][1].astype(np.float32)
    depth = ((n - 1 - x) if right else x) / n
    blobs = _smooth_noise(rng, n, 6) + 0.6 * _smooth_noise(rng, n, 16)
    blobs += 0.3 * _streaks(rng, n, 40, 5)
    level = np.quantile(blobs, 1 - density)
    glandular = 1 / (1 + np.exp(-(blobs - level) * 1.5))
    # most glandular tissue lies behind the nipple, little at the far skin line
    glandular *= np.clip(1.3 - 1.1 * depth, 0.15, 1)
    strands = _streaks(rng, n, 220, 10) + 0.5 * _streaks(rng, n, 90, 6)
    strands = strands / (strands.std() + 1e-6)
    return np.clip(glandular + 0.05 * strands * (0.3 + glandular), 0, 1.2)


def _mass(rng: np.random.Generator, n: int, lesion: DemoLesion) -> np.ndarray:
    """A round (CIRC) or spiculated (SPIC) mass, 0..1, drawn in a box around it."""
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    dx, dy = x - lesion.x, y - lesion.y
    r, angle = np.hypot(dx, dy), np.arctan2(dy, dx)
    radius = float(lesion.radius)
    if lesion.kind == "SPIC":
        core = radius * 0.45
        body = np.clip((core - r) / 3 + 0.5, 0, 1)
        spicules = np.zeros_like(r)
        for theta in rng.uniform(-math.pi, math.pi, rng.integers(10, 22)):
            length = radius * rng.uniform(0.8, 1.2)
            along = dx * math.cos(theta) + dy * math.sin(theta)
            across = np.abs(-dx * math.sin(theta) + dy * math.cos(theta))
            width = 1.5 * np.clip(1 - along / length, 0, 1) + 0.3
            on = (along > 0) & (along < length)
            spicules = np.maximum(spicules, np.where(on, np.clip(1 - across / width, 0, 1), 0))
        return np.maximum(body, 0.8 * spicules)
    malignant = lesion.severity == "M"
    lobes = 1 + (0.12 if malignant else 0.03) * np.sin(
        rng.integers(3, 6) * angle + rng.uniform(0, 6.3)
    )
    blur = radius * (0.35 if malignant else 0.08) + 1
    return np.clip((radius * lobes - r) / blur + 0.5, 0, 1)


def _calcifications(rng: np.random.Generator, n: int, lesion: DemoLesion) -> np.ndarray:
    """A cluster of tiny bright specks inside the lesion's radius, 0..1."""
    malignant = lesion.severity == "M"
    count = int(rng.integers(14, 30) if malignant else rng.integers(5, 12))
    specks = np.zeros((n, n), dtype=np.float32)
    for _ in range(count):
        rho = lesion.radius * math.sqrt(rng.uniform(0, 1)) * 0.85
        theta = rng.uniform(0, 2 * math.pi)
        cx, cy = lesion.x + rho * math.cos(theta), lesion.y + rho * math.sin(theta)
        size = rng.uniform(0.8, 2.2) if malignant else rng.uniform(1.5, 2.5)
        stretch = rng.uniform(1, 2.5) if malignant else 1.0  # pleomorphic: elongated specks
        x0, y0 = int(cx) - 6, int(cy) - 6
        yy, xx = np.mgrid[y0 : y0 + 13, x0 : x0 + 13].astype(np.float32)
        speck = np.exp(-(((xx - cx) / (size * stretch)) ** 2 + ((yy - cy) / size) ** 2))
        region = specks[max(y0, 0) : y0 + 13, max(x0, 0) : x0 + 13]
        cut = speck[max(-y0, 0) :, max(-x0, 0) :][: region.shape[0], : region.shape[1]]
        np.maximum(region, cut, out=region)
    return specks


def _place_lesions(
    rng: np.random.Generator, mask: np.ndarray, severity: str, count: int
) -> list[DemoLesion]:
    """Lesions inside the breast, each clear of the others and of the skin line."""
    n = mask.shape[0]
    inside = np.argwhere(mask[::8, ::8] > 0.99) * 8
    placed: list[DemoLesion] = []
    for _ in range(count * 50):
        if len(placed) == count or not len(inside):
            break
        kind = _choose(rng, KINDS[severity])
        radius = int(rng.integers(14, 26) if kind == "CALC" else rng.integers(16, 48))
        y, x = (int(v) for v in inside[rng.integers(len(inside))])
        edge = radius * 2 + 8
        if not (edge <= x < n - edge and edge <= y < n - edge):
            continue
        if mask[y - edge : y + edge : 4, x - edge : x + edge : 4].min() < 0.99:
            continue  # keep the whole lesion (and its spicules) inside the breast
        if any(math.hypot(x - p.x, y - p.y) < 2.5 * (radius + p.radius) for p in placed):
            continue
        placed.append(DemoLesion(kind, severity, x, y, radius))
    return placed


def render_film(
    rng: np.random.Generator, tissue: str, status: str, right: bool, n: int = FILM_SIDE
) -> tuple[np.ndarray, list[DemoLesion]]:
    """One film (n x n uint8) of a woman's density `tissue` and its lesions."""
    mask, thickness = _breast(rng, n, right)
    glandular = _tissue(rng, n, DENSITY[tissue], right)
    fat = rng.uniform(0.32, 0.42)
    image = fat + (rng.uniform(0.72, 0.82) - fat) * np.clip(glandular, 0, 1)
    image = image + 0.5 * (0.85 - image) * _pectoral(rng, n, right)
    lesions: list[DemoLesion] = []
    if status != "normal":
        severity = "M" if status == "malignant" else "B"
        count = int(rng.integers(1, MAX_LESIONS + 1))
        lesions = _place_lesions(rng, mask, severity, count)
    for lesion in lesions:
        if lesion.kind == "CALC":
            image = np.maximum(image, 0.97 * _calcifications(rng, n, lesion))
        else:
            brightness = rng.uniform(0.16, 0.26)
            image = image + brightness * _mass(rng, n, lesion)
    image = image * (0.3 + 0.7 * thickness)
    image = image + rng.normal(0, 0.012, (n, n)).astype(np.float32)  # film grain
    image = image * mask + rng.uniform(0.0, 0.03, (n, n)).astype(np.float32) * (1 - mask)
    if rng.uniform() < 0.5:  # a film label in the background, away from the breast
        x0 = 40 if right else n - 140
        image[60:150, x0 : x0 + 90] = rng.uniform(0.8, 0.95)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8), lesions


def pgm_bytes(image: np.ndarray) -> bytes:
    """Binary PGM (P5), as the MIAS files, with a comment that says it is not a mammogram."""
    h, w = image.shape
    return b"P5\n" + PGM_COMMENT + f"{w} {h}\n255\n".encode() + image.tobytes()


def info_rows(ref: str, tissue: str, lesions: list[DemoLesion], n: int = FILM_SIDE) -> list[str]:
    """Info.txt rows of one film, in the set's format (y counted from the bottom)."""
    if not lesions:
        return [f"{ref} {tissue} NORM "]
    return [
        f"{ref} {tissue} {les.kind} {les.severity} {les.x} {n - les.y} {les.radius}"
        for les in lesions
    ]


def write_women(folder: Path, women: int, seed: int, on_progress=None) -> dict[str, int]:
    """Films mdb001.. of `women` women (two each: left, right) and Info.txt into folder.
    Returns the count of films by status and of lesions by severity."""
    rows: list[str] = []
    counts = {"films": 0, "normal": 0, "benign": 0, "malignant": 0, "lesions_B": 0, "lesions_M": 0}
    for woman in range(women):
        tissue = TISSUES[int(np.random.default_rng([seed, woman, 0]).integers(3))]
        for side in (0, 1):  # mdb001 left, mdb002 right: one woman's pair
            rng = np.random.default_rng([seed, woman, side, 1])
            status = _choose(rng, STATUS)
            image, lesions = render_film(rng, tissue, status, right=bool(side))
            if status != "normal" and not lesions:
                status = "normal"  # no room found: a normal film, and said so in the table
            ref = f"mdb{2 * woman + side + 1:03d}"
            (folder / f"{ref}.pgm").write_bytes(pgm_bytes(image))
            rows += info_rows(ref, tissue, lesions)
            counts["films"] += 1
            counts[status] += 1
            for lesion in lesions:
                counts[f"lesions_{lesion.severity}"] += 1
            if on_progress is not None:
                on_progress(1)
    (folder / "Info.txt").write_text("\n".join(rows) + "\n", encoding="ascii")
    return counts


def readme(women: int, seed: int, out_name: str) -> str:
    return (
        "PROCEDURAL DEMO DATA - NOT REAL MAMMOGRAMS\n"
        "\n"
        "Every film in this folder was drawn by a program (synthbreast/data/demo_mammo.py)\n"
        "from random numbers. None of it comes from a woman or an X-ray machine. It imitates\n"
        "the layout of the mini-MIAS set (mdbNNN.pgm beside Info.txt: reference, tissue F/G/D,\n"
        "class CIRC/SPIC/CALC/NORM, severity B/M, x, y from the bottom, radius) so that the\n"
        "synthbreast mammography chain can be demonstrated and tested without real data.\n"
        "Do not use it to draw any medical or scientific conclusion.\n"
        "\n"
        "Films come in pairs (mdb001 left, mdb002 right: one woman). Masses are bright discs\n"
        "(benign: sharp; malignant: blurred, lobulated) or spiculated; calcifications are\n"
        "clusters of specks (malignant: more, smaller, elongated).\n"
        "\n"
        f"Made with: synthbreast demo-data {out_name} --format mias --patients {women} "
        f"--seed {seed}\n"
        f"{2 * women} films of {FILM_SIDE} x {FILM_SIDE} px. The same command and seed give "
        "byte-identical files.\n"
    )
