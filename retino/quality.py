"""The quality gate: is a photograph a fundus at all, and can it be graded?

:func:`assess` looks at the decoded photograph (before Retino's preprocessing) and returns a
:class:`Quality`: ``not_fundus`` (no round, dark-surrounded, red fundus field; not graded),
``ungradable`` (a fundus, but too dark, over-exposed, out of focus, too small or too little of the
field in the frame; graded with the reasons beside the grade) or ``ok``. Every reason names the
measure, its value and the limit; every limit lives in :data:`LIMITS`.

The model's own view comes on top: :func:`fit_ood` fits a Mahalanobis-distance model to a run's
penultimate features (Lee et al. 2018, "A simple unified framework for detecting out-of-distribution
samples and adversarial attacks", https://arxiv.org/abs/1807.03888: class means, one shared
covariance) with a cut-off that passes 99% of the calibration photos (:mod:`retino.ood`; a run's
model is fitted at the end of training into ``ood.npz``), and ``assess(..., ood=...)`` adds its verdict.

The model's view alone never makes a photo ``not_fundus``: a photograph the photo's own measures
find to be a fundus, but that the model finds unlike its training photos, is ``ungradable`` *by
this model* (graded, with the reason beside the grade). The photo is a retina; what is in doubt is
the grade. A run trained on synthetic photos finds about half of real EyePACS photographs out of
its distribution (24 of the 50 of ``shared/real_fundus_sample`` when this gate was built), and
calling those "not a fundus photograph" would be false; the reason names the synthetic training set.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ANALYSIS_SIDE = 384     # px: the long side the field is looked for at (a few ms a photo)
FOCUS_DIAMETER = 160    # px: the fundus diameter focus is measured at, whatever the photo's size (see Limits)
GATE_MIN_SIDE = 256     # px: a photo decoded smaller than this for a small run (JPEG draft mode) ...
GATE_TARGET = 512       # ... is decoded again at this size for the gate: min_diameter needs >= 128 px of field
VERDICTS = ("ok", "ungradable", "not_fundus")


@dataclass(frozen=True)
class Limits:
    """Every threshold of the gate, with where its value comes from.

    "Synthetic" is ``make_dataset(n=400, size=256, degraded=0.2, seed=0)``: 320 good photos and 80
    degraded ones, 20 of each kind in ``DEGRADATIONS``; "real" is the 50 EyePACS photographs of
    ``shared/real_fundus_sample/train`` (decoded at >= 512 px), all gradable by eye. Ranges are
    min-max over those sets; "drawn" are the not-fundus pictures of ``tests/test_quality.py``.
    With these limits all 320 good synthetic and all 50 real photos pass, all 80 degraded ones fail
    with the reason of their kind.
    """

    # -- is it a fundus at all? (not_fundus)
    bright_level: float = 0.06
    """V = max(R, G, B) above which a pixel is in the field; real surrounds are <= 0.016 (JPEG
    noise on black). A dark photo's field is followed down to 35% of its 95th percentile ..."""
    dark_level: float = 0.025
    """... but never below this: above the noise of a black surround."""
    min_share: float = 0.15
    """Field area / frame: real 0.41-0.79, synthetic 0.58-0.75 (cut-off ones 0.28); a small
    bright object on black is not a fundus photograph (a drawn checkerboard's square: 0.005)."""
    min_roundness: float = 0.96
    """1 - median |edge distance - radius| / radius: real >= 0.97 (clipped rows and the rim's
    notch dropped by the trimmed fit), synthetic >= 0.99; a drawn face (4:3 ellipse) 0.90."""
    min_arc: float = 0.25
    """Share of the 72 five-degree sectors round the centre holding field edge away from the frame:
    real >= 0.54 (EyePACS circles clipped at top and bottom keep both sides), cut-off synthetic
    >= 0.33; a straight edge (a drawn gradient) 0.17."""
    max_diameter: float = 1.5
    """Fitted circle diameter / frame's short side: real 0.88-1.30, synthetic 0.86-0.98; a straight
    edge fits a huge circle (the drawn gradient: 2.1)."""
    max_surround: float = 0.08
    """Median V outside 1.1 radii: real <= 0.016, synthetic 0.0; photos of other things rarely
    have a black frame round a round object (scikit-image's astronaut: 0.60)."""
    min_edge_step: float = 0.5
    """Border sharpness: (median V at 0.88-0.96 R - at 1.04-1.12 R) / median V at 0.88-0.96 R:
    real >= 0.97, synthetic >= 0.98 (blurred ones included, as the aperture stays sharp)."""
    min_red_share: float = 0.34
    """Median R / (R + G + B) over unclipped pixels inside 0.9 R: real 0.36-0.70 (blue-grey casts
    exist: 75_right 0.356), synthetic 0.51-0.77; grey and white are 0.333. Not measured when more
    than 80% of the field is clipped (an over-exposed photo's colour is unreadable), nor on a
    grey-scale photo (min_saturation): a red-free fundus photograph has no red to show."""
    min_saturation: float = 0.04
    """Median (max - min) / max of R, G, B over the same pixels (HSV saturation): real >= 0.089
    (75_right's blue-grey cast), synthetic >= 0.36 (over-exposed ones); a grey-scale or red-free
    photo ~0 (JPEG chroma noise stays below 0.02). Below it the photo is ungradable, not
    'not a fundus': Retino's models grade colour photographs."""
    min_structure: float = 0.001
    """std of the sigma-3-px LoG of green / its median, at FOCUS_DIAMETER: real >= 0.0097,
    synthetic >= 0.075, over-exposed synthetic >= 0.0025; a uniform drawn disc 0.00007. Not applied
    to a field whose green is clipped (max_clipped): a white disc and a burnt-out fundus photo
    look the same, and both are called over-exposed."""
    # -- can it be graded? (ungradable)
    min_brightness: float = 0.1
    """Median luminance (Rec. 601) inside 0.9 R: real >= 0.153, synthetic >= 0.18; dark synthetic
    <= 0.07."""
    max_brightness: float = 0.9
    """Median luminance inside 0.9 R: real <= 0.854 (728_right, pale but crisp), synthetic <=
    0.64; over-exposed synthetic >= 0.96."""
    max_clipped: float = 0.3
    """Share of pixels inside 0.9 R with green clipped (>= 250): red clips on many good real
    photos, green on <= 2.4% of them; over-exposed synthetic >= 92%. Green carries the vessels."""
    min_focus: float = 0.13
    """var(LoG sigma 1 px) / var(LoG sigma 3 px) of green at FOCUS_DIAMETER: real >= 0.18, good
    synthetic >= 0.24; blurred synthetic <= 0.082, and the real photos blurred the same way <= 0.07."""
    min_visible: float = 0.75
    """Field area / fitted circle area: real >= 0.87 (EyePACS clips top and bottom), synthetic
    >= 0.99; cut-off synthetic <= 0.60."""
    min_diameter: int = 128
    """Fundus diameter in the photo as given, px: Retino's default working size. A 1024-px EyePACS
    photo decoded in JPEG draft mode for a 128-px run (load_image(target=128): 1/4 scale) gives a
    field of 150-165 px, which must pass; focus is then measured after upsampling the field <= 1.25x
    to FOCUS_DIAMETER (the sharp real photos still score >= 0.18). Below it no grader would see a
    microaneurysm (~1/100 of the disc)."""


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
    return a[..., :3]


