"""Image grids: the one picture format every stage writes (inspect, GAN snapshots, reports)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from synthbreast.fileio import atomic_write_bytes

# Grey modes PIL gives 16-bit images (and "I", 32-bit integers, as older PIL read 16-bit PNG).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grey -> 8-bit 'L' over the full range (value / 257, rounded); other modes as is.

    PIL's own convert("L"/"RGB") clips 16-bit values at 255, so a 16-bit patch comes out white.
    16-bit RGB(A) and grey+alpha PNGs need nothing: PIL already reads them as 8-bit RGB(A).
    """
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    values = np.asarray(image, dtype=np.float64)  # big-endian I;16B comes out as numbers too
    return Image.fromarray(np.clip(np.rint(values / 257), 0, 255).astype(np.uint8))


def make_grid(
    images: Sequence[np.ndarray | Image.Image],
    columns: int | None = None,
    pad: int = 2,
    title: str | None = None,
    scale: int = 1,
) -> Image.Image:
    """Tile HxWx3 or grey (HxW, HxWx1) uint8 images (or PIL images) into one RGB image, white
    gaps between them; grey tiles are shown grey."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    tiles = [
        img if isinstance(img, Image.Image) else Image.fromarray(_plane(img)) for img in images
    ]
    tiles = [to_8bit(t).convert("RGB") for t in tiles]
    if scale != 1:
        tiles = [t.resize((t.width * scale, t.height * scale), Image.NEAREST) for t in tiles]
    width = max(t.width for t in tiles)
    height = max(t.height for t in tiles)
    columns = columns or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    top = 14 if title else 0
    grid = Image.new(
        "RGB", (columns * (width + pad) + pad, rows * (height + pad) + pad + top), "white"
    )
    for i, tile in enumerate(tiles):
        row, col = divmod(i, columns)
        grid.paste(tile, (pad + col * (width + pad), top + pad + row * (height + pad)))
    if title:
        ImageDraw.Draw(grid).text((pad, 1), title, fill=(0, 0, 0))
    return grid


def _plane(pixels: np.ndarray) -> np.ndarray:
    """HxWx1 -> HxW (PIL reads a grey image as 2-D); others as they are."""
    return pixels[..., 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels


def save_png(image: Image.Image, path: Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())
