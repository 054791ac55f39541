"""An embedded, procedurally generated domain-shift benchmark for UDA segmentation.

Street-like scenes labelled in the Cityscapes 19-class trainId space, in three domains:

* ``source`` -- "synthetic looking": flat shading, clean (aliased) edges, saturated palette.
* ``real`` -- textured with the photographs scikit-image ships (brick, grass, gravel, moon,
  camera, coffee, chelsea, rocket, astronaut), other illumination, colour cast, sensor noise
  and blur.
* ``night`` -- the real renderer, but dark and low-contrast, lit by street lamps, headlights
  and windows with glare.

Layout statistics shift between domains too (horizon height, object counts and scale, the
mixture of object modes). Every object class comes in at least two visually distinct modes
(sedan/van, round tree/hedge, brick/glass building, slim/coat person, sign shapes) so that
several prototypes per class have something to model.

Everything is deterministic from ``seed``: image ``i`` of ``(domain, split)`` is drawn from its
own ``numpy`` generator seeded with ``(seed, domain, split, i)``. The benchmark is written on
first use into ``<cache_dir>/synthetic-v1-seed<seed>/<domain>/<split>/{images,labels}/<i>.png``
(labels are 8-bit trainId PNGs, 255 = ignore) through a temporary sibling directory
(``.<name>.tmp-<pid>@<host>-*``) that is ``os.replace``d into place only when every file was
written (each write is checked) and counted; the temporary directory of a killed generation
is removed by the next one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from functools import cache
from pathlib import Path

import cv2
import numpy as np

from mpcl.data.base import SegmentationDataset
from mpcl.data.labels import CITYSCAPES, IGNORE_INDEX, colorize
from mpcl.io import atomic_write_bytes, file_lock, host_tag, write_image, writer_is_gone

VERSION = 1
DOMAINS: tuple[str, ...] = ("source", "real", "night")
SPLITS: dict[str, tuple[str, ...]] = {
    "source": ("train",),
    "real": ("train", "val"),
    "night": ("train", "val"),
}
DEFAULT_IMAGE_SIZE: tuple[int, int] = (128, 256)  # (H, W)
DEFAULT_COUNTS: dict[str, int] = {"source_train": 600, "target_train": 600, "target_val": 100}

# trainIds used here (Cityscapes order).
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY = range(11)
PERSON, RIDER, CAR, BICYCLE = 11, 12, 13, 18

# Materials pick the photograph that textures a region in the real/night renderers.
PLAIN, ASPHALT, PAVING, BRICK, GLASS, FOLIAGE, GRASS, SKYTEX, PAINT, CLOTH, CONCRETE = range(11)
NUM_MATERIALS = 11
# material -> (skimage image name, contrast, crop scale range relative to the frame)
_TEXTURES: dict[int, tuple[str, float, tuple[float, float]]] = {
    ASPHALT: ("gravel", 0.3, (2.5, 4.0)),
    PAVING: ("brick", 0.3, (1.5, 2.5)),
    BRICK: ("brick", 0.55, (0.8, 1.4)),
    GLASS: ("astronaut", 0.7, (0.6, 1.2)),
    FOLIAGE: ("grass", 0.8, (0.6, 1.2)),
    GRASS: ("grass", 0.5, (1.2, 2.0)),
    SKYTEX: ("rocket-sky", 0.5, (0.3, 0.6)),
    PAINT: ("coffee", 0.25, (0.6, 1.2)),
    CLOTH: ("camera", 0.35, (0.5, 1.0)),
    CONCRETE: ("moon", 0.5, (0.8, 1.5)),
}
_GLASS_ALTERNATIVES = ("astronaut", "rocket", "coffee", "chelsea")

# Per-domain layout statistics: ranges are (low, high) for uniform draws.
LAYOUTS: dict[str, dict] = {
    "source": dict(
        horizon=(0.34, 0.44), road=(0.45, 0.65), sidewalk=(0.18, 0.32), cars=(1, 4),
        persons=(0, 4), riders=(0, 1), trees=(1, 4), poles=(1, 3), scale=1.15,
        van_p=0.5, glass_p=0.5, hedge_p=0.35, coat_p=0.5, fence_p=0.35, wall_p=0.35,
        gap_p=0.15,
    ),
    "real": dict(
        horizon=(0.44, 0.54), road=(0.55, 0.8), sidewalk=(0.12, 0.25), cars=(2, 7),
        persons=(1, 6), riders=(0, 2), trees=(0, 3), poles=(2, 4), scale=0.85,
        van_p=0.3, glass_p=0.3, hedge_p=0.6, coat_p=0.3, fence_p=0.5, wall_p=0.2,
        gap_p=0.3,
    ),
    "night": dict(
        horizon=(0.40, 0.50), road=(0.5, 0.75), sidewalk=(0.12, 0.28), cars=(1, 5),
        persons=(0, 3), riders=(0, 1), trees=(0, 3), poles=(2, 5), scale=1.0,
        van_p=0.4, glass_p=0.65, hedge_p=0.5, coat_p=0.6, fence_p=0.3, wall_p=0.4,
        gap_p=0.2,
    ),
}  # fmt: skip

# Base colours (RGB) per domain. The real/night renderers texture them.
_SEDAN_COLOURS = {
    "source": [(200, 30, 30), (30, 70, 200), (20, 150, 60)],
    "real": [(120, 20, 25), (25, 45, 110), (40, 40, 45), (90, 95, 100)],
}
_VAN_COLOURS = {
    "source": [(240, 240, 235), (240, 230, 170), (225, 235, 245)],
    "real": [(215, 215, 210), (200, 195, 170), (180, 185, 190)],
}
_PALETTES = {
    "source": dict(
        sky=(120, 185, 245),
        road=(80, 80, 90),
        sidewalk=(215, 165, 180),
        terrain=(150, 190, 60),
        brick=(185, 80, 55),
        glass=(80, 150, 215),
        window=(40, 40, 70),
        wall=(190, 190, 170),
        fence=(150, 110, 60),
        pole=(60, 60, 70),
        tree=(40, 170, 40),
        hedge=(20, 110, 60),
        trunk=(110, 70, 30),
        marking=(250, 250, 250),
    ),
    "real": dict(
        sky=(170, 195, 215),
        road=(105, 100, 100),
        sidewalk=(150, 145, 140),
        terrain=(120, 120, 70),
        brick=(140, 95, 75),
        glass=(120, 135, 150),
        window=(50, 55, 60),
        wall=(150, 148, 140),
        fence=(95, 90, 80),
        pole=(80, 82, 85),
        tree=(70, 105, 50),
        hedge=(45, 80, 40),
        trunk=(80, 65, 50),
        marking=(200, 200, 190),
    ),
}
_SKIN = [(235, 190, 160), (160, 110, 80), (90, 60, 45)]
_SLIM_CLOTHES = [(40, 40, 60), (30, 30, 30), (70, 70, 80)]  # dark jackets
_SLIM_TROUSERS = [(50, 60, 110), (40, 40, 45)]
_COAT_CLOTHES = [(210, 50, 50), (235, 200, 40), (60, 170, 90), (230, 120, 30)]  # bright coats


class _Canvas:
    """Label, base colour and material maps drawn together.

    label: (H, W) uint8 trainIds; color: (H, W, 3) uint8 RGB; material: (H, W) uint8;
    emissive: (H, W, 3) float32 RGB light sources (only rendered at night).
    """

    def __init__(self, height: int, width: int) -> None:
        self.h, self.w = height, width
        self.label = np.full((height, width), IGNORE_INDEX, np.uint8)
        self.color = np.zeros((height, width, 3), np.uint8)
        self.material = np.zeros((height, width), np.uint8)
        self.emissive = np.zeros((height, width, 3), np.float32)
        self.lamps: list[tuple[int, int, float]] = []  # (x, y, radius) light pools at night

    def poly(self, pts, cls: int, color, mat: int = PLAIN) -> None:
        p = [np.round(np.asarray(pts, np.float64)).astype(np.int32)]
        cv2.fillPoly(self.label, p, int(cls))
        cv2.fillPoly(self.color, p, tuple(int(c) for c in color))
        cv2.fillPoly(self.material, p, int(mat))

    def polys(self, pts: np.ndarray, cls: int, color, mat: int = PLAIN) -> None:
        """Fill many polygons at once: pts (N, K, 2)."""
        if len(pts) == 0:
            return
        p = list(np.round(pts).astype(np.int32))
        cv2.fillPoly(self.label, p, int(cls))
        cv2.fillPoly(self.color, p, tuple(int(c) for c in color))
        cv2.fillPoly(self.material, p, int(mat))

    def rect(self, x0, y0, x1, y1, cls: int, color, mat: int = PLAIN) -> None:
        self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], cls, color, mat)

    def circle(self, x, y, r, cls: int, color, mat: int = PLAIN, thickness: int = -1) -> None:
        c, r, t = (round(x), round(y)), max(1, round(r)), thickness
        cv2.circle(self.label, c, r, int(cls), t)
        cv2.circle(self.color, c, r, tuple(int(v) for v in color), t)
        cv2.circle(self.material, c, r, int(mat), t)

    def line(self, p0, p1, cls: int, color, thickness: int, mat: int = PLAIN) -> None:
        a, b, t = (round(p0[0]), round(p0[1])), (round(p1[0]), round(p1[1])), max(1, thickness)
        cv2.line(self.label, a, b, int(cls), t)
        cv2.line(self.color, a, b, tuple(int(v) for v in color), t)
        cv2.line(self.material, a, b, int(mat), t)

    def light(self, x, y, r, rgb) -> None:
        cv2.circle(
            self.emissive, (round(x), round(y)), max(1, round(r)), tuple(map(float, rgb)), -1
        )


def _jitter(rng: np.random.Generator, rgb, amount: int = 12) -> tuple[int, ...]:
    d = rng.integers(-amount, amount + 1, 3).tolist()
    return tuple(min(255, max(0, int(v) + dv)) for v, dv in zip(rgb, d))


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


class _Scene:
    """Geometry of one street: a road converging to a vanishing point, sidewalks, facades."""

    def __init__(self, rng: np.random.Generator, h: int, w: int, layout: dict) -> None:
        self.h, self.w = h, w
        self.yh = rng.uniform(*layout["horizon"]) * h  # horizon row
        self.vx = w * (0.5 + rng.uniform(-0.12, 0.12))  # vanishing point column
        self.road = rng.uniform(*layout["road"]) * w  # road half-width at the bottom row
        self.side = rng.uniform(*layout["sidewalk"]) * w  # sidewalk width at the bottom row
        self.scale = layout["scale"]

    def y(self, t: float) -> float:
        """Row of ground depth t (0 at the horizon, 1 at the bottom row)."""
        return self.yh + t * (self.h - self.yh)

    def unit(self, t: float) -> float:
        """Pixels per ~4 metres at depth t: the size unit of objects."""
        return t * (self.h - self.yh) * self.scale

    def x(self, t: float, offset: float) -> float:
        """Column at depth t of the line through the vanishing point that is ``offset`` pixels
        (signed) from it at the bottom row; e.g. ``offset=±road`` are the road edges."""
        return self.vx + offset * t

    def outer(self, side: int) -> float:
        return side * (self.road + self.side)


def _draw_background(c: _Canvas, s: _Scene, rng, layout: dict, pal: dict, night: bool) -> None:
    h, w, yh = c.h, c.w, s.yh
    c.rect(-1, -1, w, h, SKY, pal["sky"], SKYTEX)
    c.rect(-1, yh, w, h, TERRAIN, pal["terrain"], GRASS)
    # A distant skyline across the vanishing point.
    x = -5.0
    while x < w:
        bw = rng.uniform(0.04, 0.12) * w
        top = yh - rng.uniform(0.03, 0.14) * h
        glass = rng.random() < layout["glass_p"]
        col = _jitter(rng, pal["glass"] if glass else pal["brick"], 20)
        c.rect(x, top, x + bw, yh + 1, BUILDING, col, GLASS if glass else BRICK)
        x += bw
    for side in (-1, 1):
        _draw_facades(c, s, rng, layout, pal, side, night)


def _facade_quad(s: _Scene, side: int, t0: float, t1: float, height: float):
    """Corners (4, 2) of a vertical facade standing on the outer sidewalk line, t0 < t1."""
    o = s.outer(side)
    pts = []
    for t in (t0, t1, t1, t0):
        pts.append((s.x(t, o), s.y(t)))
    pts[2] = (pts[2][0], s.y(t1) - height * s.unit(t1) / s.scale)
    pts[3] = (pts[3][0], s.y(t0) - height * s.unit(t0) / s.scale)
    return np.array(pts)


def _quad_point(q: np.ndarray, u, v) -> np.ndarray:
    """Points at facade coordinates (u along the street, v up; scalars or arrays of one shape)
    of quad q (4, 2) = (bottom0, bottom1, top1, top0) -> (..., 2)."""
    u, v = np.asarray(u, np.float64)[..., None], np.asarray(v, np.float64)[..., None]
    bottom = q[0] + u * (q[1] - q[0])
    top = q[3] + u * (q[2] - q[3])
    return bottom + v * (top - bottom)


def _draw_facades(c: _Canvas, s: _Scene, rng, layout: dict, pal: dict, side: int, night: bool):
    # Breakpoints equally spaced in 1/t, i.e. in depth along the street.
    t = 0.04
    while t < 2.5:
        t1 = min(t * rng.uniform(1.25, 1.7), 2.6)
        if rng.random() < layout["gap_p"]:  # a gap shows sky/terrain behind
            t = t1
            continue
        height = rng.uniform(1.2, 3.5)
        q = _facade_quad(s, side, t, t1, height)
        tiny = abs(q[1, 0] - q[0, 0]) < 6  # too few pixels for windows to show
        if rng.random() < layout["glass_p"]:  # mode 2: glass tower, mullions and floor lines
            c.poly(q, BUILDING, _jitter(rng, pal["glass"], 20), GLASS)
            thick = max(1, round(0.02 * s.unit(t1)))
            n, floors = int(rng.integers(3, 7)), int(height * 2)
            us, vs = np.arange(1, n) / n, np.arange(1, floors) / floors
            starts = np.concatenate([_quad_point(q, us, 0 * us), _quad_point(q, 0 * vs, vs)])
            ends = np.concatenate([_quad_point(q, us, 1 + 0 * us), _quad_point(q, 1 + 0 * vs, vs)])
            for a, b in zip(starts, ends) if not tiny else ():
                c.line(a, b, BUILDING, pal["window"], thick)
        else:  # mode 1: brick house with a grid of small windows
            c.poly(q, BUILDING, _jitter(rng, pal["brick"], 20), BRICK)
            cols, rows = int(rng.integers(2, 5)), max(2, int(height * 2.5))
            lit = rng.random(cols * (rows - 1)) < (0.3 if night else 0.0)
            if not tiny:
                i, j = np.meshgrid(np.arange(cols), np.arange(1, rows), indexing="ij")
                u0, u1 = (i + 0.25) / cols, (i + 0.7) / cols
                v0, v1 = (j - 0.35) / rows, (j + 0.15) / rows
                us, vs = np.stack([u0, u1, u1, u0], -1), np.stack([v0, v0, v1, v1], -1)
                corners = _quad_point(q, us, vs).reshape(-1, 4, 2)  # (windows, 4, 2)
                c.polys(corners[~lit], BUILDING, pal["window"], GLASS)
                if lit.any():  # lit windows are light sources at night
                    c.polys(corners[lit], BUILDING, (255, 200, 110), PLAIN)
                    cv2.fillPoly(
                        c.emissive, list(np.round(corners[lit]).astype(np.int32)), (255, 190, 100)
                    )
        t = t1


def _draw_ground(c: _Canvas, s: _Scene, rng, layout: dict, pal: dict) -> None:
    h, yh, vx = c.h, s.yh, s.vx
    far = 3.0  # extend polygons beyond the bottom row so they cover it at any slope
    yb = s.y(far)
    c.poly([(vx, yh), (s.x(far, s.road), yb), (s.x(far, -s.road), yb)], ROAD, pal["road"], ASPHALT)
    for side in (-1, 1):
        o = s.outer(side)
        pts = [(vx, yh), (s.x(far, side * s.road), yb), (s.x(far, o), yb)]
        c.poly(pts, SIDEWALK, pal["sidewalk"], PAVING)
    # Dashed centre line (still road).
    for k in range(8):
        t0, t1 = 0.1 * 1.45**k, 0.1 * 1.45**k * 1.2
        if s.y(t0) > h:
            break
        wd = 0.015
        pts = [(s.x(t0, -wd * s.w), s.y(t0)), (s.x(t0, wd * s.w), s.y(t0))]
        pts += [(s.x(t1, wd * s.w), s.y(t1)), (s.x(t1, -wd * s.w), s.y(t1))]
        c.poly(pts, ROAD, pal["marking"], PAINT)
    # Low structures on the outer sidewalk line: fences, walls, hedges (a vegetation mode).
    for side in (-1, 1):
        t = rng.uniform(0.1, 0.4)
        while t < 2.0:
            t1 = t * rng.uniform(1.4, 2.2)
            r = rng.random()
            if r < layout["fence_p"]:
                _draw_fence(c, s, side, t, t1, pal, rng)
            elif r < layout["fence_p"] + layout["wall_p"]:
                q = _facade_quad(s, side, t, t1, rng.uniform(0.2, 0.35))
                c.poly(q, WALL, _jitter(rng, pal["wall"], 10), CONCRETE)
            elif rng.random() < layout["hedge_p"]:
                q = _facade_quad(s, side, t, t1, rng.uniform(0.2, 0.4))
                c.poly(q, VEGETATION, _jitter(rng, pal["hedge"], 10), FOLIAGE)
            t = t1 * rng.uniform(1.0, 1.5)


def _draw_fence(c: _Canvas, s: _Scene, side: int, t0: float, t1: float, pal: dict, rng) -> None:
    q = _facade_quad(s, side, t0, t1, 0.3)
    col = _jitter(rng, pal["fence"], 10)
    thick = max(1, round(0.03 * s.unit(t1)))
    for v in (0.45, 0.95):
        c.line(_quad_point(q, 0, v), _quad_point(q, 1, v), FENCE, col, thick)
    n = int(rng.integers(4, 9))
    for k in range(n + 1):
        c.line(_quad_point(q, k / n, 0), _quad_point(q, k / n, 1), FENCE, col, thick)


def _draw_tree(c: _Canvas, s: _Scene, rng, t: float, side: int, pal: dict) -> None:
    u = s.unit(t)
    x = s.x(t, s.outer(side) - side * 0.2 * s.side)
    y = s.y(t)
    trunk_h = rng.uniform(0.35, 0.6) * u
    c.rect(x - 0.03 * u, y - trunk_h, x + 0.03 * u, y, VEGETATION, pal["trunk"], PLAIN)
    r = rng.uniform(0.22, 0.35) * u
    col = _jitter(rng, pal["tree"], 15)
    for dx, dy, k in ((0, 0, 1.0), (-0.5, 0.3, 0.7), (0.5, 0.3, 0.7)):  # round crown of blobs
        c.circle(x + dx * r, y - trunk_h - r * (0.6 - dy), r * k, VEGETATION, col, FOLIAGE)


def _draw_pole(c: _Canvas, s: _Scene, rng, t: float, side: int, pal: dict, night: bool) -> None:
    u = s.unit(t)
    x = s.x(t, side * (s.road + 0.3 * s.side))
    y = s.y(t)
    ph = rng.uniform(1.0, 1.5) * u
    pw = max(1.0, 0.025 * u)
    c.rect(x - pw, y - ph, x + pw, y, POLE, pal["pole"], PLAIN)
    kind = rng.integers(4)
    if kind == 0:  # street lamp: an arm over the road and a lamp head (pole class)
        xe = x - side * 0.3 * u
        c.line((x, y - ph), (xe, y - ph - 0.05 * u), POLE, pal["pole"], round(pw))
        c.rect(
            xe - 0.06 * u, y - ph - 0.07 * u, xe + 0.06 * u, y - ph - 0.02 * u, POLE, pal["pole"]
        )
        c.lamps.append((round(xe), round(y - ph), 0.9 * u))
        if night:
            c.light(xe, y - ph - 0.02 * u, 0.05 * u, (255, 220, 160))
    elif kind == 1:  # traffic light box with three lamps
        bw, bh = 0.09 * u, 0.25 * u
        top = y - ph
        c.rect(x - bw, top, x + bw, top + bh, LIGHT, (25, 25, 25))
        on = int(rng.integers(3))
        for k, col in enumerate(((230, 30, 30), (240, 180, 20), (30, 200, 60))):
            lit = k == on
            cc = col if lit else tuple(v // 4 for v in col)
            c.circle(x, top + bh * (k + 0.5) / 3, 0.055 * u, LIGHT, cc)
            if lit and night:
                c.light(x, top + bh * (k + 0.5) / 3, 0.055 * u, col)
    else:  # traffic signs, two shape/colour modes
        r = 0.12 * u
        cy = y - ph + r
        if kind == 2:  # round, red ring on white
            c.circle(x, cy, r, SIGN, (210, 30, 30))
            c.circle(x, cy, 0.65 * r, SIGN, (245, 245, 245))
        else:  # square, blue with a white arrow
            c.rect(x - r, cy - r, x + r, cy + r, SIGN, (30, 70, 190))
            c.line((x - 0.5 * r, cy), (x + 0.5 * r, cy), SIGN, (245, 245, 245), round(0.25 * r))


def _draw_car(c: _Canvas, s: _Scene, rng, t: float, layout: dict, domain: str, night: bool):
    u = s.unit(t)
    y = s.y(t)
    lo, hi = s.x(t, -s.road), s.x(t, s.road)
    van = rng.random() < layout["van_p"]
    pal = "source" if domain == "source" else "real"
    length = (1.05 if van else 0.9) * u
    x0 = rng.uniform(lo, max(lo, hi - length))
    x1 = x0 + length
    wr = 0.09 * length
    col = _jitter(rng, _pick(rng, (_VAN_COLOURS if van else _SEDAN_COLOURS)[pal]), 10)
    glass = (35, 45, 60)
    body_bottom = y - 0.6 * wr
    if van:  # mode 2: tall box, windows only at the front
        top = body_bottom - 0.55 * length
        c.rect(x0, top, x1, body_bottom, CAR, col, PAINT)
        c.rect(
            x0 + 0.05 * length,
            top + 0.06 * length,
            x0 + 0.3 * length,
            top + 0.22 * length,
            CAR,
            glass,
            GLASS,
        )
    else:  # mode 1: low body and a trapezoid cabin
        top = body_bottom - 0.27 * length
        c.rect(x0, top, x1, body_bottom, CAR, col, PAINT)
        ch = 0.2 * length
        c.poly([(x0 + 0.2 * length, top), (x1 - 0.15 * length, top), (x1 - 0.3 * length, top - ch), (x0 + 0.32 * length, top - ch)], CAR, col, PAINT)  # fmt: skip
        c.poly([(x0 + 0.27 * length, top), (x1 - 0.21 * length, top), (x1 - 0.33 * length, top - 0.8 * ch), (x0 + 0.36 * length, top - 0.8 * ch)], CAR, glass, GLASS)  # fmt: skip
    for xw in (x0 + 0.2 * length, x1 - 0.2 * length):
        c.circle(xw, y - wr, wr, CAR, (20, 20, 20))
    if night:  # head lights at the front (left), tail lights at the back
        hy = body_bottom - 0.1 * length
        c.light(x0 + 0.02 * length, hy, 0.05 * length, (255, 245, 210))
        c.light(x1 - 0.02 * length, hy, 0.035 * length, (230, 20, 20))


def _draw_person(c: _Canvas, x: float, y: float, ph: float, rng, coat: bool, cls: int) -> None:
    skin = _pick(rng, _SKIN)
    c.circle(x, y - 0.9 * ph, 0.08 * ph, cls, skin, PLAIN)
    if coat:  # mode 2: wide bright coat reaching the knees
        col = _jitter(rng, _pick(rng, _COAT_CLOTHES), 15)
        c.poly([(x - 0.13 * ph, y - 0.82 * ph), (x + 0.13 * ph, y - 0.82 * ph), (x + 0.22 * ph, y - 0.25 * ph), (x - 0.22 * ph, y - 0.25 * ph)], cls, col, CLOTH)  # fmt: skip
        c.rect(x - 0.1 * ph, y - 0.25 * ph, x - 0.03 * ph, y, cls, (30, 30, 30), CLOTH)
        c.rect(x + 0.03 * ph, y - 0.25 * ph, x + 0.1 * ph, y, cls, (30, 30, 30), CLOTH)
    else:  # mode 1: slim, dark jacket and trousers
        c.rect(x - 0.1 * ph, y - 0.82 * ph, x + 0.1 * ph, y - 0.45 * ph, cls, _pick(rng, _SLIM_CLOTHES), CLOTH)  # fmt: skip
        legs = _pick(rng, _SLIM_TROUSERS)
        c.rect(x - 0.09 * ph, y - 0.45 * ph, x - 0.01 * ph, y, cls, legs, CLOTH)
        c.rect(x + 0.01 * ph, y - 0.45 * ph, x + 0.09 * ph, y, cls, legs, CLOTH)


def _draw_rider(c: _Canvas, s: _Scene, rng, t: float, night: bool) -> None:
    u = s.unit(t)
    y = s.y(t)
    side = 1 if rng.random() < 0.5 else -1
    x = s.x(t, side * 0.75 * s.road)
    r = 0.12 * u
    frame = _pick(rng, [(20, 20, 20), (180, 180, 190), (30, 90, 180)])
    thick = max(1, round(0.02 * u))
    for xw in (x - 1.3 * r, x + 1.3 * r):
        c.circle(xw, y - r, r, BICYCLE, frame, thickness=thick)
    c.line((x - 1.3 * r, y - r), (x, y - 1.8 * r), BICYCLE, frame, thick)
    c.line((x, y - 1.8 * r), (x + 1.3 * r, y - r), BICYCLE, frame, thick)
    _draw_person(c, x, y - 1.6 * r, 0.42 * u, rng, coat=rng.random() < 0.5, cls=RIDER)
    if night:
        c.light(x - 2.3 * r, y - 1.8 * r, 0.3 * r, (255, 250, 220))


def _layout_scene(rng: np.random.Generator, domain: str, h: int, w: int) -> _Canvas:
    """Draw one scene: label, base colours, materials and (night) light sources."""
    layout = LAYOUTS[domain]
    pal = _PALETTES["source" if domain == "source" else "real"]
    night = domain == "night"
    s = _Scene(rng, h, w, layout)
    c = _Canvas(h, w)
    _draw_background(c, s, rng, layout, pal, night)
    _draw_ground(c, s, rng, layout, pal)
    # Objects, drawn far to near so nearer ones occlude.
    objects: list[tuple[float, str, int]] = []
    for kind, key, near in (
        ("tree", "trees", 1.0),
        ("pole", "poles", 1.0),
        ("person", "persons", 1.1),
    ):
        for _ in range(int(rng.integers(layout[key][0], layout[key][1] + 1))):
            objects.append((rng.uniform(0.2, near), kind, 1 if rng.random() < 0.5 else -1))
    for _ in range(int(rng.integers(layout["cars"][0], layout["cars"][1] + 1))):
        objects.append((rng.uniform(0.2, 1.05), "car", 0))
    for _ in range(int(rng.integers(layout["riders"][0], layout["riders"][1] + 1))):
        objects.append((rng.uniform(0.3, 0.95), "rider", 0))
    for t, kind, side in sorted(objects):
        if kind == "tree":
            _draw_tree(c, s, rng, t, side, pal)
        elif kind == "pole":
            _draw_pole(c, s, rng, t, side, pal, night)
        elif kind == "person":
            off = side * (s.road + rng.uniform(0.2, 0.8) * s.side)
            ph = rng.uniform(0.45, 0.55) * s.unit(t)
            _draw_person(c, s.x(t, off), s.y(t), ph, rng, rng.random() < layout["coat_p"], PERSON)
        elif kind == "car":
            _draw_car(c, s, rng, t, layout, domain, night)
        else:
            _draw_rider(c, s, rng, t, night)
    return c


@cache
def _photo(name: str) -> np.ndarray:
    """A scikit-image bundled photograph as (h, w) or (h, w, 3) float32 in [0, 1] (offline)."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name.split("-")[0])(), dtype=np.float32)
    if img.max() > 1.0:
        img = img / 255.0
    if img.ndim == 3 and name not in ("astronaut", "rocket", "rocket-sky", "coffee", "chelsea"):
        img = img[..., 0]  # grey photographs stay single-channel: a third of the work
    if name == "rocket-sky":  # a clean patch of dusk sky between the launch towers
        img = img[:200, 465:550]
    return np.ascontiguousarray(img if img.ndim == 2 else img[..., :3])


