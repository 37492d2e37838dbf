"""A dependency-free loss-curve PNG (matplotlib is not a lowbit dependency): lines on axes, no text.

The numbers behind the picture (and its axis ranges) are in the JSON log written beside it.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189)]


def _png(pixels: list[bytearray], width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + bytes(row) for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def line_plot(series: dict[str, list[tuple[float, float]]], path: str | Path, width: int = 640, height: int = 400) -> dict:
    """Draw each series of (x, y) points as a polyline; returns the axis ranges used (for the log)."""
    points = [p for pts in series.values() for p in pts]
    if not points:
        raise ValueError("nothing to plot")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    margin = 40
    pixels = [bytearray(b"\xff" * (3 * width)) for _ in range(height)]

    def put(px: int, py: int, color) -> None:
        if 0 <= px < width and 0 <= py < height:
            pixels[py][3 * px : 3 * px + 3] = bytes(color)

    def to_px(x: float, y: float) -> tuple[int, int]:
        fx = (x - x0) / (x1 - x0)
        fy = (y - y0) / (y1 - y0)
        return margin + round(fx * (width - 2 * margin)), height - margin - round(fy * (height - 2 * margin))

    def line(a, b, color) -> None:
        (ax, ay), (bx, by) = a, b
        n = max(abs(bx - ax), abs(by - ay), 1)
        for i in range(n + 1):
            cx, cy = round(ax + (bx - ax) * i / n), round(ay + (by - ay) * i / n)
            put(cx, cy, color)
            put(cx, cy + 1, color)

    grey = (200, 200, 200)
    for i in range(1, 5):  # light grid at quarters
        gy = margin + i * (height - 2 * margin) // 4
        gx = margin + i * (width - 2 * margin) // 4
        for px in range(margin, width - margin):
            put(px, gy, grey)
        for py in range(margin, height - margin):
            put(gx, py, grey)
    black = (0, 0, 0)
    line((margin, height - margin), (width - margin, height - margin), black)
    line((margin, margin), (margin, height - margin), black)
    for k, pts in enumerate(series.values()):
        color = COLORS[k % len(COLORS)]
        pix = [to_px(x, y) for x, y in pts]
        for a, b in zip(pix, pix[1:]):
            line(a, b, color)
        if len(pix) == 1:
            put(*pix[0], color)
    Path(path).write_bytes(_png(pixels, width, height))
    return {"x": [x0, x1], "y": [y0, y1], "colors": {name: COLORS[k % len(COLORS)] for k, name in enumerate(series)}}
