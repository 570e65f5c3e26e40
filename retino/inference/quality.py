"""The quality gate: is a photograph a fundus at all, and can it be graded?

:func:`assess` looks at the decoded photograph (before Retino's preprocessing) and returns a
:class:`Quality` with one of three verdicts:

* ``not_fundus``: *certainly* not a fundus photograph (not graded). Every limit of this kind sits
  a wide margin beyond the nearest real or enhanced fundus photo seen (``bench/gate_eval.py``), so
  that it never cuts through real ones: no round field at all, a bright textured surround, blue or
  green, many colours at once, a blank disc.
* ``ungradable``: a fundus photograph, or something in between, that cannot be graded as it is:
  too dark, over-exposed, out of focus, motion-blurred, noisy, no vessel tree to see, too small,
  an unusual colour or field shape (graded, with the measured reasons beside the grade).
* ``ok``.

Every reason names what is wrong, the measure, its value and the limit; every limit lives in
:data:`LIMITS`. The verdict does not depend on the size the photo was decoded at: the field is
found on the photo resized to ``ANALYSIS_SIDE``, and detail (focus, noise, vessels) is measured on
the field resampled to ``DETAIL_DIAMETER`` px, or at its own size when the photo holds fewer pixels
than that (then it is the photo's resolution, not the run's, that the measure sees). Callers give
the gate a photo decoded at >= ``GATE_MIN_SIDE`` px whenever the file has that many. One measure
looks at the photo's own pixels: the blur effect on the centre of the field, where a blur of a few
pixels at 1024 px shows that ``DETAIL_DIAMETER`` hides. Sharp photos pass it at every size they were
seen decoded at (fields of 128-3270 px), so it refuses none for the decode's size; a blurred photo is
caught at the decodes that keep its blur a few pixels wide (JPEG draft decoding of a file at half
scale halves it too).

The model's own view comes on top: :func:`fit_ood` fits a Mahalanobis-distance model to a run's
penultimate features (Lee et al. 2018, https://arxiv.org/abs/1807.03888) with a cut-off that passes
99% of the calibration photos (:mod:`retino.inference.ood`), and ``assess(..., ood=...)`` adds its verdict.
The model's view alone never makes a photo ``not_fundus``: a photo the gate finds to be a fundus
but the model finds unlike its training photos is ``ungradable`` *by this model*.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

ANALYSIS_SIDE = 384     # px: the long side the field is looked for at, up- or down-sampled to it
DETAIL_DIAMETER = 384   # px: the field diameter focus, noise and vessels are measured at (at most)
FOCUS_DIAMETER = 160    # px: ... and focus once more at this one (at most), below the sensor's noise
GATE_MIN_SIDE = 448     # px: a photo decoded smaller than this (JPEG draft mode for a small run) is ...
GATE_TARGET = 512       # ... decoded again at this size: its field then holds >= DETAIL_DIAMETER px
VERDICTS = ("ok", "ungradable", "not_fundus")


@dataclass(frozen=True)
class Limits:
    """Every threshold of the gate, and where its value comes from.

    "Real" is the tuning half of the 50 EyePACS photos of ``shared/real_fundus_sample`` and of
    their enhanced variants (CLAHE, green boost, gamma, JPEG 30, 256-px crops, Ben Graham's
    local-average subtraction), "synthetic" ``synth --degraded``; ranges are min-max over those,
    "drawn" the non-fundus pictures of ``tests/test_quality.py``. ``bench/gate_eval.py`` reports
    the verdicts on the held-out half. ``nf_*`` limits say "not a fundus" and sit far outside every
    fundus seen; the plain limits beside them only say "cannot be graded".
    """

    # -- finding the field
    bright_level: float = 0.06
    """V = max(R, G, B) above which a pixel is in the field; black surrounds are <= 0.016."""
    dark_level: float = 0.025
    """A dark photo's field is followed down to 35% of its 95th percentile, never below this."""
    # -- not a fundus photograph, certainly (not_fundus)
    nf_share: float = 0.05
    """Field area / frame: real >= 0.41 (256-px crops 0.7); a checkerboard's square 0.005."""
    nf_arc: float = 0.15
    """Share of 5-degree sectors round the centre holding field edge: real >= 0.54, half a fundus
    ~0.5; a straight edge 0.17 is left to ``nf_diameter``."""
    nf_diameter: float = 2.0
    """Fitted circle diameter / frame's short side: real 0.88-1.30; a straight edge fits ~2.1+."""
    nf_visible: float = 0.35
    """Field area / its fitted circle's area: real >= 0.87, half a fundus 0.5; lines of text on
    white 0.25 (a circle fitted round scattered marks)."""
    nf_roundness: float = 0.85
    """1 - median |edge distance - radius| / radius: real >= 0.956, a drawn 4:3 ellipse 0.90."""
    nf_surround: float = 0.15
    """Median V outside 1.1 radii, when that surround is textured (``nf_surround_spread``): real
    <= 0.016; scikit-image's astronaut 0.60. A flat bright surround (Ben Graham's grey 0.5) is
    a processed fundus image: ungradable, not proof of anything else."""
    nf_surround_spread: float = 0.08
    """Interquartile range of V outside 1.1 radii: a flat surround (black or one grey) ~0."""
    nf_red_share: float = 0.26
    """Median R / (R + G + B) inside the field: real >= 0.356, enhanced >= 0.30; grey is 0.333,
    a blue disc 0.17. Only on a colour photo (``min_saturation``)."""
    nf_colour_spread: float = 0.13
    """sqrt(var r + var g) of the chromaticities inside the field: real <= 0.066, enhanced <=
    0.094 (a retina is one colour throughout); a coffee cup on a table 0.20."""
    nf_structure: float = 0.0015
    """std of the LoG (sigma 3 px) of green / its median at DETAIL_DIAMETER: real >= 0.0048,
    a uniform drawn disc 0.00007. Not applied to a clipped field (a white disc is over-exposed)."""
    # -- can it be graded? (ungradable)
    min_share: float = 0.15
    """Field area / frame: real >= 0.41, synthetic >= 0.58 (cut-off ones 0.28)."""
    min_arc: float = 0.25
    """Share of the circle with a field edge: real >= 0.54, cut-off synthetic >= 0.33."""
    max_diameter: float = 1.5
    """Fitted circle diameter / frame's short side: real <= 1.30."""
    min_roundness: float = 0.93
    """A fundus camera's aperture is round: real >= 0.974 (trimmed fit, clipping chords left out),
    the field's bounding box cropped square and resized to 256 px >= 0.93, synthetic >= 0.99."""
    max_surround: float = 0.08
    """Median V outside the field: real <= 0.016; Ben Graham's grey surround 0.5."""
    min_edge_step: float = 0.5
    """(median V just inside - just outside the edge) / inside: real >= 0.97."""
    min_red_share: float = 0.34
    """Median red share: real >= 0.356; below it the colour is unlike a retina's."""
    min_saturation: float = 0.04
    """HSV saturation of the field: real >= 0.089; a grey-scale or red-free photo ~0."""
    min_brightness: float = 0.1
    """Median luminance inside 0.9 R: real >= 0.153; dark synthetic <= 0.07."""
    max_brightness: float = 0.9
    """Median luminance: real <= 0.854; over-exposed synthetic >= 0.96."""
    max_clipped: float = 0.3
    """Share of the field with green clipped (>= 250): real <= 2.4%; over-exposed >= 92%."""
    min_focus: float = 0.11
    """var(LoG sigma 1 px) / var(LoG sigma 3 px) of green at DETAIL_DIAMETER: real >= 0.127,
    synthetic >= 0.16; synthetic blurred <= 0.083, scikit-image's retina blurred sigma 8 0.076."""
    min_focus_coarse: float = 0.13
    """The same at FOCUS_DIAMETER: real >= 0.18, good synthetic >= 0.24; blurred synthetic (with
    sensor noise after the blur) <= 0.082."""
    min_isotropy: float = 0.35
    """min / max over 4 directions of the variance of green's second derivative (sigma 1 px):
    real detail runs every way (>= 0.5); a motion blur leaves none across its streaks."""
    max_noise: float = 1.0
    """Pixel noise (Immerkaer 1996) / vessel-scale detail of green: real <= 0.47, synthetic <= 0.6;
    heavy sensor noise 2+."""
    min_grain: float = 0.035
    """The same ratio from below: a camera photo has some pixel-level grain (real >= 0.086,
    synthetic >= 0.046 at 1024 px); a blur removes it first (scikit-image's retina blurred
    sigma 4: 0.03), as does enlarging a smaller photo."""
    min_vessels: float = 1.8
    """Length of the 3 longest connected dark ridges (Frangi et al. 1998, the strongest 12% of the
    field) / field diameter: a vessel tree's branches join into a few long trees, while fur, texture
    or text stay short strokes however many there are. Real >= 2.7, enhanced >= 2.0 (one green
    boost 1.67), synthetic >= 2.4 at 256 px; a tabby cat's fur cropped round 1.57, a brick wall 1.95
    (grey-scale), a textured disc <= 1.04, text 0.41, a histology slide 0.77."""
    max_blur: float = 0.65
    """Blur effect (Crete-Roffet et al. 2007: the share of the edge strength a further 11-px blur
    leaves in place, 0 sharp .. 1 flat) of green on the centre of the field at the photo's own
    resolution, where a blur of a few pixels shows that ``DETAIL_DIAMETER`` hides: real <= 0.47
    at every size they were decoded at (610-3270 px fields), enhanced <= 0.59, synthetic rendered
    at 128-2048 px <= 0.62 (their sensor noise, added after the optics' blur, reads as sharp);
    real photos blurred by 3 px at 1024 px 0.51-0.80, scikit-image's retina blurred by 3 px 0.68."""
    vessel_diameter: int = 200
    """px of field below which vessels are not traced: at 128 px a vessel is ~1 px wide, finer than
    the ridge filter's scales, and synth's 128-px photos would read as vessel-less."""
    min_visible: float = 0.75
    """Field area / fitted circle area: real >= 0.87, synthetic >= 0.99; cut-off <= 0.60."""
    min_diameter: int = 100
    """Fundus diameter in the photo as given, px. Retino's smallest working size is 128 px, whose
    field is 0.86-0.98 of the frame (110-125 px, as ``synth --size 128`` draws it); a field under
    100 px holds a microaneurysm (~1/100 of it) in under one pixel."""