def _texture(
    rng: np.random.Generator, name: str, contrast: float, scale, h: int, w: int, needed: bool = True
):
    """(h, w, 1|3) float32 multiplier around 1: a random crop of a photograph, contrast-scaled.

    The random crop is always drawn, so image streams do not depend on which materials a
    scene happens to contain; the pixels are only computed when ``needed``.
    """
    photo = _photo(name)
    ph, pw = photo.shape[:2]
    k = rng.uniform(*scale)
    ch, cw = min(ph, max(8, round(h * k))), min(pw, max(8, round(w * k)))
    y0, x0 = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    flip = rng.random() < 0.5
    if not needed:
        return None
    crop = cv2.resize(photo[y0 : y0 + ch, x0 : x0 + cw], (w, h), interpolation=cv2.INTER_LINEAR)
    if flip:
        crop = crop[:, ::-1]
    if crop.ndim == 2:
        crop = crop[..., None]
    crop *= contrast / max(float(crop.mean()), 1e-3)
    crop += 1.0 - contrast  # = 1 + contrast * (crop / mean - 1)
    return crop


def _render_photo(c: _Canvas, rng: np.random.Generator, night: bool) -> np.ndarray:
    """Texture, light and degrade the base colours -> (H, W, 3) uint8 RGB."""
    h, w = c.h, c.w
    img = c.color.astype(np.float32)
    present = np.bincount(c.material.ravel(), minlength=NUM_MATERIALS) > 0
    for mat, (name, contrast, scale) in _TEXTURES.items():
        if mat == GLASS:
            name = _pick(rng, _GLASS_ALTERNATIVES)
        tex = _texture(rng, name, contrast, scale, h, w, needed=bool(present[mat]))
        if tex is not None:  # OpenCV's masked copy is much faster than numpy's where=
            cv2.copyTo(img * tex, (c.material == mat).view(np.uint8), img)
    # Illumination: a smooth brightness ramp (sun direction / vignetting) and a colour cast.
    ramp = np.linspace(rng.uniform(0.7, 1.1), rng.uniform(0.8, 1.2), w, dtype=np.float32)
    vert = np.linspace(rng.uniform(0.9, 1.15), rng.uniform(0.75, 1.0), h, dtype=np.float32)
    img *= (vert[:, None] * ramp[None, :])[..., None]
    if night:
        cast = np.array([rng.uniform(0.7, 1.0), rng.uniform(0.75, 0.95), rng.uniform(0.9, 1.3)])
        ambient = rng.uniform(0.2, 0.35)
        # Light pools under the street lamps.
        pool = np.zeros((h, w), np.float32)
        for x, y, r in c.lamps:
            cv2.ellipse(pool, (x, min(h - 1, y + round(1.2 * r))), (round(r), max(1, round(0.35 * r))), 0, 0, 360, 1.0, -1)  # fmt: skip
        pool = cv2.GaussianBlur(pool, (0, 0), max(2.0, 0.04 * w))
        img = img * cast.astype(np.float32) * (ambient + 1.2 * pool[..., None])
        glare = cv2.GaussianBlur(c.emissive, (0, 0), rng.uniform(3.0, 6.0))
        # The wide halo is blurred at quarter resolution: same look, a fraction of the cost.
        small = cv2.resize(c.emissive, (w // 4, h // 4), interpolation=cv2.INTER_AREA)
        small = cv2.GaussianBlur(small, (0, 0), rng.uniform(10.0, 18.0) / 4)
        halo = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
        img = img + c.emissive + 1.5 * glare + 1.5 * halo
        img = 0.85 * img + 6.0  # low contrast, lifted blacks
        noise, blur = rng.uniform(5.0, 9.0), rng.uniform(0.6, 1.0)
    else:
        cast = np.array([rng.uniform(0.85, 1.15), rng.uniform(0.9, 1.1), rng.uniform(0.8, 1.15)])
        img = img * cast.astype(np.float32)
        gamma = rng.uniform(0.8, 1.2)  # applied through a 256-entry table: much cheaper than pow
        table = (255.0 * (np.arange(256) / 255.0) ** gamma).astype(np.float32)
        img = table[np.clip(img + 0.5, 0, 255).astype(np.uint8)]
        noise, blur = rng.uniform(2.0, 5.0), rng.uniform(0.5, 1.0)
    img = cv2.GaussianBlur(img, (0, 0), blur)
    img += noise * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def render_scene(
    domain: str, rng: np.random.Generator, image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene of ``domain``.

    Returns:
        image (H, W, 3) uint8 RGB and label (H, W) uint8 trainIds (255 = ignore).
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown synthetic domain {domain!r}: choose one of {', '.join(DOMAINS)}")
    h, w = image_size
    c = _layout_scene(rng, domain, h, w)
    if domain == "source":
        image = c.color.copy()  # flat shading, aliased edges: the "synthetic" look
    else:
        image = _render_photo(c, rng, night=domain == "night")
    return image, c.label


_PNG_FAST = [cv2.IMWRITE_PNG_COMPRESSION, 1]


def _root_name(seed: int, image_size, counts: dict[str, int]) -> str:
    name = f"synthetic-v{VERSION}-seed{seed}"
    if tuple(image_size) != DEFAULT_IMAGE_SIZE or counts != DEFAULT_COUNTS:
        # Non-default sizes get their own directory so they never shadow the default set.
        h, w = image_size
        name += (
            f"-{h}x{w}-s{counts['source_train']}-t{counts['target_train']}-v{counts['target_val']}"
        )
    return name


def _check_cache_dir(cache_dir: Path) -> None:
    hint = "set paths.cache_dir=<writable dir>"
    if cache_dir.exists() and not cache_dir.is_dir():
        raise OSError(f"cache directory {cache_dir} is not a directory: {hint}")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(
            f"cache directory {cache_dir} is not writable ({err.strerror}): {hint}"
        ) from None
    if not os.access(cache_dir, os.W_OK | os.X_OK):
        raise OSError(f"cache directory {cache_dir} is not writable: {hint}")


def generate(
    cache_dir: str | Path,
    seed: int = 0,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    num_source_train: int = DEFAULT_COUNTS["source_train"],
    num_target_train: int = DEFAULT_COUNTS["target_train"],
    num_target_val: int = DEFAULT_COUNTS["target_val"],
) -> Path:
    """Return the benchmark root under ``cache_dir``, generating it first if it is missing.

    Args:
        cache_dir: directory holding generated data sets (created if needed).
        seed: generation seed; the same seed gives byte-identical files.
        image_size: (H, W) of every image.
        num_source_train: images in source/train.
        num_target_train: images in real/train and night/train.
        num_target_val: images in real/val and night/val.

    Returns:
        ``<cache_dir>/synthetic-v1-seed<seed>`` (with a size suffix for non-default sizes),
        holding ``<domain>/<split>/{images,labels}/<index>.png`` and ``meta.json``.
    """
    cache_dir = Path(cache_dir).expanduser()
    counts = {
        "source_train": int(num_source_train),
        "target_train": int(num_target_train),
        "target_val": int(num_target_val),
    }
    image_size = (int(image_size[0]), int(image_size[1]))
    root = cache_dir / _root_name(seed, image_size, counts)
    if (root / "meta.json").is_file():
        return root  # complete: only a finished generation is ever renamed to `root`
    _check_cache_dir(cache_dir)
    # DDP ranks (and parallel jobs) build the data set once: the first to take the lock
    # generates, the others wait and find it complete.
    with file_lock(cache_dir / f".{root.name}.lock"):
        if (root / "meta.json").is_file():
            return root
        if root.exists():
            raise OSError(
                f"{root} exists but is not a complete synthetic set (no meta.json): delete it"
            )
        remove_stale_generations(cache_dir)
        _generate_into(root, seed, image_size, counts)
    return root


def _generate_into(root: Path, seed: int, image_size: tuple[int, int], counts: dict) -> None:
    """Render every split into a temp dir beside ``root``, verify the file counts, then
    rename it to ``root``."""
    cache_dir = root.parent
    prefix = f".{root.name}.tmp-{os.getpid()}@{host_tag()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=cache_dir))
    try:
        start = time.perf_counter()
        expected = {}
        for d_idx, domain in enumerate(DOMAINS):
            for s_idx, split in enumerate(SPLITS[domain]):
                n = counts["source_train"] if domain == "source" else counts[f"target_{split}"]
                img_dir, lab_dir = tmp / domain / split / "images", tmp / domain / split / "labels"
                img_dir.mkdir(parents=True)
                lab_dir.mkdir(parents=True)
                expected[img_dir] = expected[lab_dir] = n
                for i in range(n):
                    rng = np.random.default_rng([seed, VERSION, d_idx, s_idx, i])
                    image, label = render_scene(domain, rng, image_size)
                    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
                    # Checked writes (cv2.imwrite returns False on a full disk); no fsync per
                    # file: the whole directory is renamed into place once complete.
                    write_image(img_dir / f"{i:05d}.png", bgr, _PNG_FAST, sync=False)
                    write_image(lab_dir / f"{i:05d}.png", label, _PNG_FAST, sync=False)
        for directory, n in expected.items():  # complete only after a verified count
            found = sum(1 for p in directory.glob("*.png") if p.stat().st_size > 0)
            if found != n:
                raise OSError(f"generating {root}: {found} of {n} files in {directory}")
        meta = {"version": VERSION, "seed": seed, "image_size": list(image_size), **counts}
        meta["seconds"] = round(time.perf_counter() - start, 2)
        atomic_write_bytes(tmp / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
        tmp.chmod(0o755)  # mkdtemp makes it private; the finished set is shared like any dir
        try:
            os.replace(tmp, root)
        except OSError:
            if not (root / "meta.json").is_file():  # not a concurrent winner: a real failure
                raise
    finally:
        if tmp.exists():  # failed, interrupted, or another process finished first
            shutil.rmtree(tmp, ignore_errors=True)


_GENERATION_RE = re.compile(r"^\.synthetic-.+\.tmp-(?:(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]*)-)?")


def remove_stale_generations(cache_dir: Path) -> int:
    """Remove the temporary directories of killed generations in ``cache_dir`` (whose writer
    process is gone; see ``mpcl.io.writer_is_gone``); returns how many."""
    removed = 0
    for entry in cache_dir.iterdir():
        m = _GENERATION_RE.match(entry.name)
        if m is None or not entry.is_dir():
            continue
        if m.group("pid") is None:  # an older version's name: stale once a day old
            stale = writer_is_gone(0, "", entry)
        else:
            stale = writer_is_gone(int(m.group("pid")), m.group("host"), entry)
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


def synthetic_dataset(
    cache_dir: str | Path,
    domain: str,
    split: str,
    seed: int = 0,
    transform=None,
    **gen_kwargs,
) -> SegmentationDataset:
    """One split of the synthetic benchmark as a labelled ``SegmentationDataset``.

    Args:
        cache_dir: where the benchmark is (or will be) generated.
        domain: ``source``, ``real`` or ``night``.
        split: ``train`` (all domains) or ``val`` (target domains).
        seed: generation seed.
        transform: albumentations Compose applied to image and label.
        **gen_kwargs: forwarded to :func:`generate` (image_size, num_* counts).

    Items: ``image`` (3, H, W) float in [0, 1], ``label`` (H, W) int64, ``name``. Target train
    labels are there for the oracle only; UDA training must not read them.
    """
    if domain not in SPLITS:
        raise ValueError(f"unknown synthetic domain {domain!r}: choose one of {', '.join(DOMAINS)}")
    if split not in SPLITS[domain]:
        choices = ", ".join(SPLITS[domain])
        raise ValueError(
            f"unknown split {split!r} for synthetic domain {domain!r}: choose {choices}"
        )
    root = generate(cache_dir, seed=seed, **gen_kwargs)
    images = sorted((root / domain / split / "images").glob("*.png"))
    labels = [root / domain / split / "labels" / p.name for p in images]
    return SegmentationDataset(images, labels, transform=transform)


def save_preview(root: str | Path, path: str | Path, num: int = 4) -> Path:
    """Write a preview grid PNG: per domain, one row of images and one of coloured labels.

    Args:
        root: a benchmark root returned by :func:`generate`.
        path: output PNG file.
        num: images per row (the first ``num`` of each domain's train split).

    Returns:
        ``path``. The grid is (6 * H + gaps, num * W + gaps, 3).
    """
    root, path = Path(root), Path(path)
    rows = []
    for domain in DOMAINS:
        files = sorted((root / domain / "train" / "images").glob("*.png"))[:num]
        imgs, labs = [], []
        for f in files:
            imgs.append(cv2.imread(str(f), cv2.IMREAD_COLOR))  # BGR, written back as BGR
            lab = cv2.imread(str(root / domain / "train" / "labels" / f.name), cv2.IMREAD_UNCHANGED)
            labs.append(cv2.cvtColor(colorize(lab, CITYSCAPES.palette), cv2.COLOR_RGB2BGR))
        for row in (imgs, labs):
            gap = np.full((row[0].shape[0], 4, 3), 255, np.uint8)
            rows.append(np.concatenate([x for im in row for x in (im, gap)][:-1], axis=1))
    gap = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    grid = np.concatenate([x for r in rows for x in (r, gap)][:-1], axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, grid)
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m mpcl.data.synthetic CACHE_DIR [--seed S] [--preview PNG]``: generate (once)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("cache_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preview", type=Path, default=None, help="also write a preview grid")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        root = generate(args.cache_dir, seed=args.seed)
        print(f"{root} ready ({time.perf_counter() - start:.1f} s)")
        if args.preview is not None:
            print(f"preview: {save_preview(root, args.preview)}")
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {' '.join(str(err).split())}") from None


if __name__ == "__main__":
    main()
