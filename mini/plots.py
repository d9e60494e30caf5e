"""Small PNG charts drawn with PIL, so the miniature's figures need no plotting package: line charts (the
reward curves of Figure 5, a scorer's training curve) and overlaid histograms (Figure 2(b)'s η)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = (640, 400)
MARGIN = dict(left=70, right=170, top=40, bottom=50)  # the legend sits in the right margin
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]
DASHES = {0: None, 1: 6}  # series k of a colour group: solid, then dashed (a second seed)
# PIL's built-in font has no Greek or maths signs, so labels are spelt out in ASCII.
SPELT_OUT = str.maketrans({"η": "eta", "ω": "w", "⊥": "_perp", "×": "x", "é": "e", "·": "."})


def text(draw: ImageDraw.ImageDraw, xy, label: str, font, **anchor) -> None:
    draw.text(xy, label.translate(SPELT_OUT), fill=(0, 0, 0), font=font, **anchor)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [low, high] (steps of 1, 2 or 5 × a power of ten)."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    return [first + k * step for k in range(int(math.ceil((high - first) / step)) + 1)]


class Axes:
    """A plot area mapping data coordinates to pixels, with its frame, ticks and labels drawn."""

    def __init__(self, draw: ImageDraw.ImageDraw, x_range, y_range, title: str, x_label: str, y_label: str):
        self.draw, self.font = draw, ImageFont.load_default()
        self.x_ticks, self.y_ticks = nice_ticks(*x_range), nice_ticks(*y_range)
        self.x0, self.x1 = self.x_ticks[0], self.x_ticks[-1]
        self.y0, self.y1 = self.y_ticks[0], self.y_ticks[-1]
        self.left, self.top = MARGIN["left"], MARGIN["top"]
        self.right, self.bottom = SIZE[0] - MARGIN["right"], SIZE[1] - MARGIN["bottom"]
        draw.rectangle([self.left, self.top, self.right, self.bottom], outline=(0, 0, 0))
        for x in self.x_ticks:
            px = self.px(x, self.y0)[0]
            draw.line([px, self.bottom, px, self.bottom + 4], fill=(0, 0, 0))
            text(draw, (px, self.bottom + 6), f"{x:g}", self.font, anchor="ma")
        for y in self.y_ticks:
            py = self.px(self.x0, y)[1]
            draw.line([self.left - 4, py, self.right, py], fill=(225, 225, 225))
            text(draw, (self.left - 6, py), f"{y:g}", self.font, anchor="rm")
        text(draw, ((self.left + self.right) / 2, 12), title, self.font, anchor="ma")
        text(draw, ((self.left + self.right) / 2, SIZE[1] - 18), x_label, self.font, anchor="ma")
        text(draw, (8, self.top - 16), y_label, self.font)

    def px(self, x: float, y: float) -> tuple[float, float]:
        fx = (x - self.x0) / (self.x1 - self.x0)
        fy = (y - self.y0) / (self.y1 - self.y0)
        return self.left + fx * (self.right - self.left), self.bottom - fy * (self.bottom - self.top)

    def legend(self, row: int, label: str, colour, dash: int | None) -> None:
        y = self.top + 8 + 16 * row
        self.polyline([(self.right + 10, y), (self.right + 34, y)], colour, dash, in_pixels=True)
        text(self.draw, (self.right + 40, y), label, self.font, anchor="lm")

    def polyline(self, points, colour, dash: int | None, in_pixels: bool = False) -> None:
        pixels = points if in_pixels else [self.px(x, y) for x, y in points]
        if dash is None:
            self.draw.line(pixels, fill=colour, width=2)
            return
        for (ax, ay), (bx, by) in zip(pixels, pixels[1:]):  # dashed: every other piece of each segment
            pieces = max(1, int(math.hypot(bx - ax, by - ay) / dash))
            for k in range(0, pieces, 2):
                t0, t1 = k / pieces, min(1.0, (k + 1) / pieces)
                self.draw.line([(ax + t0 * (bx - ax), ay + t0 * (by - ay)), (ax + t1 * (bx - ax), ay + t1 * (by - ay))],
                               fill=colour, width=2)


def line_chart(series: dict[str, list[tuple[float, float]]], path: Path, title: str, x_label: str,
               y_label: str, groups: dict[str, tuple[int, int]] | None = None) -> None:
    """One line per series (its (x, y) points, drawn in x order, each point marked). ``groups`` maps a
    series to (colour index, dash index), so that e.g. the two seeds of one ω share a colour."""
    points = [p for values in series.values() for p in values]
    xs, ys = [x for x, _ in points], [y for _, y in points]
    image = Image.new("RGB", SIZE, "white")
    axes = Axes(ImageDraw.Draw(image), (min(xs), max(xs)), (min(ys), max(ys)), title, x_label, y_label)
    for row, (label, values) in enumerate(series.items()):
        colour_index, dash_index = (groups or {}).get(label, (row, 0))
        colour, dash = PALETTE[colour_index % len(PALETTE)], DASHES.get(dash_index)
        values = sorted(values)
        if len(values) > 1:
            axes.polyline(values, colour, dash)
        for x, y in values:
            cx, cy = axes.px(x, y)
            axes.draw.ellipse([cx - 2.5, cy - 2.5, cx + 2.5, cy + 2.5], fill=colour)
        axes.legend(row, label, colour, dash)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def histogram_chart(samples: dict[str, np.ndarray], path: Path, title: str, x_label: str, bins: int = 40,
                    value_range: tuple[float, float] = (0.0, 1.0)) -> None:
    """Overlaid step histograms (share of each sample per bin, %) on one shared set of bins."""
    edges = np.linspace(*value_range, bins + 1)
    shares = {label: 100.0 * np.histogram(values, edges)[0] / max(1, len(values)) for label, values in samples.items()}
    image = Image.new("RGB", SIZE, "white")
    top = max(float(s.max()) for s in shares.values())
    axes = Axes(ImageDraw.Draw(image), value_range, (0.0, top), title, x_label, "share of captions (%)")
    for row, (label, share) in enumerate(shares.items()):
        colour = PALETTE[row % len(PALETTE)]
        outline = [(edges[0], 0.0)]
        for k, value in enumerate(share):
            outline += [(edges[k], value), (edges[k + 1], value)]
        axes.polyline(outline + [(edges[-1], 0.0)], colour, None)
        axes.legend(row, label, colour, None)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