LIMITS = Limits()


@dataclass
class Quality:
    """The gate's verdict on one photograph, the reasons for it and the scores behind them."""

    verdict: str                                   # one of VERDICTS
    reasons: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    def as_dict(self) -> dict:
        """JSON-safe ``{"verdict", "reasons", **scores}``."""
        return {"verdict": self.verdict, "reasons": list(self.reasons),
                **{k: round(float(v), 4) for k, v in self.scores.items()}}


# ----------------------------------------------------------------------------- measures

def _as_rgb(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or a.dtype != np.uint8 or min(a.shape[:2]) < 8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3) or a PIL image, got an array "
                         f"{a.dtype} {a.shape}")
    return np.ascontiguousarray(a[..., :3])


def _fit_circle(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares circle through points (Kasa 1976): x^2 + y^2 = a x + b y + c, linear in a, b, c."""
    A = np.stack([x, y, np.ones_like(x)], 1)
    (a, b, c), *_ = np.linalg.lstsq(A, x * x + y * y, rcond=None)
    cx, cy = a / 2, b / 2
    return float(cx), float(cy), float(np.sqrt(max(c + cx * cx + cy * cy, 0.0)))


def _field_mask(small: np.ndarray, v: np.ndarray, L: Limits) -> np.ndarray:
    """The field: brighter than a dark surround, or, on a flat bright surround (an enhanced image's
    grey), whatever differs from that surround's colour in its neighbourhood."""
    border = np.concatenate([small[:2].reshape(-1, 3), small[-2:].reshape(-1, 3),
                             small[:, :2].reshape(-1, 3), small[:, -2:].reshape(-1, 3)]).astype(np.float32)
    bg = np.median(border, 0)
    flat = np.mean(np.abs(border - bg).max(1) <= 6) > 0.5       # the field may touch the frame
    if flat and bg.max() / 255.0 > L.dark_level:
        dev = np.abs(small.astype(np.float32) - bg).max(2) / 255.0
        return (cv2.blur(dev, (7, 7)) > 0.012).astype(np.uint8)
    level = float(np.clip(0.35 * np.percentile(v[::4, ::4], 95), L.dark_level, L.bright_level))
    return (v > level).astype(np.uint8)


def _find_field(small: np.ndarray, v: np.ndarray, L: Limits) -> dict | None:
    """The fundus field at analysis size: filled mask, circle and edge measures."""
    h, w = v.shape
    smooth = cv2.GaussianBlur(small, (0, 0), 2.0)                # pixel noise is not a field
    mask = _field_mask(smooth, smooth.max(2).astype(np.float32) / 255.0, L)
    k = max(3, round(min(h, w) / 100)) | 1
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    contour = max(contours, key=cv2.contourArea)
    filled = np.zeros_like(mask)
    cv2.drawContours(filled, [contour], -1, 1, thickness=-1)
    pts = contour[:, 0, :].astype(np.float64)                  # (N, 2) x, y
    inner = (pts[:, 0] > 1) & (pts[:, 0] < w - 2) & (pts[:, 1] > 1) & (pts[:, 1] < h - 2)
    pts = pts[inner]                                            # the edge where it is not the frame's
    if len(pts) < 20:
        return {"filled": filled, "circle": None}
    # Trimmed refits: black rows above or below a clipped EyePACS circle, the notch on many
    # cameras' rims and light leaks are edges too; they drop out, the aperture's arc stays.
    fit = pts
    for _ in range(3):
        cx, cy, r = _fit_circle(fit[:, 0], fit[:, 1])
        d = np.abs(np.hypot(fit[:, 0] - cx, fit[:, 1] - cy) - r)
        keep = d <= max(1.5, 3 * float(np.median(d)))
        if keep.sum() < 20 or keep.all():
            break
        fit = fit[keep]
    if not r > 0:
        return {"filled": filled, "circle": None}
    # the straight chords where a camera's frame (or a square crop of it) clips the circle are not its shape
    chord = np.zeros(len(pts), bool)
    for axis in (0, 1):
        for end in (pts[:, axis].min(), pts[:, axis].max()):
            at = np.abs(pts[:, axis] - end) <= 3
            chord |= at if at.sum() > 0.1 * r else False
    shape = pts[~chord] if (~chord).sum() >= 20 else pts
    resid = np.abs(np.hypot(shape[:, 0] - cx, shape[:, 1] - cy) - r) / r
    sectors = np.floor((np.arctan2(fit[:, 1] - cy, fit[:, 0] - cx) + np.pi) / (2 * np.pi) * 72).astype(int) % 72
    return {"filled": filled, "circle": (cx, cy, r), "roundness": 1.0 - float(np.median(resid)),
            "arc": len(np.unique(sectors)) / 72.0}


def _vesselness(g: np.ndarray, sigmas=(1.5, 2.5, 3.5), beta: float = 0.5) -> np.ndarray:
    """Frangi et al.'s (1998) vesselness of dark ridges, as ``skimage.filters.frangi(g, sigmas,
    black_ridges=True)`` defines it (Hessian of the Gaussian-smoothed image, eigenvalues sorted by
    magnitude, gamma half the largest Hessian norm at the first scale), with OpenCV's separable
    filters: scikit-image's 8-sigma-long derivative kernels made it 10x slower, most of the gate's time."""
    out = np.zeros_like(g)
    gamma = None
    for sigma in sigmas:
        gs = cv2.GaussianBlur(g, (0, 0), sigma)
        hxx = cv2.Sobel(gs, cv2.CV_32F, 2, 0, ksize=1)
        hyy = cv2.Sobel(gs, cv2.CV_32F, 0, 2, ksize=1)
        hxy = cv2.Sobel(gs, cv2.CV_32F, 1, 1, ksize=3) * 0.25   # the 3x3 kernel is 4x the central difference
        trace, root = hxx + hyy, cv2.sqrt((hxx - hyy) ** 2 + 4 * hxy * hxy)
        # eigenvalues hi >= lo; where the trace is > 0, hi is the larger in magnitude and positive:
        # across a dark ridge the image curves up. Elsewhere (a bright ridge) the score is 0.
        hi, lo = (trace + root) * 0.5, (trace - root) * 0.5
        norm2 = hi * hi + lo * lo
        if gamma is None:
            gamma = max(float(np.sqrt(norm2.max())) / 2, 1e-12)
        dark = trace > 0
        rb2 = lo * lo / np.maximum(hi * hi, 1e-30)
        v = np.exp(-rb2 / (2 * beta * beta)) * (1 - np.exp(-norm2 / (2 * gamma * gamma)))
        np.maximum(out, np.where(dark, v, 0.0), out=out)
    return out


def _blur_effect(g: np.ndarray, h_size: int = 11) -> float:
    """``skimage.measure.blur_effect(g, h_size)`` (Crete-Roffet et al. 2007) with OpenCV's filters,
    ~10x faster on the large crops of a full-size photo: per axis, the share of the gradient
    magnitude that survives a further ``h_size``-px box blur; the larger of the two."""
    g = g.astype(np.float32)
    out = []
    for dx, dy, box in ((0, 1, (1, h_size)), (1, 0, (h_size, 1))):   # rows (axis 0), then columns
        sharp = np.abs(cv2.Sobel(g, cv2.CV_32F, dx, dy, ksize=3, borderType=cv2.BORDER_REFLECT))[2:-1, 2:-1]
        blurred = cv2.blur(g, box, borderType=cv2.BORDER_REFLECT)
        soft = np.abs(cv2.Sobel(blurred, cv2.CV_32F, dx, dy, ksize=3, borderType=cv2.BORDER_REFLECT))[2:-1, 2:-1]
        total = float(np.maximum(sharp, 1e-10).sum(dtype=np.float64))
        kept = float(np.maximum(np.maximum(sharp, 1e-10) - np.maximum(soft, 1e-10), 0).sum(dtype=np.float64))
        out.append(abs(total - kept) / total)
    return max(out)


def _native_blur(rgb: np.ndarray, cx: float, cy: float, r: float) -> float | None:
    """Blur effect of green on the square inside 0.6 R of the field's centre, at the photo's own
    resolution (photo coordinates); None when that square is too small to say."""
    a = int(0.42 * r)
    h, w = rgb.shape[:2]
    crop = rgb[max(0, int(cy) - a):min(h, int(cy) + a), max(0, int(cx) - a):min(w, int(cx) + a), 1]
    return _blur_effect(crop) if min(crop.shape) >= 32 else None


def _detail(rgb: np.ndarray, cx: float, cy: float, r: float) -> dict[str, float]:
    """Focus, isotropy, noise, structure and vessels of green inside 0.85 R (photo coordinates),
    with the field resampled to at most DETAIL_DIAMETER px.

    focus: var(LoG sigma 1) / var(LoG sigma 3): the variance of the Laplacian (Pech-Pacheco et al.
    2000) normalised by the energy at a coarser scale, so that it depends on neither brightness nor
    vessel contrast, only on how much detail survives at the finest scale. isotropy: a motion blur
    keeps detail along its streaks only. noise: Immerkaer's (1996) estimate over the vessel-scale
    structure. vessels: a vessel tree is a few long connected dark ridges; texture, text or a
    histology slide give many short ones.
    """
    s = min(1.0, DETAIL_DIAMETER / (2 * r))
    h, w = rgb.shape[:2]
    x0, x1 = max(0, int(cx - r)), min(w, int(np.ceil(cx + r)))
    y0, y1 = max(0, int(cy - r)), min(h, int(np.ceil(cy + r)))
    g = rgb[y0:y1, x0:x1, 1].astype(np.float32) / 255.0
    if s < 1:
        g = cv2.resize(g, (max(1, round((x1 - x0) * s)), max(1, round((y1 - y0) * s))), interpolation=cv2.INTER_AREA)
    yy, xx = np.ogrid[0:g.shape[0], 0:g.shape[1]]
    inside = np.hypot(xx - (cx - x0) * s, yy - (cy - y0) * s) < 0.85 * r * s
    if inside.sum() < 50:
        return {}
    median = max(float(np.median(g[inside])), 1 / 255)
    # leave out the black strips where the frame clips the circle: their straight edges are not detail
    inside &= cv2.erode((g > 0.1 * median).astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    if inside.sum() < 50:
        return {}
    g1 = cv2.GaussianBlur(g, (0, 0), 1.0)
    fine = cv2.Laplacian(g1, cv2.CV_32F)[inside]
    coarse = 9.0 * cv2.Laplacian(cv2.GaussianBlur(g, (0, 0), 3.0), cv2.CV_32F)[inside]  # x sigma^2
    structure = float(np.std(coarse)) / median
    gxx, gyy = cv2.Sobel(g1, cv2.CV_32F, 2, 0)[inside], cv2.Sobel(g1, cv2.CV_32F, 0, 2)[inside]
    gxy = cv2.Sobel(g1, cv2.CV_32F, 1, 1)[inside]
    ways = [np.var(gxx), np.var(gyy), np.var((gxx + gyy) / 2 + gxy), np.var((gxx + gyy) / 2 - gxy)]
    immerkaer = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
    noise = np.sqrt(np.pi / 2) / 6 * float(np.mean(np.abs(cv2.filter2D(g, -1, immerkaer))[inside])) / median
    # scikit-image's morphology pulls in scipy: imported when a photo is measured, so a process that
    # loads the grading path but never measures a photo does not pay for it
    from skimage.morphology import skeletonize
    ridges = _vesselness(g)
    ridges[~inside] = 0
    top = skeletonize((ridges >= np.percentile(ridges[inside], 88)) & inside & (ridges > 0))
    n, _, stats, _ = cv2.connectedComponentsWithStats(top.astype(np.uint8), connectivity=8)
    longest = np.sort(stats[1:, cv2.CC_STAT_AREA])[::-1][:3].sum() if n > 1 else 0
    # the same ratio on the field at FOCUS_DIAMETER px, where sensor noise is averaged away: a
    # defocused photo with noise on top keeps fine energy at full size, none at this one
    c = min(1.0, FOCUS_DIAMETER / (2 * r * s))
    small = cv2.resize(g, None, fx=c, fy=c, interpolation=cv2.INTER_AREA) if c < 1 else g
    yy, xx = np.ogrid[0:small.shape[0], 0:small.shape[1]]
    within = np.hypot(xx - (cx - x0) * s * c, yy - (cy - y0) * s * c) < 0.85 * r * s * c
    fine_c = cv2.Laplacian(cv2.GaussianBlur(small, (0, 0), 1.0), cv2.CV_32F)[within]
    coarse_c = 9.0 * cv2.Laplacian(cv2.GaussianBlur(small, (0, 0), 3.0), cv2.CV_32F)[within]
    return {"focus": float(np.var(fine) / max(float(np.var(coarse)), 1e-12)), "structure": structure,
            "focus_coarse": float(np.var(fine_c) / max(float(np.var(coarse_c)), 1e-12)),
            "isotropy": float(min(ways) / max(max(ways), 1e-12)), "noise": noise / max(structure, 1e-6),
            "vessels": float(longest / (2 * r * s))}


def measure(image, limits: Limits = LIMITS) -> dict[str, float]:
    """The gate's measures of one photograph (see :class:`Limits`); those it cannot take are absent."""
    rgb = _as_rgb(image)
    h0, w0 = rgb.shape[:2]
    scale = ANALYSIS_SIDE / max(h0, w0)     # always to the same size: the verdict is not the decode's
    small = rgb
    while max(small.shape[:2]) >= 2 * ANALYSIS_SIDE:   # halve with a Gaussian first: faster, same result
        small = cv2.pyrDown(small)
    small = cv2.resize(small, (round(w0 * scale), round(h0 * scale)),
                       interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    r8, g8, b8 = cv2.split(small)
    v = cv2.max(cv2.max(r8, g8), b8).astype(np.float32) / 255.0    # (h, w) V = max(R, G, B) in [0, 1]
    h, w = v.shape
    field_ = _find_field(small, v, limits)
    scores: dict[str, float] = {}
    if field_ is None:
        return scores
    filled = field_["filled"]
    scores["share"] = float(filled.mean())
    if field_["circle"] is None:
        return scores
    cx, cy, r = field_["circle"]
    scores.update(roundness=field_["roundness"], arc=field_["arc"], diameter=2 * r / min(h, w),
                  diameter_px=2 * r / scale, visible=float(filled.sum() / (np.pi * r * r)))
    yy, xx = np.ogrid[0:h, 0:w]
    rho = np.hypot((xx - cx).astype(np.float32), (yy - cy).astype(np.float32)) / np.float32(r)  # (h, w) radii
    outside = rho > 1.1
    if outside.sum() > 0.01 * h * w:
        q25, q50, q75 = np.percentile(v[outside], [25, 50, 75])
        scores.update(surround=float(q50), surround_spread=float(q75 - q25))
    else:
        scores.update(surround=0.0, surround_spread=0.0)
    ring_in, ring_out = v[(rho > 0.88) & (rho < 0.96)], v[(rho > 1.04) & (rho < 1.12)]
    if ring_in.size and ring_out.size:
        inner = float(np.median(ring_in))
        scores["edge_step"] = (inner - float(np.median(ring_out))) / max(inner, 1e-3)
    disc = (rho < 0.9) & (filled > 0)
    if disc.sum() < 50:
        return scores
    red, green, blue = (c[disc].astype(np.float32) for c in (r8, g8, b8))   # (N,) each: the field's pixels
    smooth = cv2.GaussianBlur(small, (0, 0), 2.0)[disc].astype(np.float32)   # (N, 3): colour without pixel noise
    scores["brightness"] = float(np.median(0.299 * red + 0.587 * green + 0.114 * blue)) / 255.0
    scores["clipped"] = float(np.mean(green >= 250))
    top = v[disc]
    usable = (top < 250 / 255) & (top > 0.03)
    if usable.mean() > 0.2:                                     # colour is unreadable in a clipped photo
        total = red[usable] + green[usable] + blue[usable]
        scores["red_share"] = float(np.median(red[usable] / total))
        low = np.minimum(np.minimum(red[usable], green[usable]), blue[usable])
        scores["saturation"] = float(np.median(1.0 - low / (top[usable] * 255.0)))
        chroma = smooth[usable] / np.maximum(smooth[usable].sum(1, keepdims=True), 1.0)
        scores["colour_spread"] = float(np.sqrt(np.var(chroma[:, 0]) + np.var(chroma[:, 1])))
    scores.update(_detail(rgb, cx / scale, cy / scale, r / scale))
    blur = _native_blur(rgb, cx / scale, cy / scale, r / scale)
    if blur is not None:
        scores["blur"] = blur
    return scores


# ----------------------------------------------------------------------------- the verdict

def _reason(what: str, measure: str, value: float, op: str, limit: float) -> str:
    return f"{what}: {measure} {value:.3g}, need {op} {limit:.3g}"


def _failed(sc: dict, checks) -> list[str]:
    return [_reason(what, m, sc[key], op, limit) for what, m, key, op, limit in checks
            if key in sc and (sc[key] < limit if op == ">=" else sc[key] > limit)]


def _colour_known(sc: dict, L: Limits) -> bool:
    return sc.get("saturation", 0.0) >= L.min_saturation    # grey-scale or clipped: no colour to judge


def _not_fundus(sc: dict, L: Limits) -> list[str]:
    """Reasons the photo is certainly not a fundus photograph (empty: it may be one)."""
    if "share" not in sc:
        return [f"no fundus field: nothing brighter than {L.dark_level:.3f} on the photo"]
    if "roundness" not in sc:   # fewer than 20 edge pixels away from the frame: nothing round to fit
        return [f"no round fundus field on a dark background: the bright area covers "
                f"{'under 1%' if sc['share'] < 0.01 else format(sc['share'], '.0%')} of the frame and its edge is the frame's"]
    checks = [("no round fundus edge", "share of the circle with an edge", "arc", ">=", L.nf_arc),
              ("no round fundus field", "circle diameter / frame", "diameter", "<=", L.nf_diameter),
              ("fundus field too small", "share of the frame", "share", ">=", L.nf_share),
              ("no round fundus field" + (" on a dark background" if sc.get("surround", 0.0) > L.max_surround else ""),
               "share of its circle the bright area fills", "visible", ">=", L.nf_visible)]
    if sc.get("surround", 0.0) <= L.max_surround:   # on a processed image's grey the field's edge is ragged
        checks.append(("field not round", "roundness", "roundness", ">=", L.nf_roundness))
    if sc.get("surround_spread", 0.0) > L.nf_surround_spread:   # a flat grey surround is an enhanced fundus's
        checks.append(("no dark surround", "median brightness outside the field", "surround", "<=",
                       L.nf_surround))
    if _colour_known(sc, L):
        checks += [("not the colour of a retina", "red share", "red_share", ">=", L.nf_red_share),
                   ("many colours, a retina is one", "colour spread", "colour_spread", "<=", L.nf_colour_spread)]
    if sc.get("clipped", 0.0) <= L.max_clipped:   # a burnt-out field is blank too: over-exposed, not proof
        checks.append(("a blank field, no retina to see", "structure", "structure", ">=", L.nf_structure))
    return _failed(sc, checks)


def _ungradable(sc: dict, L: Limits) -> list[str]:
    """Reasons a photo that may be a fundus cannot be graded."""
    out = []
    if sc.get("diameter_px", np.inf) < L.min_diameter:
        out.append(f"fundus too small to grade: {sc['diameter_px']:.0f} px across, need >= {L.min_diameter} "
                   f"(a 128-px photo's field; below it a microaneurysm is under a pixel)")
    if "brightness" in sc:
        if sc["brightness"] < L.min_brightness:
            out.append(_reason("too dark", "median brightness", sc["brightness"], ">=", L.min_brightness))
        elif sc["brightness"] > L.max_brightness:
            out.append(_reason("over-exposed", "median brightness", sc["brightness"], "<=", L.max_brightness))
        elif sc["clipped"] > L.max_clipped:
            out.append(_reason("over-exposed", "share of the field with green clipped", sc["clipped"], "<=",
                               L.max_clipped))
    if sc.get("saturation", 1.0) < L.min_saturation:
        out.append(_reason("a grey-scale photo, the model grades colour ones", "colour saturation",
                           sc["saturation"], ">=", L.min_saturation))
    checks = [("field not the round aperture of a fundus camera", "roundness", "roundness", ">=", L.min_roundness),
              ("fundus field small in the frame", "share of the frame", "share", ">=", L.min_share),
              ("field edge mostly missing", "share of the circle with an edge", "arc", ">=", L.min_arc),
              ("field larger than the frame", "circle diameter / frame", "diameter", "<=", L.max_diameter),
              ("no dark surround, an enhanced or processed image", "median brightness outside the field",
               "surround", "<=", L.max_surround),
              ("field edge not sharp", "brightness step at the edge", "edge_step", ">=", L.min_edge_step),
              ("too little of the field visible", "share of the fundus circle in the frame", "visible", ">=",
               L.min_visible)]
    if _colour_known(sc, L):
        checks.append(("an unusual colour for a retina", "red share", "red_share", ">=", L.min_red_share))
    if sc.get("diameter_px", 0) >= L.min_diameter and sc.get("clipped", 0.0) <= L.max_clipped:
        checks += [("out of focus", "fine-to-coarse detail", "focus", ">=", L.min_focus),
                   ("out of focus", "fine-to-coarse detail at 160 px", "focus_coarse", ">=", L.min_focus_coarse),
                   ("out of focus", "blur effect at the photo's own resolution", "blur", "<=", L.max_blur),
                   ("motion-blurred", "detail in the weakest direction / the strongest", "isotropy", ">=",
                    L.min_isotropy),
                   ("too noisy", "pixel noise / vessel-scale detail", "noise", "<=", L.max_noise),
                   ("blurred or enlarged, no fine grain", "pixel noise / vessel-scale detail", "noise", ">=",
                    L.min_grain),
                   ]
        if sc.get("diameter_px", 0) >= L.vessel_diameter:
            checks.append(("no vessel tree visible", "longest dark ridges / field diameter", "vessels", ">=",
                           L.min_vessels))
    return out + _failed(sc, checks)


def assess(image, *, ood: tuple[float, float] | None = None, trained_on: str | None = None,
           limits: Limits = LIMITS) -> Quality:
    """The gate's verdict on one decoded photograph (before Retino's preprocessing).

    Args:
        image: RGB uint8 array (H, W, 3) or a PIL image, decoded at >= ``GATE_MIN_SIDE`` px when
            the file has that many (the verdict is then the same whatever the decode size).
        ood: ``(score, cutoff)`` from :func:`ood_score` and the run's :func:`fit_ood` calibration.
        trained_on: what the model was trained on, named in its reason ("synthetic fundus images").
        limits: the thresholds (default :data:`LIMITS`).

    Returns:
        See :func:`judge`.
    """
    return judge(measure(image, limits), ood=ood, trained_on=trained_on, limits=limits)


def judge(scores: dict, *, ood: tuple[float, float] | None = None, trained_on: str | None = None,
          limits: Limits = LIMITS) -> Quality:
    """The verdict from :func:`measure`'s scores and, optionally, the model's out-of-distribution score.

    Returns:
        ``not_fundus`` with the photo's own reasons (its ungradable reasons are left out: they
        would describe something that is not a fundus; the model's reason follows when it agrees);
        else ``ungradable`` with the reasons it cannot be graded, the model's own among them
        ("unlike the photos this model was trained on": the model's view of its grade, not a
        claim about the photo); else ``ok``.
    """
    scores = dict(scores)
    photo = _not_fundus(scores, limits)
    model = []
    if ood is not None:
        score, cutoff = float(ood[0]), float(ood[1])
        scores.update(ood_score=score, ood_cutoff=cutoff)
        if score > cutoff:
            what = f" ({trained_on})" if trained_on else ""
            model.append(f"unlike the photos this model was trained on{what}: Mahalanobis distance "
                         f"{score:.1f}, cut-off {cutoff:.1f}")
    if photo:
        return Quality("not_fundus", photo + model, scores)
    reasons = _ungradable(scores, limits) + model
    return Quality("ungradable" if reasons else "ok", reasons, scores)
