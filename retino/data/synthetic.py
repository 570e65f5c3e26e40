"""Retino's built-in demo data set: synthetic fundus photographs with ICDR grades and lesion masks.

Each picture is a round fundus field on black: orange-red retina with radial illumination fall-off,
a bright yellowish optic disc on the nasal side, a darker macula 2.5 disc diameters temporal to it
and a tapering vessel tree (arcades above and below the macula, with branches). Lesions follow the
ICDR grade (see :data:`LESION_CODES`) and are small and local; exposure, colour cast, blur, noise,
field size/offset and rotation are drawn independently of the grade, so the grade cannot be read
from an image's overall colour or brightness.

Convention: images are drawn as a fundus camera shows them, so a RIGHT eye has its optic disc on
the image's RIGHT and its macula to the left of the disc; a LEFT eye is the mirror image.

Everything is deterministic: :func:`render_fundus` depends only on its arguments, and
:func:`make_dataset` seeds image ``i`` from ``(seed, i)``, so results do not depend on the number
of worker processes or the order in which images are drawn.
"""
from __future__ import annotations

import csv
import json
import math

import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from ._spawn import spawn_context
from ._workers import usable_cores

VERSION = "retino-synth-1"
ICDR_PROPORTIONS = (0.735, 0.070, 0.151, 0.025, 0.020)
# Codes in the lesion masks (0 = background). Later lesions overwrite earlier ones where they overlap.
LESION_CODES = {"microaneurysm": 1, "haemorrhage": 2, "hard_exudate": 3, "cotton_wool_spot": 4,
                "venous_beading": 5, "neovascularisation": 6, "preretinal_haemorrhage": 7}
MIN_N = 10
MIN_SIZE = 64
EYES = ("left", "right")
_MARKER = ".synth-in-progress"          # present while make_dataset writes; synth.json = complete
_NAME_RE = re.compile(r"^\d+_(left|right)\.(jpeg|png)$")

_SHIFT = 4                              # sub-pixel drawing: coordinates in 1/16 px
_ONE = 1 << _SHIFT
_AA = cv2.LINE_AA

# Albedo colours (RGB, 0..1) before illumination and camera response.
_VEIN = np.array([0.50, 0.07, 0.06], np.float32)
_ARTERY = np.array([0.66, 0.15, 0.09], np.float32)
_RED_LESION = np.array([0.48, 0.07, 0.05], np.float32)
_EXUDATE = np.array([1.05, 0.86, 0.40], np.float32)
_CWS = np.array([0.96, 0.88, 0.76], np.float32)
_NV = np.array([0.62, 0.10, 0.08], np.float32)
_PRERETINAL = np.array([0.42, 0.05, 0.04], np.float32)


# ============================================================================ grades and names

def allocate_grades(n: int, rng: np.random.Generator, proportions=ICDR_PROPORTIONS) -> np.ndarray:
    """``n`` grades whose counts match ``proportions`` as closely as possible, in random order.

    Counts come from largest-remainder allocation of ``n`` (so each is within 1 of ``n * p``);
    the array is then shuffled with ``rng``.
    """
    p = np.asarray(proportions, dtype=np.float64)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if p.ndim != 1 or len(p) == 0 or np.any(p < 0) or p.sum() <= 0:
        raise ValueError(f"proportions must be non-negative with a positive sum, got {proportions!r}")
    p = p / p.sum()
    exact = np.round(n * p, 9)          # 2000 * 0.735 is 1469.9999...: do not lose it to floor()
    counts = np.floor(exact).astype(np.int64)
    rest = int(n - counts.sum())
    if rest:
        # largest remainders first; ties go to the lower grade (stable sort)
        order = np.argsort(-(exact - counts), kind="stable")
        counts[order[:rest]] += 1
    grades = np.repeat(np.arange(len(p), dtype=np.int64), counts)
    rng.shuffle(grades)
    return grades


def _pair_patients(grades: np.ndarray, rng: np.random.Generator, discordant: float = 0.25):
    """Group image indices into patients: ``[(left_idx, right_idx), ...]`` plus a lone left eye if
    ``len(grades)`` is odd. The two eyes of a patient get the same grade or grades one apart."""
    n = len(grades)
    idx = np.arange(n)
    single = None
    if n % 2:
        single = int(rng.integers(n))
        idx = np.delete(idx, single)
    # sort by grade with random tie-breaks, then pair neighbours: mostly equal-grade pairs
    order = idx[np.lexsort((rng.random(len(idx)), grades[idx]))]
    pairs = [[int(order[i]), int(order[i + 1])] for i in range(0, len(order), 2)]
    # make a share of the pairs discordant by one grade: swap one eye between pure pairs of grade
    # k and k+1 (keeps every grade's count, gives (k, k+1) patients as in real screening data)
    pure = {}
    for j, (a, b) in enumerate(pairs):
        if grades[a] == grades[b]:
            pure.setdefault(int(grades[a]), []).append(j)
    used = set()
    for k in sorted(pure):
        lo = [j for j in pure.get(k, []) if j not in used]
        hi = [j for j in pure.get(k + 1, []) if j not in used]
        m = int(discordant * min(len(lo), len(hi)))
        if m == 0:
            continue
        lo_sel = rng.choice(lo, size=m, replace=False)
        hi_sel = rng.choice(hi, size=m, replace=False)
        for a, b in zip(lo_sel, hi_sel):
            pairs[a][1], pairs[b][1] = pairs[b][1], pairs[a][1]
            used.update((int(a), int(b)))
    rng.shuffle(pairs)
    out = []
    for a, b in pairs:
        out.append((a, b) if rng.random() < 0.5 else (b, a))
    return out, single


