"""How well and how fast the quality gate (retino.inference.quality.assess) sorts photographs.

  accuracy   on a synthetic set with degraded photos (``make_dataset(degraded=...)``): recall on the
             degraded ones (called ungradable or not_fundus), with the reason of their kind, and
             the false-alarm rate on the good ones, against ``quality.csv``
  measures   min-max of every score by kind: where the limits in ``retino.inference.quality.Limits`` sit
  real       the verdict on every photo of ../shared/real_fundus_sample/train, when present
  speed      CPU ms per photo for ``assess`` on the decoded array, against the JPEG decode of the
             same photo (``load_image``) measured in the same run: the gate's cost as a ratio

Usage::

    python bench/quality_gate.py [--n 400] [--size 256] [--degraded 0.2] [--seed 0] [--out DIR]
"""
from __future__ import annotations

import argparse
import collections
import csv
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retino.data.preprocess import load_image  # noqa: E402
from retino.data.synthetic import make_dataset  # noqa: E402
from retino.inference.quality import assess  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "real_fundus_sample" / "train"
REASON = {"dark": "too dark", "blurred": "out of focus", "overexposed": "over-exposed",
          "cut_off": "too little of the field visible"}


def _timed(fn, *args, **kw):
    t = time.process_time()
    out = fn(*args, **kw)
    return out, time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--degraded", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="data-set folder (default: a temporary one)")
    args = ap.parse_args()
    cv2.setNumThreads(1)     # CPU time of one photo on one core
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"opencv {cv2.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        root = make_dataset(Path(args.out or tmp) / "synthetic", n=args.n, size=args.size, seed=args.seed,
                            degraded=args.degraded, progress=False)
        rows = list(csv.DictReader(open(root / "quality.csv")))
        conf, right, ranges = collections.Counter(), collections.Counter(), collections.defaultdict(dict)
        t_gate = t_decode = 0.0
        for r in rows:
            img, dt = _timed(load_image, root / "images" / f"{r['image']}.jpeg")
            q, gt = _timed(assess, np.asarray(img))
            t_decode, t_gate = t_decode + dt, t_gate + gt
            kind = r["reason"] or "ok"
            conf[(kind, q.verdict)] += 1
            right[kind] += kind != "ok" and any(x.startswith(REASON[kind]) for x in q.reasons)
            for k, v in q.scores.items():
                lo, hi = ranges[k].get(kind, (np.inf, -np.inf))
                ranges[k][kind] = (min(lo, v), max(hi, v))
    kinds = ["ok", *REASON]
    print(f"\nsynthetic n={args.n} size={args.size} degraded={args.degraded} seed={args.seed}")
    for k in kinds:
        n = sum(conf[(k, v)] for v in ("ok", "ungradable", "not_fundus"))
        print(f"  {k:12s} {n:4d}  ok {conf[(k, 'ok')]:4d}  ungradable {conf[(k, 'ungradable')]:4d}  "
              f"not_fundus {conf[(k, 'not_fundus')]:4d}" + (f"  right reason {right[k]}" if k != "ok" else ""))
    bad = sum(conf[(k, v)] for k in REASON for v in ("ok", "ungradable", "not_fundus"))
    caught = sum(conf[(k, v)] for k in REASON for v in ("ungradable", "not_fundus"))
    good = sum(conf[("ok", v)] for v in ("ok", "ungradable", "not_fundus"))
    if bad:
        print(f"  recall on degraded {caught}/{bad} = {caught / bad:.3f}")
    if good:
        print(f"  false alarms on good {good - conf[('ok', 'ok')]}/{good} = {1 - conf[('ok', 'ok')] / good:.3f}")
    print("\nmeasures, min..max by kind")
    for key in sorted(ranges):
        print(f"  {key:12s} " + "  ".join(f"{k} {ranges[key][k][0]:.3g}..{ranges[key][k][1]:.3g}"
                                          for k in kinds if k in ranges[key]))
    print(f"\nspeed: assess {t_gate / len(rows) * 1e3:.1f} ms CPU per {args.size}-px photo, "
          f"{t_gate / max(t_decode, 1e-9):.2f}x its JPEG decode")
    if REAL.is_dir():
        files = sorted(REAL.glob("*.jpeg"))
        verdicts = collections.Counter()
        t_gate = t_decode = 0.0
        for f in files:
            img, dt = _timed(load_image, f, target=512)
            q, gt = _timed(assess, img)
            t_decode, t_gate = t_decode + dt, t_gate + gt
            verdicts[q.verdict] += 1
            if q.verdict != "ok":
                print(f"  {f.name}: {q.verdict}: {'; '.join(q.reasons)}")
        print(f"\nreal sample: {dict(verdicts)} of {len(files)}; assess {t_gate / len(files) * 1e3:.1f} ms CPU "
              f"per photo decoded at >= 512 px, {t_gate / max(t_decode, 1e-9):.2f}x its decode")


if __name__ == "__main__":
    main()
