"""A tiny SVG line plot (axes, ticks, legend, colours) for ROC and loss curves; no matplotlib.

The output is a standalone, well-formed XML document without an XML declaration, so the same
string can be written to a .svg file and pasted inline into HTML.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

# Tableau 10: distinguishable, and the usual colours of scientific plots.
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


@dataclass
class Series:
    """One line: its legend label, points, and optional colour and dash pattern."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    colour: str | None = None
    dash: str | None = None  # an SVG stroke-dasharray, e.g. "4 3"


def nice_ticks(low: float, high: float, target: int = 5) -> list[float]:
    """About `target` round tick values (1, 2 or 5 times a power of ten) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    raw = (high - low) / max(target, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9)
    last = math.floor(high / step + 1e-9)
    # multiples of step, not a running sum, so 0.1 + 0.2 drift never shows in a label
    return [round(i * step, 12) for i in range(first, last + 1)]


def _format_tick(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.0e}"
    return f"{value:.6g}"


def _limits(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    low, high = min(finite), max(finite)
    if low == high:
        return low - 1.0, high + 1.0
    margin = (high - low) * 0.05
    return low - margin, high + margin


def decimate(x: Sequence[float], y: Sequence[float], max_points: int) -> tuple[list, list]:
    """Every k-th point, keeping the last, so a 20,000-point ROC curve stays a small file."""
    n = min(len(x), len(y))
    if n <= max_points:
        return list(x[:n]), list(y[:n])
    k = math.ceil(n / max_points)
    keep = list(range(0, n, k))
    if keep[-1] != n - 1:
        keep.append(n - 1)
    return [x[i] for i in keep], [y[i] for i in keep]


def _along(pixels: list[tuple[float, float]], per_segment: int = 8) -> list[tuple[float, float]]:
    """Points along a polyline, so a segment crossing a region counts, not only its ends."""
    out = list(pixels[:1])
    for (a, b), (c, d) in itertools.pairwise(pixels):
        for t in range(1, per_segment + 1):
            out.append((a + (c - a) * t / per_segment, b + (d - b) * t / per_segment))
    return out


def line_plot(
    series: Sequence[Series],
    title: str,
    xlabel: str,
    ylabel: str,
    xlim: tuple[float, float] | None = None,
    ylim: tuple[float, float] | None = None,
    diagonal: bool = False,
    width: int = 560,
    height: int = 420,
    max_points: int = 600,
) -> str:
    """An SVG document of line plots sharing one pair of axes.

    `diagonal` draws the y = x chance line of a ROC plot. Non-finite points are left out.
    """
    left, right, top, bottom = 64, 16, 34, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [float(v) for s in series for v in s.x]
    ys = [float(v) for s in series for v in s.y]
    x0, x1 = xlim or _limits(xs)
    y0, y1 = ylim or _limits(ys)

    def px(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * plot_w

    def py(v: float) -> float:
        return top + (1 - (v - y0) / (y1 - y0)) * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f"<title>{escape(title)}</title>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2:.1f}" y="20" text-anchor="middle" font-size="14" '
        f'font-weight="bold">{escape(title)}</text>',
    ]
    # grid and ticks
    for tick in nice_ticks(x0, x1):
        if x0 <= tick <= x1:
            x = px(tick)
            out.append(
                f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" stroke="#e5e5e5"/>'
            )
            out.append(
                f'<text x="{x:.1f}" y="{top + plot_h + 15}" text-anchor="middle">'
                f"{_format_tick(tick)}</text>"
            )
    for tick in nice_ticks(y0, y1):
        if y0 <= tick <= y1:
            y = py(tick)
            out.append(
                f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" '
                'stroke="#e5e5e5"/>'
            )
            out.append(
                f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">'
                f"{_format_tick(tick)}</text>"
            )
    out.append(
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>'
    )
    out.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 12}" text-anchor="middle">'
        f"{escape(xlabel)}</text>"
    )
    out.append(
        f'<text x="16" y="{top + plot_h / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 16 {top + plot_h / 2:.1f})">{escape(ylabel)}</text>'
    )
    if diagonal:
        lo, hi = max(x0, y0), min(x1, y1)
        out.append(
            f'<line x1="{px(lo):.1f}" y1="{py(lo):.1f}" x2="{px(hi):.1f}" y2="{py(hi):.1f}" '
            'stroke="#999" stroke-dasharray="4 4"/>'
        )

    # the lines, clipped to the plot area
    # a stable id, unique per plot, since several plots share one HTML page
    key = "|".join([title, str(width), str(height), *(s.label for s in series)])
    clip = "clip-" + hashlib.sha256(key.encode()).hexdigest()[:10]
    out.append(
        f'<clipPath id="{clip}"><rect x="{left}" y="{top}" width="{plot_w}" '
        f'height="{plot_h}"/></clipPath>'
    )
    legend = []
    drawn: list[tuple[float, float]] = []  # pixel points along every line, to place the legend
    for i, s in enumerate(series):
        colour = s.colour or PALETTE[i % len(PALETTE)]
        x, y = decimate([float(v) for v in s.x], [float(v) for v in s.y], max_points)
        points = [(a, b) for a, b in zip(x, y, strict=True) if math.isfinite(a + b)]
        if points:
            pixels = [(px(a), py(b)) for a, b in points]
            drawn += _along(pixels)
            coords = " ".join(f"{a:.1f},{b:.1f}" for a, b in pixels)
            dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
            out.append(
                f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.8"'
                f'{dash} clip-path="url(#{clip})"/>'
            )
        legend.append((s.label, colour, s.dash))

    # legend: the inside corner that hides the least of the lines (ties: bottom right)
    if legend:
        row_h = 16
        box_w = min(plot_w - 10, 26 + 6.5 * max(len(label) for label, _, _ in legend))
        box_h = row_h * len(legend) + 8
        corners = [
            (left + plot_w - box_w - 6, top + plot_h - box_h - 6),
            (left + plot_w - box_w - 6, top + 6),
            (left + 6, top + 6),
            (left + 6, top + plot_h - box_h - 6),
        ]

        def hidden(corner: tuple[float, float]) -> int:
            cx, cy = corner
            return sum(cx <= a <= cx + box_w and cy <= b <= cy + box_h for a, b in drawn)

        bx, by = min(corners, key=hidden)
        out.append(
            f'<rect x="{bx:.1f}" y="{by:.1f}" width="{box_w:.1f}" height="{box_h}" '
            'fill="white" fill-opacity="0.85" stroke="#bbb"/>'
        )
        for i, (label, colour, dash) in enumerate(legend):
            y = by + 12 + i * row_h
            dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
            out.append(
                f'<line x1="{bx + 6:.1f}" y1="{y:.1f}" x2="{bx + 22:.1f}" y2="{y:.1f}" '
                f'stroke="{colour}" stroke-width="2"{dash_attr}/>'
            )
            out.append(f'<text x="{bx + 26:.1f}" y="{y + 4:.1f}">{escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