def _split_patients(max_grades: np.ndarray, test_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean ``is_test`` per patient, stratified by max grade: patients are ordered by
    (stratum, random) and every 1/test_fraction-th one goes to test (systematic sampling), so the
    test share is exact overall and within one patient of it in every stratum."""
    m = len(max_grades)
    order = np.lexsort((rng.random(m), max_grades))
    u = rng.random()
    pos = np.arange(m)
    take = np.floor((pos + 1) * test_fraction + u) - np.floor(pos * test_fraction + u) > 0
    is_test = np.zeros(m, dtype=bool)
    is_test[order[take]] = True
    return is_test


# ============================================================================ drawing helpers

def _fx(v) -> np.ndarray:
    """Pixel coordinates -> fixed-point int32 for cv2's ``shift`` argument."""
    return np.round(np.asarray(v, dtype=np.float64) * _ONE).astype(np.int32)


def _circle(img, c, r, val, thickness=-1, aa=True):
    cv2.circle(img, tuple(int(t) for t in _fx(c)), max(int(round(r * _ONE)), 1), val, thickness,
               _AA if aa else cv2.LINE_8, _SHIFT)


def _ellipse(img, c, axes, angle, val, start=0, end=360, aa=True):
    cv2.ellipse(img, tuple(int(t) for t in _fx(c)),
                (max(int(round(axes[0] * _ONE)), 1), max(int(round(axes[1] * _ONE)), 1)),
                float(angle), start, end, val, -1, _AA if aa else cv2.LINE_8, _SHIFT)


def _blend(img: np.ndarray, layer: np.ndarray, colour, opacity: float = 1.0) -> None:
    """img <- img * (1 - a) + colour * a, with a = layer / 255 * opacity (in place)."""
    x, y, w, h = cv2.boundingRect(layer)              # only where the layer has anything
    if w == 0 or h == 0:
        return
    sub = img[y:y + h, x:x + w]
    a = layer[y:y + h, x:x + w].astype(np.float32) * np.float32(opacity / 255.0)
    d = np.asarray(colour, np.float32) - sub
    d *= a[..., None]
    sub += d


def _blur(layer: np.ndarray, sigma: float) -> np.ndarray:
    if sigma < 0.25:
        return layer
    return cv2.GaussianBlur(layer, (0, 0), sigma)


class _Frame:
    """Anatomy coordinates (unit = field radius, origin = field centre, +x nasal for a right eye,
    +y down) -> image pixels, with the eye's mirroring and the camera's rotation and offset."""

    def __init__(self, cx, cy, radius, angle, mirror):
        self.c = np.array([cx, cy], np.float64)
        self.R = float(radius)
        ca, sa = math.cos(angle), math.sin(angle)
        m = -1.0 if mirror else 1.0
        # x' = R * rot @ diag(m, 1) @ x + c
        self.M = self.R * np.array([[ca * m, -sa], [sa * m, ca]], np.float64)
        self.mirror = mirror
        self.angle = angle

    def px(self, pts) -> np.ndarray:
        p = np.asarray(pts, np.float64).reshape(-1, 2)
        return p @ self.M.T + self.c

    def pt(self, p) -> np.ndarray:
        return self.px(p)[0]


def _walk(rng, p0, heading, length, *, step=0.015, wiggle=0.05, drift=0.0):
    """A smooth random-walk curve in anatomy units: (N, 2) points and headings."""
    n = max(int(length / step), 2)
    turns = rng.normal(0.0, wiggle, n)
    turns = np.convolve(turns, np.ones(3) / 3.0, mode="same") + drift
    h = heading + np.cumsum(turns)
    d = np.stack([np.cos(h), np.sin(h)], 1) * step
    pts = np.vstack([p0, p0 + np.cumsum(d, 0)])
    return pts, np.concatenate([[heading], h])


def _truncate(pts, fovea, *, faz=0.12, rim=1.02):
    """Cut a curve where it leaves the field or enters the foveal avascular zone."""
    r = np.hypot(pts[:, 0], pts[:, 1])
    f = np.hypot(pts[:, 0] - fovea[0], pts[:, 1] - fovea[1])
    bad = np.nonzero((r > rim) | (f < faz))[0]
    bad = bad[bad > 0]
    return pts[: bad[0]] if len(bad) else pts


class _Vessel:
    __slots__ = ("pts", "w", "vein", "name")

    def __init__(self, pts, w, vein, name=""):
        self.pts, self.w, self.vein, self.name = pts, w, vein, name


def _draw_vessels(layer: np.ndarray, frame: _Frame, vessels) -> None:
    """Draw tapering curves: runs of segments of equal (thickness, intensity) become one polyline."""
    groups: dict = {}
    for v in vessels:
        if len(v.pts) < 2:
            continue
        px = _fx(frame.px(v.pts))
        wpx = (v.w[:-1] + v.w[1:]) * 0.5 * frame.R
        t = np.maximum(1, np.round(wpx)).astype(np.int32)
        val = np.clip(wpx / t, 0.3, 1.0)
        val = (np.round(val * 8) * 31.875).astype(np.int32)       # 9 levels up to 255
        key = t * 1000 + val
        cuts = np.nonzero(np.diff(key))[0] + 1
        starts = np.concatenate([[0], cuts])
        ends = np.concatenate([cuts, [len(key)]])
        for s, e in zip(starts, ends):
            groups.setdefault((int(t[s]), int(val[s])), []).append(px[s:e + 1])
    # thin first, so thick trunks overwrite where they meet
    for (thick, val) in sorted(groups):
        cv2.polylines(layer, groups[(thick, val)], False, int(val), thick, _AA, _SHIFT)


# ============================================================================ the renderer

def _size_wh(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        w = h = int(size)
    else:
        try:
            w, h = (int(s) for s in size)
        except (TypeError, ValueError):
            raise ValueError(f"size must be an int or a (width, height) pair, got {size!r}") from None
    if min(w, h) < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} px, got {size!r}")
    return w, h


def _sample_points(rng, n, frame_info, *, rmax=0.85, quadrant=None, pole=0.55, avoid_disc=1.4):
    """``n`` lesion positions (anatomy units) inside the field, off the disc, optionally in one
    quadrant (0..3: sign of x, y), with a preference for the posterior pole around the fovea."""
    fovea, disc, rd = frame_info
    out = np.zeros((0, 2))
    while len(out) < n:
        k = max(4 * n, 16)
        r = rmax * np.sqrt(rng.random(k))
        a = rng.random(k) * 2 * np.pi
        p = np.stack([r * np.cos(a), r * np.sin(a)], 1)
        ok = np.hypot(p[:, 0] - disc[0], p[:, 1] - disc[1]) > avoid_disc * rd
        if quadrant is not None:
            sx = 1 if quadrant in (0, 3) else -1
            sy = 1 if quadrant in (0, 1) else -1
            ok &= (np.sign(p[:, 0]) == sx) & (np.sign(p[:, 1]) == sy)
        if pole:
            d = np.hypot(p[:, 0] - fovea[0], p[:, 1] - fovea[1])
            ok &= rng.random(k) < (0.35 + 0.65 * np.exp(-(d / pole) ** 2))
        out = np.vstack([out, p[ok]])
    return out[:n]


def render_fundus_info(grade: int, *, eye: str = "left", size=256, seed: int = 0):
    """Like :func:`render_fundus` but also returns a dict describing the picture: field centre and
    radius (px), disc and fovea centres (px), disc radius (px), and lesion counts."""
    grade = int(grade)
    if grade not in range(5):
        raise ValueError(f"grade must be 0..4, got {grade}")
    if eye not in EYES:
        raise ValueError(f"eye must be 'left' or 'right', got {eye!r}")
    W, H = _size_wh(size)
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    rng = np.random.default_rng(seed)
    m = min(W, H)

    # ---------------- camera and field (independent of the grade; drawn first)
    R = m / 2 * rng.uniform(0.86, 0.98)
    cx = W / 2 + rng.uniform(-0.04, 0.04) * m
    cy = H / 2 + rng.uniform(-0.04, 0.04) * m
    angle = math.radians(rng.uniform(-12, 12))
    frame = _Frame(cx, cy, R, angle, mirror=(eye == "left"))
    s = R / 118.0                         # pixel scale relative to a 256-px image
    exposure = math.exp(rng.normal(0.0, 0.2))
    gains = np.exp(rng.normal(0.0, 0.07, 3)).astype(np.float32)
    gamma = rng.uniform(0.8, 1.2)
    blur_sigma = rng.uniform(0.25, 0.7) * s ** 0.7     # big frames: sharper optics per pixel
    noise_sigma = rng.uniform(1.0, 4.0)
    fall_a, fall_b = rng.uniform(0.12, 0.35), rng.uniform(0.08, 0.3)
    illum_off = rng.normal(0.0, 0.12, 2)
    pigment = rng.uniform(0, 1)
    retina = np.array([rng.uniform(0.80, 0.92),
                       0.28 + 0.14 * pigment + rng.normal(0, 0.02),
                       0.10 + 0.10 * pigment + rng.normal(0, 0.015)], np.float32)

    # ---------------- anatomy
    rd = rng.uniform(0.12, 0.145)                               # disc radius (field radii)
    fovea = np.array([-0.25 + rng.normal(0, 0.03), 0.04 + rng.normal(0, 0.02)])
    dist = 2 * rd * rng.uniform(2.35, 2.65)                     # ~2.5 disc diameters
    tilt = rng.normal(-0.1, 0.05)                               # disc a little above the fovea
    disc = fovea + dist * np.array([math.cos(tilt), math.sin(tilt)])

    # ---------------- background albedo: retina colour, choroidal texture, macula
    yy, xx = np.ogrid[0:H, 0:W]
    yy = yy.astype(np.float32)
    xx = xx.astype(np.float32)
    dx = (xx - np.float32(cx)) / np.float32(R)
    dy = (yy - np.float32(cy)) / np.float32(R)
    r2 = dx * dx + dy * dy                                      # (H, W)

    def lowfreq(cells_x, cells_y, sigma):
        g = rng.normal(0.0, sigma, (cells_y, cells_x)).astype(np.float32)
        return cv2.resize(g, (W, H), interpolation=cv2.INTER_CUBIC)

    gw = max(4, int(round(8 * W / m)))
    texture = lowfreq(max(4, int(W / (5 * s))), max(4, int(H / (5 * s))), rng.uniform(0.015, 0.035))
    texture = cv2.GaussianBlur(texture, (0, 0), 0.8 * s)
    texture += lowfreq(gw, 8, 0.035)
    img = np.empty((H, W, 3), np.float32)
    img[:] = retina
    img *= (1.0 + texture)[..., None]
    img[..., 1:] *= (1.0 + 0.6 * texture)[..., None]           # pigment mottling: a little more in G/B

    fpx = frame.pt(fovea)
    mac_sigma = rd * R * rng.uniform(1.0, 1.3)
    mac_depth = rng.uniform(0.25, 0.4)
    x0, x1 = int(max(0, fpx[0] - 3.5 * mac_sigma)), int(min(W, fpx[0] + 3.5 * mac_sigma + 1))
    y0, y1 = int(max(0, fpx[1] - 3.5 * mac_sigma)), int(min(H, fpx[1] + 3.5 * mac_sigma + 1))
    if x1 > x0 and y1 > y0:
        g = np.exp(-(((xx[:, x0:x1] - fpx[0]) ** 2 + (yy[y0:y1] - fpx[1]) ** 2) / (2 * mac_sigma ** 2)))
        shade = 1.0 - mac_depth * g
        img[y0:y1, x0:x1] *= shade[..., None]
        img[y0:y1, x0:x1, 0] *= (1.0 - 0.15 * g)               # macula is browner, not just darker

    # ---------------- optic disc: yellowish, a paler cup, soft rim
    dpx = frame.pt(disc)
    layer = np.zeros((H, W), np.uint8)
    d_axes = (rd * R * rng.uniform(0.88, 0.98), rd * R * rng.uniform(1.0, 1.1))
    d_ang = math.degrees(angle) + rng.normal(0, 8)
    _ellipse(layer, dpx, d_axes, d_ang, 255)
    _blend(img, _blur(layer, 0.05 * rd * R + 0.3), (1.12, 0.88, 0.58), 0.95)
    layer[:] = 0
    cup = rng.uniform(0.3, 0.55)
    cup_c = frame.pt(disc + np.array([-0.15 * rd, 0.0]))
    _ellipse(layer, cup_c, (d_axes[0] * cup, d_axes[1] * cup), d_ang, 255)
    _blend(img, _blur(layer, 0.15 * rd * R), (1.2, 1.04, 0.84), 0.85)

    # ---------------- vessel tree
    vessels: list[_Vessel] = []
    w_vein = rng.uniform(0.022, 0.028)
    w_art = w_vein * rng.uniform(0.68, 0.8)

    def add(pts, w0, taper, vein, name=""):
        pts = _truncate(pts, fovea)
        if len(pts) < 2:
            return None
        t = np.linspace(0.0, 1.0, len(pts))
        v = _Vessel(pts, w0 * (1.0 - (1.0 - taper) * t), vein, name)
        vessels.append(v)
        return v

    def branches(v: _Vessel, depth: int):
        n = len(v.pts)
        if n < 8 or depth > 1:
            return
        spacing = rng.uniform(0.18, 0.3) if depth == 0 else rng.uniform(0.2, 0.32)
        step = np.hypot(*np.diff(v.pts, axis=0).T).mean()
        k = int(spacing / max(step, 1e-6))                       # points between branches
        i = int(rng.integers(3, 8))
        while i < n - 4:
            d = v.pts[min(i + 1, n - 1)] - v.pts[i - 1]
            tang = math.atan2(d[1], d[0])
            side = rng.choice((-1.0, 1.0))
            head = tang + side * rng.uniform(0.35, 0.85)
            length = rng.uniform(0.15, 0.4) * (0.65 ** depth)
            pts, _ = _walk(rng, v.pts[i], head, length, wiggle=0.07, drift=side * rng.uniform(-0.01, 0.02))
            b = add(pts, v.w[i] * rng.uniform(0.5, 0.7), 0.35, v.vein)
            if b is not None:
                branches(b, depth + 1)
            i += max(k, 3) + int(rng.integers(0, 4))

    main = []
    for up in (-1.0, 1.0):                                      # superior / inferior arcades
        a = disc[0] - fovea[0] + rng.uniform(-0.02, 0.05)
        for vein in (True, False):
            b = rng.uniform(0.36, 0.46) + (0.02 if vein else 0.0)
            t_end = rng.uniform(2.3, 2.75)
            t = np.linspace(0.0, t_end, 60)
            wob = 1.0 + 0.04 * np.sin(t * rng.uniform(2, 5) + rng.uniform(0, 6.3))
            x = disc[0] - a + a * np.cos(t) * wob
            y = disc[1] + up * (b * np.sin(t) * wob + 0.22 * (t / np.pi) ** 2)
            off = rng.normal(0, 0.15 * rd, 2)
            pts = np.stack([x, y], 1) + off * np.linspace(1.0, 0.0, 60)[:, None]
            pts += np.cumsum(rng.normal(0, 0.003, (60, 2)), 0)
            v = add(pts, w_vein if vein else w_art, 0.4, vein, "arcade_sup" if up < 0 else "arcade_inf")
            if v is not None:
                main.append(v)
        for vein in (True, False):                              # nasal vessels
            head = up * rng.uniform(0.9, 1.3)                    # up and nasal
            pts, _ = _walk(rng, disc + rng.normal(0, 0.1 * rd, 2), head, rng.uniform(0.6, 0.9),
                           wiggle=0.04, drift=-up * rng.uniform(0.004, 0.012))
            v = add(pts, (w_vein if vein else w_art) * 0.8, 0.4, vein, "nasal_sup" if up < 0 else "nasal_inf")
            if v is not None:
                main.append(v)
    for _ in range(int(rng.integers(2, 4))):                    # small macular and nasal twigs
        head = math.pi + rng.normal(0, 0.35) if rng.random() < 0.6 else rng.normal(0, 0.4)
        pts, _ = _walk(rng, disc + rng.normal(0, 0.1 * rd, 2), head, rng.uniform(0.25, 0.5), wiggle=0.06)
        add(pts, w_art * rng.uniform(0.35, 0.55), 0.4, bool(rng.random() < 0.5))
    for v in list(main):
        branches(v, 0)

    veins = [v for v in vessels if v.vein]
    arts = [v for v in vessels if not v.vein]
    vsig = 0.3 + 0.25 * s
    layer[:] = 0
    _draw_vessels(layer, frame, arts)
    _blend(img, _blur(layer, vsig), _ARTERY, 0.85)
    vlayer = np.zeros((H, W), np.uint8)
    _draw_vessels(vlayer, frame, veins)

    # ---------------- lesions (drawn last in rng order: same seed, other grade -> same eye)
    mask = np.zeros((H, W), np.uint8)
    info_tuple = (fovea, disc, rd)
    counts = {k: 0 for k in LESION_CODES}
    lrng = np.random.default_rng([seed, 0x1E5, grade])
    red = np.zeros((H, W), np.uint8)       # microaneurysms and intraretinal haemorrhages
    yellow = np.zeros((H, W), np.uint8)    # hard exudates
    pale = np.zeros((H, W), np.uint8)      # cotton-wool spots (blurred heavily)
    nvl = np.zeros((H, W), np.uint8)       # new vessels
    pre = np.zeros((H, W), np.uint8)       # preretinal haemorrhage

    def microaneurysms(k):
        for p in _sample_points(lrng, k, info_tuple, rmax=0.8, pole=0.45):
            c = frame.pt(p)
            r = lrng.uniform(0.015, 0.026) * R
            _circle(red, c, r, 255)
            _circle(mask, c, r, 1, aa=False)
        counts["microaneurysm"] += k

    def haemorrhages(k, quadrant=None):
        pts = _sample_points(lrng, k, info_tuple, rmax=0.86, quadrant=quadrant,
                             pole=0.6 if quadrant is None else 0)
        for p in pts:
            c = frame.pt(p)
            kind = lrng.random()
            if kind < 0.4:                                     # dot
                shapes = [(c, (lrng.uniform(0.02, 0.032) * R,) * 2, 0.0)]
            elif kind < 0.8:                                   # blot: a few overlapping ellipses
                shapes = []
                for _ in range(int(lrng.integers(2, 5))):
                    cc = c + lrng.normal(0, 0.018 * R, 2)
                    ax = lrng.uniform(0.018, 0.036, 2) * R
                    shapes.append((cc, ax, lrng.uniform(0, 180)))
            else:                                              # flame: along the nerve fibres
                d = c - dpx
                ang = math.degrees(math.atan2(d[1], d[0]))
                shapes = [(c, (lrng.uniform(0.045, 0.075) * R, lrng.uniform(0.014, 0.022) * R), ang)]
            for cc, ax, an in shapes:
                _ellipse(red, cc, ax, an, 255)
                _ellipse(mask, cc, ax, an, 2, aa=False)
        counts["haemorrhage"] += k

    def exudates(k):
        for p in _sample_points(lrng, k, info_tuple, rmax=0.75, pole=0.35):
            c = frame.pt(p)
            nd = int(lrng.integers(4, 14))
            if lrng.random() < 0.35:                           # circinate ring
                a = lrng.random(nd) * 2 * np.pi
                rr = lrng.uniform(0.05, 0.09) * R * (1 + lrng.normal(0, 0.12, nd))
                pos = c + np.stack([np.cos(a), np.sin(a)], 1) * rr[:, None]
            else:
                pos = c + lrng.normal(0, 0.035 * R, (nd, 2))
            for q in pos:
                ax = lrng.uniform(0.009, 0.022, 2) * R
                an = lrng.uniform(0, 180)
                _ellipse(yellow, q, ax, an, 255)
                _ellipse(mask, q, ax, an, 3, aa=False)
        counts["hard_exudate"] += k

    def cotton_wool(k):
        arc = [v for v in main if v.name.startswith("arcade") and len(v.pts) > 10]
        for _ in range(k):
            if arc and lrng.random() < 0.8:
                v = arc[int(lrng.integers(len(arc)))]
                p = v.pts[int(lrng.integers(2, max(3, len(v.pts) * 2 // 3)))] + lrng.normal(0, 0.05, 2)
            else:
                p = _sample_points(lrng, 1, info_tuple, rmax=0.8)[0]
            if np.hypot(*p) > 0.85:
                p = p * 0.85 / np.hypot(*p)
            c = frame.pt(p)
            ax = (lrng.uniform(0.035, 0.065) * R, lrng.uniform(0.022, 0.04) * R)
            an = lrng.uniform(0, 180)
            _ellipse(pale, c, ax, an, 255)
            _ellipse(mask, c, (ax[0] * 0.8, ax[1] * 0.8), an, 4, aa=False)
        counts["cotton_wool_spot"] += k

    def beading(k):
        cands = [v for v in veins if v.name and len(v.pts) > 20]
        lrng.shuffle(cands)
        done = 0
        for v in cands[:k]:
            n = len(v.pts)
            i0 = int(lrng.integers(n // 5, n // 2))
            seg_len = lrng.uniform(0.15, 0.25)
            step = np.hypot(*np.diff(v.pts, axis=0).T).mean()
            i1 = min(n - 1, i0 + int(seg_len / step))
            seg = frame.px(v.pts[i0:i1 + 1])
            cum = np.concatenate([[0], np.cumsum(np.hypot(*np.diff(seg, axis=0).T))])
            wpx = float(v.w[i0] * R)
            spacing = max(2.2 * wpx, 3.0)
            for dpos in np.arange(0, cum[-1], spacing):
                c = np.array([np.interp(dpos, cum, seg[:, 0]), np.interp(dpos, cum, seg[:, 1])])
                rb = wpx * lrng.uniform(0.85, 1.05)
                _circle(vlayer, c, rb, 255)
                _circle(mask, c, rb, 5, aa=False)
            done += 1
        counts["venous_beading"] += done

    def neovascularisation():
        if lrng.random() < 0.5 or not main:                    # NVD: on or next to the disc
            p = disc + lrng.normal(0, 0.6 * rd, 2)
        else:                                                  # NVE: along an arcade
            arc = [v for v in main if v.name.startswith("arcade")] or main
            v = arc[int(lrng.integers(len(arc)))]
            p = v.pts[int(lrng.integers(len(v.pts) // 5, max(len(v.pts) // 5 + 1, len(v.pts) * 3 // 4)))]
        if np.hypot(*p) > 0.8:
            p = p * 0.8 / np.hypot(*p)
        c = frame.pt(p)
        extent = lrng.uniform(0.07, 0.12) * R
        thick = max(1, int(round(0.007 * R)))
        loops = []
        for _ in range(int(lrng.integers(7, 15))):
            cc = c + lrng.normal(0, 0.45 * extent, 2)
            m_ = int(lrng.integers(7, 12))
            a = np.sort(lrng.random(m_)) * 2 * np.pi
            rr = lrng.uniform(0.15, 0.4) * extent * (1 + lrng.normal(0, 0.25, m_))
            loops.append(_fx(cc + np.stack([np.cos(a), np.sin(a)], 1) * np.abs(rr)[:, None]))
        for _ in range(int(lrng.integers(3, 7))):               # feeder squiggles
            a0 = lrng.uniform(0, 2 * np.pi)
            pts, _ = _walk(lrng, np.zeros(2), a0, 1.0, step=0.08, wiggle=0.6)
            loops.append(_fx(c + pts * extent))
        cv2.polylines(nvl, loops, False, 255, thick, _AA, _SHIFT)
        cv2.polylines(mask, loops, False, 6, thick + 1, cv2.LINE_8, _SHIFT)
        if lrng.random() < 0.5:                                 # faint fibrous membrane
            _ellipse(pale, c, (extent * 0.8, extent * 0.6), lrng.uniform(0, 180), 110)
        counts["neovascularisation"] += 1

    def preretinal():
        arc = [v for v in main if v.name.startswith("arcade")] or main
        v = arc[int(lrng.integers(len(arc)))]
        p = v.pts[int(lrng.integers(len(v.pts) // 4, max(len(v.pts) // 4 + 1, len(v.pts) * 3 // 4)))]
        p = p + lrng.normal(0, 0.05, 2)
        a = lrng.uniform(0.07, 0.13) * R
        b = a * lrng.uniform(0.55, 0.85)
        if np.hypot(*p) > 0.78 - a / R:
            p = p * (0.78 - a / R) / np.hypot(*p)
        c = frame.pt(p)
        # boat shape: the lower half of an ellipse under a flat (fluid-level) top edge
        _ellipse(pre, c, (a, b), 0.0, 255, 0, 180)
        _ellipse(pre, c, (a, b * 0.12), 0.0, 255)
        _ellipse(mask, c, (a, b), 0.0, 7, 0, 180, aa=False)
        counts["preretinal_haemorrhage"] += 1

    if grade == 1:
        microaneurysms(int(lrng.integers(2, 7)))
    elif grade == 2:
        microaneurysms(int(lrng.integers(4, 16)))
        haemorrhages(int(lrng.integers(1, 9)))
        exudates(int(lrng.integers(0, 4)))
        cotton_wool(int(lrng.integers(0, 3)))
    elif grade >= 3:
        severe = grade == 3 or lrng.random() < 0.5
        if severe:
            microaneurysms(int(lrng.integers(8, 26)))
            for q in range(4):
                haemorrhages(int(lrng.integers(5, 11)), quadrant=q)
            beading(int(lrng.integers(2, 4)))
            exudates(int(lrng.integers(1, 6)))
            cotton_wool(int(lrng.integers(1, 5)))
        else:
            microaneurysms(int(lrng.integers(4, 16)))
            haemorrhages(int(lrng.integers(2, 9)))
            exudates(int(lrng.integers(0, 4)))
            cotton_wool(int(lrng.integers(0, 3)))
        if grade == 4:
            neovascularisation()
            preretinal()

    # veins (with any beading) go over arteries, lesions over vessels
    _blend(img, _blur(vlayer, vsig), _VEIN, 0.9)
    if grade:
        ls = 0.25 + 0.3 * s
        if pale.any():
            _blend(img, _blur(pale, 0.02 * R), _CWS, 0.75)
        if yellow.any():
            _blend(img, _blur(yellow, ls), _EXUDATE, 0.95)
        _blend(img, _blur(red, ls), _RED_LESION, 0.88)
        if nvl.any():
            _blend(img, _blur(nvl, ls), _NV, 0.9)
        if pre.any():
            _blend(img, _blur(pre, 0.006 * R + 0.4), _PRERETINAL, 0.95)

    # ---------------- illumination and camera
    ix = dx - np.float32(illum_off[0] * 0.3)
    iy = dy - np.float32(illum_off[1] * 0.3)
    ir2 = ix * ix + iy * iy
    illum = 1.0 - np.float32(fall_a) * ir2 - np.float32(fall_b) * ir2 * ir2
    illum += lowfreq(max(3, int(round(4 * W / m))), 4, 0.05)
    np.maximum(illum, 0.12, out=illum)
    img *= illum[..., None]
    img *= gains * np.float32(exposure * 255.0 * 0.97)
    img = cv2.GaussianBlur(img, (0, 0), blur_sigma)
    img += rng.standard_normal((H, W, 3), dtype=np.float32) * np.float32(noise_sigma)
    edge = max(1.0, 0.012 * R)
    r = np.sqrt(r2) * np.float32(R)
    field = np.clip((np.float32(R) - r) / np.float32(edge), 0.0, 1.0)
    img *= field[..., None]
    np.clip(img, 0, 255, out=img)
    out = img.astype(np.uint8)
    lut = (np.power(np.arange(256) / 255.0, gamma) * 255.0 + 0.5).astype(np.uint8)
    out = cv2.LUT(out, lut)

    mask[r > 0.97 * R] = 0
    if grade and not mask.any():   # cannot happen (lesions lie within 0.88 R) but keep the promise
        raise RuntimeError("internal error: a graded image without lesions")
    info = {"grade": grade, "eye": eye, "size": (W, H), "center": (float(cx), float(cy)), "radius": float(R),
            "disc": (float(dpx[0]), float(dpx[1])), "disc_radius": float(rd * R),
            "fovea": (float(fpx[0]), float(fpx[1])), "lesions": {k: v for k, v in counts.items() if v}}
    return out, mask, info


def render_fundus(grade: int, *, eye: str = "left", size: int | tuple[int, int] = 256,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic fundus photograph of ICDR ``grade`` (0-4).

    ``size`` is an int (square) or ``(width, height)``; a wide frame keeps the round field
    centred-ish with black borders. Returns ``(rgb, mask)``: uint8 ``(H, W, 3)`` RGB and uint8
    ``(H, W)`` lesion codes (:data:`LESION_CODES`; empty for grade 0, non-empty otherwise).
    The same arguments give the same arrays; the same seed with another grade or eye gives the
    same (mirrored) eye with other lesions.
    """
    rgb, mask, _ = render_fundus_info(grade, eye=eye, size=size, seed=seed)
    return rgb, mask


# ============================================================================ degraded photographs

# What ``make_dataset(degraded=...)`` does to a photo that a grader would call ungradable. Each is
# well past what the quality gate (retino.inference.quality) accepts, so quality.csv is ground truth for it:
DEGRADATIONS = ("dark", "blurred", "overexposed", "cut_off")


def degrade_photo(rgb: np.ndarray, kind: str, *, seed: int = 0,
                  mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """A rendered photo (and its lesion mask) made ungradable in one of :data:`DEGRADATIONS` ways.

    ``dark``: under-exposed to a median luminance of 3-7% inside the field, with sensor noise on
    top; ``blurred``: defocus, a Gaussian of 3-4.5% of the field radius, with sensor noise after
    it; ``overexposed``: the field's median green pushed to 1.2-1.6x the clipping level plus a white
    veil of 20-35%, so the picture washes out; ``cut_off``: the camera off-axis, the field shifted
    by 0.9-1.2 radii in a random direction so that 40-60% of it leaves the frame (the mask moves too).
    Exposures are set relative to the photo's own, so every degraded photo is plainly degraded.
    """
    if kind not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {kind!r}; expected one of {', '.join(DEGRADATIONS)}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, 0xDE6])
    h, w = rgb.shape[:2]
    radius = 0.46 * min(h, w)                    # render_fundus draws a field of 0.43-0.49 x the short side
    img = rgb.astype(np.float32)
    field = rgb.max(axis=2) > 0
    if kind == "dark":
        luma = img[field] @ np.float32([0.299, 0.587, 0.114])
        gain = rng.uniform(0.03, 0.07) * 255 / max(float(np.median(luma)), 1.0)
        img = img * np.float32(gain) + rng.normal(0, 1.2, img.shape).astype(np.float32)
    elif kind == "blurred":
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.03, 0.045) * radius))
        img += rng.normal(0, 1.5, img.shape).astype(np.float32)
    elif kind == "overexposed":
        gain = rng.uniform(1.2, 1.6) * 250 / max(float(np.median(img[field][:, 1])), 1.0)
        img = img * np.float32(gain) + np.float32(rng.uniform(0.2, 0.35) * 255)   # + a glare veil
    else:
        a = rng.uniform(0, 2 * np.pi)
        d = rng.uniform(0.9, 1.2) * radius
        shift = np.float32([[1, 0, d * np.cos(a)], [0, 1, d * np.sin(a)]])
        img = cv2.warpAffine(img, shift, (w, h), flags=cv2.INTER_NEAREST, borderValue=0)
        if mask is not None:
            mask = cv2.warpAffine(mask, shift, (w, h), flags=cv2.INTER_NEAREST, borderValue=0)
        field = img.max(axis=2) > 0
    img[~field] = 0                             # the surround stays black: noise is the sensor's, inside
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), mask


# ============================================================================ the data set

def _image_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, 1, index]).generate_state(1, np.uint64)[0])


def _plan_degradations(n: int, share: float, seed: int) -> dict[int, tuple[str, int]]:
    """Image index -> (kind, seed) for ``round(share * n)`` images; its own stream of the seed, so the
    grades, pairs and split (drawn from stream 0) are the same with or without degraded photos."""
    k = int(round(share * n))
    if k == 0:
        return {}
    rng = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, 2])
    chosen = rng.choice(n, size=k, replace=False)
    kinds = rng.permutation(np.resize(np.arange(len(DEGRADATIONS)), k))   # the kinds in equal numbers
    return {int(i): (DEGRADATIONS[int(j)], int(rng.integers(2**63))) for i, j in zip(chosen, kinds)}


def _init_worker() -> None:
    cv2.setNumThreads(1)        # the pool already uses every core


def _write_one(job) -> str:
    name, grade, eye, size, img_seed, out_dir, quality, degradation = job
    rgb, mask = render_fundus(grade, eye=eye, size=size, seed=img_seed)
    if degradation is not None:
        kind, degrade_seed = degradation
        rgb, mask = degrade_photo(rgb, kind, seed=degrade_seed, mask=mask)
    out = Path(out_dir)
    ok = cv2.imwrite(str(out / "images" / f"{name}.jpeg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                     [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    ok &= cv2.imwrite(str(out / "masks" / f"{name}.png"), mask, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise OSError(f"could not write {name} into {out}")
    return name


def _prepare_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    ours = (out / "synth.json").is_file() or (out / _MARKER).exists()
    if not ours and any(out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no synthetic data set (no synth.json); "
                         "choose a new or empty folder")
    (out / _MARKER).write_text("make_dataset is writing here; synth.json appears when it is done\n")
    for stale in ("synth.json", "train.csv", "test.csv", "quality.csv"):  # from here on: incomplete
        (out / stale).unlink(missing_ok=True)
    (out / "images").mkdir(exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)


def _write_csv(path: Path, rows, header=("image", "level")) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(list(header))
        w.writerows(rows)
    os.replace(tmp, path)


def make_dataset(out_dir, *, n: int = 2000, size: int = 256, seed: int = 0, test_fraction: float = 0.2,
                 progress: bool = True, workers: int | None = None, quality: int = 90,
                 degraded: float = 0.0) -> Path:
    """Write a synthetic data set in Retino's own layout and return its folder.

    ``out_dir/images/<patient>_<eye>.jpeg``, ``masks/<patient>_<eye>.png`` (lesion codes),
    ``train.csv`` and ``test.csv`` (``image,level``; split by patient, stratified by the patient's
    worse eye, seeded) and finally ``synth.json`` (the parameters): its presence marks a complete
    set. Grades follow :data:`ICDR_PROPORTIONS`; the two eyes of a patient get equal or adjacent
    grades. ``workers`` processes render in parallel (None: up to 8, one per CPU; 0/1: in this
    process); the files do not depend on it. ``degraded``: that share of the photos (chosen with
    the seed, the four kinds of :data:`DEGRADATIONS` in equal numbers) is made ungradable, and
    ``quality.csv`` (``image,quality,reason``: "ok" or "ungradable" and the kind) records which;
    0 (the default) writes exactly what earlier versions wrote, with no quality.csv.
    """
    n, seed, quality = int(n), int(seed), int(quality)
    if n < MIN_N:
        raise ValueError(f"n must be at least {MIN_N} images, got {n}")
    W, H = _size_wh(size)
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be 1..100, got {quality}")
    if not 0.0 <= float(degraded) <= 1.0:
        raise ValueError(f"degraded must be a share between 0 and 1, got {degraded}")
    out = Path(out_dir)
    _prepare_dir(out)

    plan = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, 0])
    grades = allocate_grades(n, plan)
    pairs, single = _pair_patients(grades, plan)
    records = []                                        # (name, image index, patient index)
    for p, (li, ri) in enumerate(pairs):
        records.append((f"{p + 1}_left", li, p))
        records.append((f"{p + 1}_right", ri, p))
    if single is not None:
        records.append((f"{len(pairs) + 1}_left", single, len(pairs)))
    n_pat = len(pairs) + (single is not None)
    max_g = np.zeros(n_pat, np.int64)
    for _, i, p in records:
        max_g[p] = max(max_g[p], grades[i])
    is_test = _split_patients(max_g, float(test_fraction), plan)

    size_arg = W if W == H else (W, H)
    damage = _plan_degradations(n, float(degraded), seed)
    jobs = [(name, int(grades[i]), name.split("_")[1], size_arg, _image_seed(seed, i), str(out), quality,
             damage.get(i)) for name, i, _ in records]
    if workers is None:
        workers = min(usable_cores(), 8) if n >= 64 else 1
    workers = max(1, min(int(workers), n))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, desc="synthetic fundus", unit="img", file=sys.stderr)
    try:
        if workers == 1:
            for job in jobs:
                _write_one(job)
                if bar:
                    bar.update(1)
        else:
            chunk = max(1, min(32, n // (workers * 8)))
            with spawn_context() as ctx, ProcessPoolExecutor(workers, mp_context=ctx,
                                                             initializer=_init_worker) as ex:
                for _ in ex.map(_write_one, jobs, chunksize=chunk):
                    if bar:
                        bar.update(1)
    finally:
        if bar:
            bar.close()

    keep = {f"{name}.jpeg" for name, _, _ in records} | {f"{name}.png" for name, _, _ in records}
    for sub in ("images", "masks"):                     # stale files of an earlier, larger set
        for f in (out / sub).iterdir():
            if _NAME_RE.match(f.name) and f.name not in keep:
                f.unlink()
    rows = {False: [], True: []}
    for name, i, p in records:
        rows[bool(is_test[p])].append((name, int(grades[i])))
    _write_csv(out / "train.csv", rows[False])
    _write_csv(out / "test.csv", rows[True])
    if damage:
        _write_csv(out / "quality.csv", [(name, "ungradable", damage[i][0]) if i in damage else (name, "ok", "")
                                         for name, i, _ in records], header=("image", "quality", "reason"))

    meta = {"generator": "retino.data.synthetic", "version": VERSION, "n": n,
            "size": W if W == H else [W, H], "seed": seed, "test_fraction": float(test_fraction),
            "quality": quality, "proportions": [float(p) for p in ICDR_PROPORTIONS],
            "grade_counts": [int(c) for c in np.bincount(grades, minlength=5)],
            "patients": int(n_pat), "n_train": len(rows[False]), "n_test": len(rows[True]),
            "eye_convention": "right eye: optic disc on the image's right; left eye mirrored",
            "lesion_codes": LESION_CODES}
    if damage:   # only then: a set without degraded photos keeps its earlier synth.json byte for byte
        kinds = [k for k, _ in damage.values()]
        meta.update(degraded=float(degraded), degraded_counts={k: kinds.count(k) for k in DEGRADATIONS})
    tmp = out / "synth.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    (out / _MARKER).unlink(missing_ok=True)
    os.replace(tmp, out / "synth.json")
    return out
