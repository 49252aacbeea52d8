"""QA pictures: three orthogonal planes of a volume with the mask outline and a region's box.

Pure numpy: planes are laid out in the radiological display convention (sagittal: anterior left, superior
up; coronal and axial: patient right on the left; axial: anterior up), scaled to square millimetres, with
label outlines (the chosen region in yellow, other labels dimmer) and the region's box in red. A small
bitmap font titles each panel. ``write_png`` writes 8-bit RGB PNG with zlib only.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from kneeprep.files import write_bytes
from kneeprep.geometry import Geometry

# 5x7 bitmap font: 7 rows of 5 bits per glyph. Lower case is drawn as upper case.
_GLYPHS = {
    "A": "0E 11 11 1F 11 11 11",
    "B": "1E 11 11 1E 11 11 1E",
    "C": "0E 11 10 10 10 11 0E",
    "D": "1E 11 11 11 11 11 1E",
    "E": "1F 10 10 1E 10 10 1F",
    "F": "1F 10 10 1E 10 10 10",
    "G": "0E 11 10 17 11 11 0F",
    "H": "11 11 11 1F 11 11 11",
    "I": "0E 04 04 04 04 04 0E",
    "J": "07 02 02 02 02 12 0C",
    "K": "11 12 14 18 14 12 11",
    "L": "10 10 10 10 10 10 1F",
    "M": "11 1B 15 15 11 11 11",
    "N": "11 11 19 15 13 11 11",
    "O": "0E 11 11 11 11 11 0E",
    "P": "1E 11 11 1E 10 10 10",
    "Q": "0E 11 11 11 15 12 0D",
    "R": "1E 11 11 1E 14 12 11",
    "S": "0F 10 10 0E 01 01 1E",
    "T": "1F 04 04 04 04 04 04",
    "U": "11 11 11 11 11 11 0E",
    "V": "11 11 11 11 11 0A 04",
    "W": "11 11 11 15 15 15 0A",
    "X": "11 11 0A 04 0A 11 11",
    "Y": "11 11 11 0A 04 04 04",
    "Z": "1F 01 02 04 08 10 1F",
    "0": "0E 11 13 15 19 11 0E",
    "1": "04 0C 04 04 04 04 0E",
    "2": "0E 11 01 02 04 08 1F",
    "3": "1F 02 04 02 01 11 0E",
    "4": "02 06 0A 12 1F 02 02",
    "5": "1F 10 1E 01 01 11 0E",
    "6": "06 08 10 1E 11 11 0E",
    "7": "1F 01 02 04 08 08 08",
    "8": "0E 11 11 0E 11 11 0E",
    "9": "0E 11 11 0F 01 02 0C",
    " ": "00 00 00 00 00 00 00",
    "-": "00 00 00 1F 00 00 00",
    "_": "00 00 00 00 00 00 1F",
    ".": "00 00 00 00 00 0C 0C",
    ":": "00 0C 0C 00 0C 0C 00",
    "/": "01 02 02 04 08 08 10",
    "(": "02 04 08 08 08 04 02",
    ")": "08 04 02 02 02 04 08",
    ",": "00 00 00 00 0C 04 08",
    "=": "00 00 1F 00 1F 00 00",
    "[": "0E 08 08 08 08 08 0E",
    "]": "0E 02 02 02 02 02 0E",
    "%": "18 19 02 04 08 13 03",
    "+": "00 04 04 1F 04 04 00",
    "?": "0E 11 01 02 04 00 04",
}
_FONT = {
    ch: np.array([[(int(row, 16) >> (4 - b)) & 1 for b in range(5)] for row in rows.split()], dtype=bool)
    for ch, rows in _GLYPHS.items()
}

YELLOW = (255, 220, 0)
RED = (255, 40, 40)
WHITE = (235, 235, 235)
_PALETTE = np.array(
    [(80, 160, 255), (90, 220, 120), (220, 120, 255), (255, 150, 80), (80, 220, 220), (200, 200, 90)],
    dtype=np.uint8,
)


def draw_text(rgb: np.ndarray, text: str, row: int, col: int, color=WHITE, scale: int = 2) -> None:
    """Draw ``text`` into ``rgb`` (in place) with its top-left corner at (row, col); clipped at the edges."""
    for ch in text.upper():
        glyph = _FONT.get(ch, _FONT["?"])
        big = np.kron(glyph, np.ones((scale, scale), dtype=bool))
        h, w = big.shape
        r1, c1 = min(row + h, rgb.shape[0]), min(col + w, rgb.shape[1])
        if r1 > row and c1 > col:
            rgb[row:r1, col:c1][big[: r1 - row, : c1 - col]] = color
        col += w + scale


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an ``(h, w, 3)`` uint8 array as an 8-bit RGB PNG (atomically)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[r].tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )
    return write_bytes(path, png)


def _outline(mask2d: np.ndarray) -> np.ndarray:
    """Pixels of ``mask2d`` with a 4-neighbour outside it."""
    m = mask2d
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def _plane_kind(geometry: Geometry, axis: int) -> str:
    """The anatomical plane shown by slicing along array ``axis``."""
    d = np.abs(geometry.affine_lps[:3, axis])
    return ("sagittal", "coronal", "axial")[int(np.argmax(d))]


def _display_transform(geometry: Geometry, axes: tuple[int, int], kind: str):
    """How to flip/transpose a plane with array axes ``axes`` into display order, and its pixel sizes."""
    a = geometry.affine_lps[:3, :3]
    dirs = [a[:, ax] / np.linalg.norm(a[:, ax]) for ax in axes]
    # vertical screen axis: superior-inferior for sagittal/coronal, anterior-posterior for axial
    world_vertical = 1 if kind == "axial" else 2
    v = int(np.argmax([abs(d[world_vertical]) for d in dirs]))
    h = 1 - v
    # down the screen: toward Inferior (-z) or, for axial, Posterior (+y)
    flip_v = dirs[v][world_vertical] > 0 if world_vertical == 2 else dirs[v][world_vertical] < 0
    # right on the screen: Posterior (+y) for sagittal, patient Left (+x) otherwise
    world_h = 1 if kind == "sagittal" else 0
    flip_h = dirs[h][world_h] < 0
    sizes = (geometry.spacing[axes[v]], geometry.spacing[axes[h]])
    return v, flip_v, flip_h, sizes


def render_planes(
    image: np.ndarray,
    geometry: Geometry,
    labels: np.ndarray | None = None,
    region_ids: tuple[int, ...] = (),
    box: tuple[int, int, int, int, int, int] | None = None,
    center: tuple[int, int, int] | None = None,
    title: str = "",
    panel_px: int = 320,
) -> np.ndarray:
    """Render three planes through ``center`` (default: the box centre, else the middle) as one RGB image."""
    if center is None:
        if box is not None:
            center = tuple((box[i] + box[i + 3] - 1) // 2 for i in range(3))
        else:
            center = tuple(s // 2 for s in image.shape)
    finite = image[np.isfinite(image)] if image.dtype.kind == "f" else image
    lo, hi = np.percentile(finite, [1, 99.5]) if finite.size else (0, 1)
    hi = hi if hi > lo else lo + 1
    panels = []
    for axis in range(3):
        sl = [slice(None)] * 3
        sl[axis] = center[axis]
        plane = image[tuple(sl)].astype(np.float32)
        gray = np.clip((plane - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8)
        rgb = np.repeat(gray[..., None], 3, axis=2)
        if labels is not None:
            lab = labels[tuple(sl)]
            for lid in np.unique(lab):
                if lid == 0:
                    continue
                edge = _outline(lab == lid)
                rgb[edge] = YELLOW if int(lid) in region_ids else _PALETTE[int(lid) % len(_PALETTE)] // 2 + 60
        others = [a for a in range(3) if a != axis]
        if box is not None and box[axis] <= center[axis] < box[axis + 3]:
            r0, r1 = box[others[0]], box[others[0] + 3] - 1
            c0, c1 = box[others[1]], box[others[1] + 3] - 1
            rgb[r0 : r1 + 1, [c0, c1]] = RED
            rgb[[r0, r1], c0 : c1 + 1] = RED
        kind = _plane_kind(geometry, axis)
        v, flip_v, flip_h, (pv, ph) = _display_transform(geometry, tuple(others), kind)
        if v == 1:
            rgb = rgb.transpose(1, 0, 2)
        if flip_v:
            rgb = rgb[::-1]
        if flip_h:
            rgb = rgb[:, ::-1]
        # nearest-neighbour scaling to square mm, fitting panel_px
        hmm, wmm = rgb.shape[0] * pv, rgb.shape[1] * ph
        scale = panel_px / max(hmm, wmm)
        out_h, out_w = max(1, round(hmm * scale)), max(1, round(wmm * scale))
        rows = np.minimum((np.arange(out_h) / scale / pv).astype(int), rgb.shape[0] - 1)
        cols = np.minimum((np.arange(out_w) / scale / ph).astype(int), rgb.shape[1] - 1)
        canvas = np.zeros((panel_px + 24, panel_px, 3), dtype=np.uint8)
        canvas[24 : 24 + out_h, :out_w] = rgb[rows][:, cols]
        draw_text(canvas, f"{kind} axis {axis} = {center[axis]}", 5, 4)
        panels.append(canvas)
    gap = np.zeros((panels[0].shape[0], 8, 3), dtype=np.uint8)
    body = np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)
    header = np.zeros((30, body.shape[1], 3), dtype=np.uint8)
    draw_text(header, title, 8, 4, color=YELLOW if region_ids else WHITE)
    return np.concatenate([header, body], axis=0)
