"""Does the quality gate say what it means? Its verdicts on fundus photos, damaged ones and others.

Sets (every picture is made here; nothing is copied into the repository):

  synthetic      ``make_dataset(degraded=...)``: good photos (``ok``) and dark / blurred / over-exposed /
                 cut-off ones (``damaged``), as ``python -m retino synth --degraded`` writes them
  real           the shared EyePACS photos (``--real``), decoded at ``quality.GATE_TARGET``
  enhanced       variants of each: CLAHE, green boost, gamma 0.6 and 1.6, JPEG quality 30, the field's
                 bounding box resized to 256 px, Ben Graham's local-average subtraction (2015)
  real damaged   each real photo blurred (sigma 3 px at 1024 px, and 8 px), with heavy noise, with a
                 41-px motion blur
  not fundus     scikit-image's bundled photos as they are and cropped into a circle on black, text,
                 noise, flat colours, a textured red-orange disc with and without a bright spot, text
                 in a red disc, and scikit-image's retina blurred / noisy (``damaged``)

Split: a photo belongs to the tuning part or the held-out part by a seeded hash of its name (its
variants follow it); the limits in ``retino.inference.quality.Limits`` were set looking at the tuning part
only. The table gives counts per set and verdict for both parts; the rates are on the held-out part.

Usage::

    python bench/gate_eval.py [--real /work/shared/real_fundus_sample] [--n 200] [--seed 0] [--limit N]
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import io
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retino.inference import quality  # noqa: E402
from retino.data.preprocess import load_image  # noqa: E402
from retino.data.synthetic import make_dataset  # noqa: E402

VERDICTS = ("ok", "ungradable", "not_fundus")


def held_out(name: str, seed: int) -> bool:
    """The fixed half a picture belongs to: a seeded hash of its name, not its content."""
    return hashlib.sha256(f"{seed}:{name}".encode()).digest()[0] % 2 == 1


# ----------------------------------------------------------------------------- variants of a fundus photo

def _field_box(rgb: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(rgb.max(2) > 20)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def ben_graham(rgb: np.ndarray, radius: int = 300) -> np.ndarray:
    """Ben Graham's Kaggle DR preprocessing (2015): rescale to a field radius, subtract the local
    average colour (x4, + 128), keep the inner 90% of the field on grey."""
    x0, _, x1, _ = _field_box(rgb)
    s = radius / ((x1 - x0) / 2)
    a = cv2.resize(rgb, None, fx=s, fy=s, interpolation=cv2.INTER_AREA).astype(np.float32)
    a = cv2.addWeighted(a, 4, cv2.GaussianBlur(a, (0, 0), radius / 30), -4, 128)
    m = np.zeros(a.shape[:2], np.uint8)
    cv2.circle(m, (a.shape[1] // 2, a.shape[0] // 2), int(radius * 0.9), 1, -1)
    return np.clip(a * m[..., None] + 128 * (1 - m[..., None]), 0, 255).astype(np.uint8)


def _jpeg(rgb: np.ndarray, q: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=q)
    return np.asarray(Image.open(buf).convert("RGB"))


def _clahe(rgb: np.ndarray) -> np.ndarray:
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    lab[..., 0] = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(lab[..., 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def _gamma(rgb: np.ndarray, g: float) -> np.ndarray:
    return cv2.LUT(rgb, (255 * (np.arange(256) / 255) ** g).astype(np.uint8))


def _crop256(rgb: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = _field_box(rgb)
    side = max(x1 - x0, y1 - y0)
    pad = np.zeros((side, side, 3), np.uint8)
    crop = rgb[y0:y1, x0:x1]
    oy, ox = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    pad[oy:oy + crop.shape[0], ox:ox + crop.shape[1]] = crop
    return cv2.resize(pad, (256, 256), interpolation=cv2.INTER_AREA)


ENHANCED = {
    "clahe": _clahe,
    "green boost": lambda a: np.clip(a.astype(np.float32) * [1.0, 1.5, 1.0], 0, 255).astype(np.uint8),
    "gamma 0.6": lambda a: _gamma(a, 0.6),
    "gamma 1.6": lambda a: _gamma(a, 1.6),
    "jpeg 30": lambda a: _jpeg(a, 30),
    "crop 256": _crop256,
    "ben graham": ben_graham,
}


def _motion(rgb: np.ndarray, n: int = 41) -> np.ndarray:
    k = np.zeros((n, n), np.float32)
    k[n // 2] = 1 / n
    return cv2.filter2D(rgb, -1, k)


def _noisy(rgb: np.ndarray, sd: float = 40, seed: int = 0) -> np.ndarray:
    return np.clip(rgb + np.random.default_rng(seed).normal(0, sd, rgb.shape), 0, 255).astype(np.uint8)


DAMAGED = {
    "blur 3": lambda a: cv2.GaussianBlur(a, (0, 0), 3),
    "blur 8": lambda a: cv2.GaussianBlur(a, (0, 0), 8),
    "noise 40": _noisy,
    "motion 41": _motion,
}


# ----------------------------------------------------------------------------- pictures that are not fundus photos

def in_circle(img: np.ndarray) -> np.ndarray:
    """A picture cropped into a centred circle on black: the shape of a fundus photo, none of its content."""
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, 2)
    img = np.ascontiguousarray(img[..., :3])
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    m = np.zeros((s, s), np.uint8)
    cv2.circle(m, (s // 2, s // 2), int(s * 0.46), 1, -1)
    return img * m[..., None]


def textured_disc(spot: bool = False, seed: int = 0, size: int = 512) -> np.ndarray:
    """A red-orange disc on black with a fundus-like grain and no vessels (and a bright 'optic disc')."""
    rng = np.random.default_rng(seed)
    tex = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 3)
    img = np.clip(np.array([200, 90, 40], np.float32) * (1 + 0.12 * (tex / tex.std())[..., None]), 0, 255)
    m = np.zeros((size, size), np.uint8)
    cv2.circle(m, (size // 2, size // 2), int(size * 0.46), 1, -1)
    img = (img * m[..., None]).astype(np.uint8)
    if spot:
        cv2.circle(img, (size * 2 // 3, size // 2), size // 14, (255, 230, 180), -1, cv2.LINE_AA)
    return img


def text_in_red_disc(size: int = 512) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8)
    cv2.circle(img, (size // 2, size // 2), int(size * 0.46), (200, 90, 40), -1, cv2.LINE_AA)
    for i in range(8):
        cv2.putText(img, "Lorem ipsum", (size // 8, size // 5 + i * size // 11), cv2.FONT_HERSHEY_SIMPLEX,
                    size / 430, (90, 30, 10), 2, cv2.LINE_AA)
    return img


def not_fundus(seed: int = 0) -> dict[str, np.ndarray]:
    """The non-fundus pictures, by name."""
    from skimage import data
    rng = np.random.default_rng(seed)
    out = {}
    for name in ("chelsea", "coffee", "astronaut", "camera", "rocket", "immunohistochemistry", "hubble_deep_field",
                 "moon", "brick", "grass", "gravel", "horse", "colorwheel", "page", "text", "cell", "logo"):
        img = np.asarray(getattr(data, name)())
        img = img.astype(np.uint8) if img.dtype == bool or img.max() <= 1 and img.dtype != np.uint8 else img
        if img.dtype != np.uint8:
            img = (255 * (img > 0)).astype(np.uint8) if img.dtype == bool else np.clip(img, 0, 255).astype(np.uint8)
        out[name] = np.ascontiguousarray(np.repeat(img[..., None], 3, 2) if img.ndim == 2 else img[..., :3])
        out[f"{name} in a circle"] = in_circle(img)
    out["noise"] = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    out["noise in a circle"] = in_circle(out["noise"])
    for colour in ((255, 255, 255), (0, 0, 0), (128, 128, 128), (200, 90, 40), (40, 90, 200)):
        out[f"flat {colour}"] = np.full((400, 500, 3), colour, np.uint8)
    for s in range(3):
        out[f"textured red disc {s}"] = textured_disc(seed=s)
        out[f"textured red disc with a spot {s}"] = textured_disc(spot=True, seed=s)
    out["text in a red disc"] = text_in_red_disc()
    return out


# ----------------------------------------------------------------------------- the evaluation

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", default="/work/shared/real_fundus_sample", help="folder of real fundus photos")
    ap.add_argument("--n", type=int, default=200, help="synthetic photos")
    ap.add_argument("--degraded", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0, help="of the split and the synthetic set")
    ap.add_argument("--limit", type=int, default=0, help="only the first N real photos (a quick look)")
    ap.add_argument("--show", action="store_true", help="print every wrong verdict with its reasons")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    print(f"machine: {platform.machine()} {platform.processor()}, python {platform.python_version()}, "
          f"opencv {cv2.__version__}; split seed {args.seed}")
    rows = []       # (set, expected, name, held_out, verdict, reasons)
    ranges = collections.defaultdict(dict)      # score -> (set, expected) -> (min, max), tuning part only
    t0 = time.time()

    def judge(set_, expected, name, img, part_name=None):
        q = quality.assess(img)
        part = held_out(part_name or name, args.seed)
        rows.append((set_, expected, name, part, q.verdict, q.reasons))
        for k, v in q.scores.items():
            lo, hi = ranges[k].get((set_, expected, part), (np.inf, -np.inf))
            ranges[k][(set_, expected, part)] = (min(lo, v), max(hi, v))

    with tempfile.TemporaryDirectory() as tmp:
        root = make_dataset(Path(tmp) / "s", n=args.n, size=256, seed=args.seed, degraded=args.degraded,
                            progress=False)
        for line in (root / "quality.csv").read_text().splitlines()[1:]:
            name, q, kind = line.split(",")
            judge("synthetic", "ok" if q == "ok" else "damaged", f"{name} {kind}",
                  np.asarray(load_image(root / "images" / f"{name}.jpeg")))
    files = sorted(p for p in Path(args.real).rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    files = files[:args.limit] if args.limit else files
    for f in files:
        judge("real", "ok", f.name, np.asarray(load_image(f, target=quality.GATE_TARGET)))
        big = np.asarray(load_image(f, target=1024))
        for kind, make in ENHANCED.items():
            judge("enhanced", "fundus", f"{f.name} {kind}", make(big), f.name)
        for kind, make in DAMAGED.items():
            judge("real damaged", "damaged", f"{f.name} {kind}", make(big), f.name)
    for name, img in not_fundus(args.seed).items():
        judge("not fundus", "not_fundus", name, img)
    from skimage import data
    retina = data.retina()
    judge("retina (skimage)", "ok", "retina", retina)
    for kind, make in {**DAMAGED, "blur 4": lambda a: cv2.GaussianBlur(a, (0, 0), 4),
                       "blur 12": lambda a: cv2.GaussianBlur(a, (0, 0), 12)}.items():
        judge("retina (skimage)", "damaged", f"retina {kind}", make(retina))
    seconds = time.time() - t0

    print(f"\n{len(rows)} pictures in {seconds:.0f} s ({seconds / len(rows) * 1e3:.0f} ms each, decode included)\n")
    print(f"{'set':18s} {'expected':11s} {'part':9s} {'n':>4s} " + " ".join(f"{v:>10s}" for v in VERDICTS))
    table = collections.Counter((r[0], r[1], r[3], r[4]) for r in rows)
    for set_, expected in dict.fromkeys((r[0], r[1]) for r in rows):
        for part in (False, True):
            n = sum(table[(set_, expected, part, v)] for v in VERDICTS)
            if n:
                print(f"{set_:18s} {expected:11s} {'held-out' if part else 'tuning':9s} {n:4d} "
                      + " ".join(f"{table[(set_, expected, part, v)]:10d}" for v in VERDICTS))

    def rate(select, good, part=True):
        pick = [r for r in rows if select(r) and r[3] == part]
        hits = sum(good(r) for r in pick)
        return f"{hits}/{len(pick)} = {hits / len(pick):.3f}" if pick else "n/a"

    fundus = lambda r: r[1] in ("ok", "fundus") or r[0] in ("real damaged",) or "retina" in r[2]  # noqa: E731
    print("\nheld-out part (tuning part in brackets):")
    for label, sel, good in [
            ("false refusal: fundus called not_fundus", fundus, lambda r: r[4] == "not_fundus"),
            ("clean real photos called ungradable", lambda r: r[0] == "real", lambda r: r[4] == "ungradable"),
            ("enhanced photos called ungradable", lambda r: r[0] == "enhanced", lambda r: r[4] == "ungradable"),
            ("clean synthetic called not ok", lambda r: r[0] == "synthetic" and r[1] == "ok", lambda r: r[4] != "ok"),
            ("recall: non-fundus called not_fundus", lambda r: r[1] == "not_fundus", lambda r: r[4] == "not_fundus"),
            ("recall: non-fundus refused (not ok)", lambda r: r[1] == "not_fundus", lambda r: r[4] != "ok"),
            ("recall: damaged photos not ok", lambda r: r[1] == "damaged", lambda r: r[4] != "ok")]:
        print(f"  {label:42s} {rate(sel, good):>18s}   ({rate(sel, good, False)})")
    if args.show:
        print("\nmeasures, min..max by set (tuning part)")
        for key in sorted(ranges):
            print(f"  {key:14s} " + "  ".join(f"{s_}/{e[:3]} {lo:.3g}..{hi:.3g}"
                                            for (s_, e, part), (lo, hi) in ranges[key].items() if not part))
        print("\nverdicts that differ from the expected ones:")
        for set_, expected, name, part, verdict, reasons in rows:
            wrong = (verdict == "not_fundus" and expected != "not_fundus") or (expected == "not_fundus" and verdict == "ok") \
                or (expected == "damaged" and verdict == "ok") or (expected in ("ok", "fundus") and verdict != "ok")
            if wrong:
                print(f"  [{'held-out' if part else 'tuning'}] {set_}: {name}: {verdict}: {'; '.join(reasons)}")


if __name__ == "__main__":
    main()
