"""Small charts drawn with PIL (no matplotlib): a scatter of named 2-D point groups, and panels of
overlaid histograms. Arrays in, an RGB `PIL.Image` out; save it with synthbreast.images.save_png.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# matplotlib's tab10 colours, so charts look familiar
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
)
INK, GRID, WHITE = (40, 40, 40), (225, 225, 225), (255, 255, 255)


def colour(i: int) -> tuple[int, int, int]:
    return PALETTE[i % len(PALETTE)]


def _label(value: float) -> str:
    return f"{value:.3g}"


class Axes:
    """A plot rectangle inside an image, mapping data coordinates to pixels."""

    def __init__(self, box: tuple[int, int, int, int], x_range, y_range, margin: bool = True):
        self.box = box  # left, top, right, bottom in pixels
        self.x0, self.x1 = _widen(*x_range, margin=margin)
        self.y0, self.y1 = _widen(*y_range, margin=margin)

    def to_pixels(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        left, top, right, bottom = self.box
        px = left + (np.asarray(x, dtype=float) - self.x0) / (self.x1 - self.x0) * (right - left)
        py = bottom - (np.asarray(y, dtype=float) - self.y0) / (self.y1 - self.y0) * (bottom - top)
        return px, py

    def draw_frame(self, draw: ImageDraw.ImageDraw, xlabel: str = "", ylabel: str = "") -> None:
        left, top, right, bottom = self.box
        font = ImageFont.load_default()
        for i in range(5):  # light grid and tick labels at quarters
            fx = self.x0 + (self.x1 - self.x0) * i / 4
            fy = self.y0 + (self.y1 - self.y0) * i / 4
            (px,), (py,) = self.to_pixels([fx], [fy])
            draw.line([(px, top), (px, bottom)], fill=GRID)
            draw.line([(left, py), (right, py)], fill=GRID)
            text = _label(fx)
            width = draw.textlength(text, font=font)
            draw.text((px - width / 2, bottom + 3), text, fill=INK, font=font)
            text = _label(fy)
            width = draw.textlength(text, font=font)
            draw.text((left - width - 4, py - 5), text, fill=INK, font=font)
        draw.rectangle(self.box, outline=INK)
        if xlabel:
            width = draw.textlength(xlabel, font=font)
            draw.text(((left + right) / 2 - width / 2, bottom + 16), xlabel, fill=INK, font=font)
        if ylabel:
            draw.text((4, top - 14), ylabel, fill=INK, font=font)


def _widen(low: float, high: float, margin: bool = True) -> tuple[float, float]:
    """A range with a 4% margin (or none), never empty."""
    low, high = float(low), float(high)
    if not np.isfinite(low) or not np.isfinite(high):
        return 0.0, 1.0
    if high <= low:
        return low - 0.5, high + 0.5
    extra = (high - low) * 0.04 if margin else 0.0
    return low - extra, high + extra


def _legend(draw: ImageDraw.ImageDraw, names: Sequence[str], right: int, top: int) -> None:
    font = ImageFont.load_default()
    width = max(int(draw.textlength(n, font=font)) for n in names) + 22
    x = right - width - 4
    draw.rectangle((x - 2, top + 2, right - 4, top + 6 + 12 * len(names)), fill=WHITE, outline=GRID)
    for i, name in enumerate(names):
        y = top + 5 + 12 * i
        draw.rectangle((x + 2, y + 2, x + 10, y + 10), fill=colour(i))
        draw.text((x + 14, y), name, fill=INK, font=font)


def scatter(
    groups: Mapping[str, np.ndarray],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    size: tuple[int, int] = (640, 480),
    radius: float = 2.0,
) -> Image.Image:
    """Points [N, 2] per group name, each group its own colour, drawn translucent in order."""
    points = [np.asarray(p, dtype=float).reshape(-1, 2) for p in groups.values()]
    everything = np.concatenate(points) if points else np.zeros((0, 2))
    if len(everything):
        x_range, y_range = everything.min(0), everything.max(0)
        axes = Axes((60, 30, size[0] - 15, size[1] - 40), *zip(x_range, y_range, strict=True))
    else:
        axes = Axes((60, 30, size[0] - 15, size[1] - 40), (0, 1), (0, 1))
    image = Image.new("RGBA", size, (*WHITE, 255))
    draw = ImageDraw.Draw(image)
    axes.draw_frame(draw, xlabel, ylabel)
    for i, group in enumerate(points):
        layer = Image.new("RGBA", size, (0, 0, 0, 0))
        layer_draw = ImageDraw.Draw(layer)
        for px, py in zip(*axes.to_pixels(group[:, 0], group[:, 1]), strict=True):
            box = (px - radius, py - radius, px + radius, py + radius)
            layer_draw.ellipse(box, fill=(*colour(i), 150))
        image = Image.alpha_composite(image, layer)
    draw = ImageDraw.Draw(image)
    if groups:
        _legend(draw, list(groups), axes.box[2], axes.box[1])
    draw.text((60, 8), title, fill=INK, font=ImageFont.load_default())
    return image.convert("RGB")


def histogram_panel(
    series: Mapping[str, np.ndarray],
    title: str = "",
    bins: int = 30,
    size: tuple[int, int] = (300, 210),
) -> Image.Image:
    """Overlaid outline histograms on shared bins, each normalised to sum 1 (sets of any size)."""
    values = [np.asarray(v, dtype=float).ravel() for v in series.values()]
    values = [v[np.isfinite(v)] for v in values]
    joined = np.concatenate(values) if values else np.zeros(0)
    low, high = (joined.min(), joined.max()) if len(joined) else (0.0, 1.0)
    edges = np.linspace(*_widen(low, high), bins + 1)
    shares = [np.histogram(v, edges)[0] / max(len(v), 1) for v in values]
    top = max((s.max() for s in shares if len(s)), default=1.0) or 1.0
    box = (50, 24, size[0] - 10, size[1] - 32)
    axes = Axes(box, (edges[0], edges[-1]), (0, top * 1.05), margin=False)
    image = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(image)
    axes.draw_frame(draw)
    for i, share in enumerate(shares):
        xs = np.repeat(edges, 2)[1:-1]
        ys = np.repeat(share, 2)
        px, py = axes.to_pixels(np.r_[edges[0], xs, edges[-1]], np.r_[0, ys, 0])
        draw.line(list(zip(px.tolist(), py.tolist(), strict=True)), fill=colour(i), width=2)
    if series:
        _legend(draw, list(series), axes.box[2], axes.box[1])
    draw.text((50, 6), title, fill=INK, font=ImageFont.load_default())
    return image


def panels(images: Sequence[Image.Image], columns: int = 3, title: str = "") -> Image.Image:
    """Charts side by side in rows of `columns`, with an optional title above."""
    width = max(i.width for i in images)
    height = max(i.height for i in images)
    rows = -(-len(images) // columns)
    head = 20 if title else 0
    sheet = Image.new("RGB", (width * min(columns, len(images)), height * rows + head), WHITE)
    for k, chart in enumerate(images):
        row, col = divmod(k, columns)
        sheet.paste(chart, (col * width, head + row * height))
    if title:
        ImageDraw.Draw(sheet).text((8, 4), title, fill=INK, font=ImageFont.load_default())
    return sheet
