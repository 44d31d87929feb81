"""PNG charts for the report, drawn with numpy and Pillow (no Qt, no matplotlib).

PNG rather than SVG so that the same images serve the HTML file (as data URIs) and the PDF
(Qt's rich-text engine draws images but not inline SVG).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_SIZE = 13
NAN_GREY = (205, 205, 205)
SERIES = ((31, 111, 235), (220, 90, 40), (40, 150, 70), (150, 60, 170))


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def drop_color(value: float, vmax: float) -> tuple[int, int, int]:
    """White (no drop) to dark red (the largest drop); grey where not measured."""
    if not math.isfinite(value):
        return NAN_GREY
    t = min(max(value / vmax, 0.0), 1.0) if vmax > 0 else 0.0
    return (int(255 - 75 * t), int(255 - 235 * t), int(255 - 225 * t))


def heatmap_png(names: Sequence[str], ratios: Sequence[float], grid: np.ndarray) -> bytes:
    """Layers (rows) x ratios (columns) coloured by the drop, with the value in each cell."""
    font, small = _font(), _font(11)
    cell_w, cell_h = 58, 20
    label_w = min(340, 12 + max((int(font.getlength(n)) for n in names), default=40))
    top, legend = 28, 34
    width = label_w + cell_w * len(ratios) + 10
    height = top + cell_h * len(names) + legend
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    finite = grid[np.isfinite(grid)]
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    for j, ratio in enumerate(ratios):
        draw.text((label_w + j * cell_w + 8, 6), f"{ratio:.0%}", fill="black", font=font)
    for i, name in enumerate(names):
        y = top + i * cell_h
        text = name if font.getlength(name) < label_w - 8 else "…" + name[-40:]
        draw.text((4, y + 3), text, fill="black", font=font)
        for j in range(len(ratios)):
            value = float(grid[i, j])
            x = label_w + j * cell_w
            color = drop_color(value, vmax)
            draw.rectangle((x, y, x + cell_w - 2, y + cell_h - 2), fill=color)
            if math.isfinite(value):
                ink = "white" if sum(color) < 420 else "black"
                draw.text((x + 6, y + 4), f"{value:+.3f}", fill=ink, font=small)
    y = top + cell_h * len(names) + 10
    for k in range(100):
        x = label_w + k * 2
        draw.rectangle((x, y, x + 2, y + 12), fill=drop_color(k / 99 * vmax, vmax))
    draw.text((label_w + 210, y - 1), f"drop 0 … {vmax:.3f}; grey: not measured", fill="black",
              font=small)  # fmt: skip
    return _png(image)


def curves_png(
    title: str, series: Sequence[tuple[str, Sequence[float], Sequence[float]]], x_label: str
) -> bytes:
    """Line chart of ``(label, xs, ys)`` series on shared axes, with a legend."""
    font = _font()
    width, height = 460, 260
    left, right, top, bottom = 58, 12, 28, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 6), title, fill="black", font=font)
    xs_all = [float(v) for _l, xs, _y in series for v in xs]
    ys_all = [float(v) for _l, _x, ys in series for v in ys if math.isfinite(float(v))]
    if not xs_all or not ys_all:
        draw.text((left, height // 2), "no data", fill="black", font=font)
        return _png(image)
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = min(ys_all), max(ys_all)
    if x1 <= x0:
        x1 = x0 + 1.0
    if y1 <= y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    plot_w, plot_h = width - left - right, height - top - bottom

    def to_px(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * plot_w, top + (1 - (y - y0) / (y1 - y0)) * plot_h

    draw.rectangle((left, top, left + plot_w, top + plot_h), outline=(120, 120, 120))
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        _, py = to_px(x0, yv)
        draw.line((left, py, left + plot_w, py), fill=(232, 232, 232))
        draw.text((4, py - 7), f"{yv:.3g}", fill="black", font=font)
    for k in range(5):
        xv = x0 + (x1 - x0) * k / 4
        px, _ = to_px(xv, y0)
        draw.text((px - 8, top + plot_h + 4), f"{xv:.3g}", fill="black", font=font)
    draw.text((left + plot_w // 2 - 20, height - 18), x_label, fill="black", font=font)
    for k, (label, xs, ys) in enumerate(series):
        color = SERIES[k % len(SERIES)]
        points = [to_px(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(float(y))]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for px, py in points if len(points) <= 40 else ():
            draw.ellipse((px - 2.5, py - 2.5, px + 2.5, py + 2.5), fill=color)
        lx = left + plot_w - 150
        ly = top + 6 + 16 * k
        draw.line((lx, ly + 7, lx + 18, ly + 7), fill=color, width=3)
        draw.text((lx + 24, ly), label, fill="black", font=font)
    return _png(image)
