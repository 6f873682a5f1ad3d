"""Draw packaging/icon.png: the bundle's icon, a white speech waveform on a rounded indigo-to-teal square.

    python packaging/make_icon.py [OUT.png]

512 x 512 RGBA, the size the MCP Bundle validator recommends for Claude Desktop. Every shape is drawn from its
signed distance field, so the edges are anti-aliased without supersampling; the PNG is written with zlib and
struct only, and the same code always writes the same bytes (tests compare the committed file with a fresh one).
"""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

import numpy as np

SIZE = 512
CORNER = 112  # radius of the background square's corners
TOP_LEFT = np.array([67, 56, 202], dtype=np.float64)  # indigo
BOTTOM_RIGHT = np.array([13, 148, 136], dtype=np.float64)  # teal
BAR_WIDTH = 36
BAR_PITCH = 52
BAR_HEIGHTS = (112, 208, 316, 388, 316, 208, 112)  # end to end, caps included

OUT = Path(__file__).resolve().with_name("icon.png")


def _coverage(distance: np.ndarray) -> np.ndarray:
    """Pixel coverage from a signed distance in pixels (negative inside): a one-pixel linear ramp at the edge."""
    return np.clip(0.5 - distance, 0.0, 1.0)


def _rounded_square(x: np.ndarray, y: np.ndarray, half: float, radius: float) -> np.ndarray:
    c = SIZE / 2
    qx = np.abs(x - c) - (half - radius)
    qy = np.abs(y - c) - (half - radius)
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    inside = np.minimum(np.maximum(qx, qy), 0.0)
    return outside + inside - radius


def _capsule(x: np.ndarray, y: np.ndarray, cx: float, length: float, radius: float) -> np.ndarray:
    """A vertical bar with round ends, centred on (cx, SIZE/2), `length` long from tip to tip."""
    c = SIZE / 2
    half_segment = max(length / 2 - radius, 0.0)
    dy = np.maximum(np.abs(y - c) - half_segment, 0.0)
    return np.hypot(x - cx, dy) - radius


def draw() -> np.ndarray:
    """The icon as a (SIZE, SIZE, 4) uint8 RGBA array."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5  # pixel centres
    background = _coverage(_rounded_square(x, y, SIZE / 2, CORNER))
    t = ((x + y) / (2 * SIZE))[..., None]  # diagonal gradient, 0 at the top-left corner
    rgb = TOP_LEFT * (1 - t) + BOTTOM_RIGHT * t
    bars = np.zeros((SIZE, SIZE))
    first = SIZE / 2 - BAR_PITCH * (len(BAR_HEIGHTS) - 1) / 2
    for i, height in enumerate(BAR_HEIGHTS):
        bars = np.maximum(bars, _coverage(_capsule(x, y, first + i * BAR_PITCH, height, BAR_WIDTH / 2)))
    rgb = rgb * (1 - bars[..., None]) + 255.0 * bars[..., None]
    rgba = np.concatenate([rgb, 255.0 * background[..., None]], axis=-1)
    return np.round(rgba).astype(np.uint8)


def png_bytes(rgba: np.ndarray) -> bytes:
    """A minimal PNG (IHDR, one IDAT, IEND) of an 8-bit RGBA image; each row uses filter type 0."""
    height, width, _ = rgba.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + rgba[row].tobytes() for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8 bits, colour type 6 (RGBA)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


def main(argv: list[str]) -> None:
    out = Path(argv[0]) if argv else OUT
    out.write_bytes(png_bytes(draw()))
    sys.stdout.write(f"wrote {out} ({SIZE}x{SIZE})\n")


if __name__ == "__main__":
    main(sys.argv[1:])