def _fit_circle(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares circle through points (Kasa 1976): x^2 + y^2 = a x + b y + c, linear in a, b, c."""
    A = np.stack([x, y, np.ones_like(x)], 1)
    (a, b, c), *_ = np.linalg.lstsq(A, x * x + y * y, rcond=None)
    cx, cy = a / 2, b / 2
    return float(cx), float(cy), float(np.sqrt(max(c + cx * cx + cy * cy, 0.0)))


def _find_field(v: np.ndarray, L: Limits) -> dict | None:
    """The fundus field in V (max channel, [0, 1]) at analysis size: filled mask, circle and edge measures."""
    h, w = v.shape
    # a dark photo's field is dimmer than bright_level at its rim: follow it down to 35% of its bright end
    level = float(np.clip(0.35 * np.percentile(v[::4, ::4], 95), L.dark_level, L.bright_level))
    mask = (v > level).astype(np.uint8)
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
    # Trimmed refits: a few black rows above or below a clipped EyePACS circle, the notch on many
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
    resid = np.abs(np.hypot(pts[:, 0] - cx, pts[:, 1] - cy) - r) / r
    sectors = np.floor((np.arctan2(fit[:, 1] - cy, fit[:, 0] - cx) + np.pi) / (2 * np.pi) * 72).astype(int) % 72
    return {"filled": filled, "circle": (cx, cy, r), "roundness": 1.0 - float(np.median(resid)),
            "arc": len(np.unique(sectors)) / 72.0}


def _detail(rgb: np.ndarray, cx: float, cy: float, r: float) -> tuple[float, float]:
    """(focus, structure) of green inside 0.85 R, at a fundus diameter of FOCUS_DIAMETER px.

    structure: std of the scale-normalised Laplacian of Gaussian (sigma 3 px) / median green: how
    much there is to see at vessel scale at all (a blank disc has none). focus: var(LoG, sigma 1
    px) / var(the same sigma 3 px LoG): the variance of the Laplacian (Pech-Pacheco et al. 2000)
    at a fixed size, normalised by the energy at a coarser scale so that it depends neither on the
    photo's size nor on its brightness or vessel contrast (which differ a lot between cameras),
    only on how much of the detail survives at the finest scale.
    """
    s = FOCUS_DIAMETER / (2 * r)
    h, w = rgb.shape[:2]
    x0, x1 = max(0, int(cx - r)), min(w, int(np.ceil(cx + r)))
    y0, y1 = max(0, int(cy - r)), min(h, int(np.ceil(cy + r)))
    g = rgb[y0:y1, x0:x1, 1].astype(np.float32) / 255.0
    size = (max(1, round((x1 - x0) * s)), max(1, round((y1 - y0) * s)))
    g = cv2.resize(g, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    yy, xx = np.ogrid[0:g.shape[0], 0:g.shape[1]]
    inside = np.hypot(xx - (cx - x0) * s, yy - (cy - y0) * s) < 0.85 * r * s
    if inside.sum() < 50:
        return 0.0, 0.0
    fine = cv2.Laplacian(cv2.GaussianBlur(g, (0, 0), 1.0), cv2.CV_32F)[inside]
    coarse = 9.0 * cv2.Laplacian(cv2.GaussianBlur(g, (0, 0), 3.0), cv2.CV_32F)[inside]  # x sigma^2
    structure = float(np.std(coarse)) / max(float(np.median(g[inside])), 1 / 255)
    return float(np.var(fine) / max(float(np.var(coarse)), 1e-12)), structure


def measure(image, limits: Limits = LIMITS) -> dict[str, float]:
    """The gate's measures of one photograph (see :class:`Limits`); those it cannot take are absent."""
    rgb = _as_rgb(image)
    h0, w0 = rgb.shape[:2]
    scale = min(1.0, ANALYSIS_SIDE / max(h0, w0))
    small = np.ascontiguousarray(rgb)
    while max(small.shape[:2]) >= 2 * ANALYSIS_SIDE:   # halve with a Gaussian first: 3x faster than one
        small = cv2.pyrDown(small)                     # INTER_AREA resize by a fraction, same result to noise
    if scale < 1:
        small = cv2.resize(small, (round(w0 * scale), round(h0 * scale)), interpolation=cv2.INTER_AREA)
    r8, g8, b8 = cv2.split(small)
    v = cv2.max(cv2.max(r8, g8), b8).astype(np.float32) / 255.0    # (h, w) V = max(R, G, B) in [0, 1]
    h, w = v.shape
    field_ = _find_field(v, limits)
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
    scores["surround"] = float(np.median(v[outside])) if outside.sum() > 0.01 * h * w else 0.0
    ring_in, ring_out = v[(rho > 0.88) & (rho < 0.96)], v[(rho > 1.04) & (rho < 1.12)]
    if ring_in.size and ring_out.size:
        inner = float(np.median(ring_in))
        scores["edge_step"] = (inner - float(np.median(ring_out))) / max(inner, 1e-3)
    disc = (rho < 0.9) & (filled > 0)
    if disc.sum() < 50:
        return scores
    red, green, blue = (c[disc].astype(np.float32) for c in (r8, g8, b8))   # (N,) each: the field's pixels
    scores["brightness"] = float(np.median(0.299 * red + 0.587 * green + 0.114 * blue)) / 255.0
    scores["clipped"] = float(np.mean(green >= 250))
    top = v[disc]
    usable = (top < 250 / 255) & (top > 0.03)
    if usable.mean() > 0.2:                                     # colour is unreadable in a clipped photo
        total = red[usable] + green[usable] + blue[usable]
        scores["red_share"] = float(np.median(red[usable] / total))
        low = np.minimum(np.minimum(red[usable], green[usable]), blue[usable])
        scores["saturation"] = float(np.median(1.0 - low / (top[usable] * 255.0)))
    # the analysis image holds a field of >= FOCUS_DIAMETER px whenever the photo does
    scores["focus"], scores["structure"] = _detail(small, cx, cy, r)
    return scores


# ----------------------------------------------------------------------------- the verdict

def _reason(what: str, measure: str, value: float, op: str, limit: float) -> str:
    return f"{what}: {measure} {value:.3g}, need {op} {limit:.3g}"


def _not_fundus(sc: dict, L: Limits) -> list[str]:
    """Reasons the photo itself gives for not being a fundus photograph (empty: it looks like one)."""
    if "share" not in sc:
        return [f"no fundus field: nothing brighter than {L.dark_level:.3f} on the photo"]
    if "roundness" not in sc:   # fewer than 20 edge pixels away from the frame: nothing round to fit
        return [f"no round fundus field on a dark background: the bright area covers "
                f"{'under 1%' if sc['share'] < 0.01 else format(sc['share'], '.0%')} of the frame and its edge is the frame's"]
    out = []
    checks = [("no round fundus edge", "share of the circle with an edge", "arc", ">=", L.min_arc),
              ("no round fundus field", "circle diameter / frame", "diameter", "<=", L.max_diameter),
              ("field not round", "roundness", "roundness", ">=", L.min_roundness),
              ("fundus field too small", "share of the frame", "share", ">=", L.min_share),
              ("no dark surround", "median brightness outside the field", "surround", "<=", L.max_surround),
              ("field edge not sharp", "brightness step at the edge", "edge_step", ">=", L.min_edge_step),
              ("not the colour of a retina", "red share", "red_share", ">=", L.min_red_share),
              ("a blank field, no retina to see", "structure", "structure", ">=", L.min_structure)]
    if sc.get("clipped", 0.0) > L.max_clipped:
        checks.pop()    # a burnt-out field is blank too: over-exposed (ungradable), not proof of no retina
    if sc.get("saturation", 1.0) < L.min_saturation:
        checks = [c for c in checks if c[2] != "red_share"]    # grey-scale: no colour to judge (ungradable)
    for what, measure_, key, op, limit in checks:
        if key in sc and (sc[key] < limit if op == ">=" else sc[key] > limit):
            out.append(_reason(what, measure_, sc[key], op, limit))
    return out


def _ungradable(sc: dict, L: Limits) -> list[str]:
    """Reasons a fundus photograph cannot be graded."""
    out = []
    if sc.get("diameter_px", np.inf) < L.min_diameter:
        out.append(f"fundus too small to grade: {sc['diameter_px']:.0f} px across, need >= {L.min_diameter}")
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
    if "focus" in sc and sc.get("diameter_px", 0) >= L.min_diameter and sc["focus"] < L.min_focus:
        out.append(_reason("out of focus", "fine-to-coarse detail", sc["focus"], ">=", L.min_focus))
    if "visible" in sc and sc["visible"] < L.min_visible:
        out.append(_reason("too little of the field visible", "share of the fundus circle in the frame",
                           sc["visible"], ">=", L.min_visible))
    return out


def assess(image, *, ood: tuple[float, float] | None = None, trained_on: str | None = None,
           limits: Limits = LIMITS) -> Quality:
    """The gate's verdict on one decoded photograph (before Retino's preprocessing).

    Args:
        image: RGB uint8 array (H, W, 3) or a PIL image: the photo as prediction decodes it
            (``load_image(src, target=image_size)`` with image_size >= 128 keeps a field of
            >= ``min_diameter`` px; smaller decodes are redone at ``GATE_TARGET``). Focus is best
            judged on a field of >= 300 px, where the sensor's noise is averaged away before the measure.
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


# the model's own view lives in retino.ood; its names are kept here for the callers of the first version
from .ood import (features_of, fit_ood, fit_run_ood, is_ood, load_ood, ood_score,  # noqa: E402,F401
                  penultimate_features, read_run_ood, save_ood)
