"""Screening throughput: ``retino.screening.screen`` against the one-photo-at-a-time ``predict`` loop.

Both grade the same photos with the same model at the run's image size (default 512 px, a freshly
initialised ResNet-18 saved as a run: the time does not depend on the weights):

  predict loop  ``predict(trained, [photo])`` for each photo in turn, the model loaded once (the
                fastest way to grade photos one at a time; the Predict page and the predict verb)
  screen        ``screen(run, folder, workers=0, batch_size=B)`` (the default on 2 cores): decoding and
                the quality gate here, the forward pass in batches of B with BatchNorm folded and
                channels_last; timed from the call to the written reports
  screen, W decoding processes   the same with ``workers=W`` (spawn start-up included)
  screen, no gate   in-process, without ``retino.inference.quality.assess`` (predict has no gate)

and, for scale, the predict loop given the run folder each call (the checkpoint loaded every time,
as separate ``predict`` calls on a run folder do), timed on a quarter of the photos.

Photos: the real EyePACS sample (``../shared/real_fundus_sample/train``, 50 photos of 1024 px)
where it exists, else synthetic fundus JPEGs at 1024 px. The loop and the screen must agree: the
largest probability difference between them is printed. Usage::

    python bench/screen.py [--quick] [--json] [--size 512] [--n 16] [--rounds 5] [--batch-size 16] [--workers W]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retino import runs  # noqa: E402
from retino.config import TrainConfig  # noqa: E402
from retino.inference.trained import load_trained  # noqa: E402
from retino.models import build_model, normalization  # noqa: E402
from retino.inference.predict import predict  # noqa: E402
from retino.screening.screen import screen  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "real_fundus_sample" / "train"


def fresh_run(run_dir: Path, *, size: int, arch: str) -> Path:
    """A completed run folder holding a freshly initialised model, saved as training saves one."""
    cfg = TrainConfig(image_size=size, arch=arch)
    torch.manual_seed(0)
    model = build_model(cfg.arch, pretrained=False, head=cfg.head).eval()
    norm = normalization(cfg.arch, False)
    run_dir.mkdir(parents=True)
    runs.write_config(run_dir, cfg.to_dict(), dataset={}, norm=norm, world=1, device="cpu", data_fingerprint="")
    runs.save_checkpoint(run_dir / "best.pt", {"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 1,
                                               "thresholds": [0.5, 1.5, 2.5, 3.5],
                                               "norm": {"mean": list(norm[0]), "std": list(norm[1])}})
    runs.write_status(run_dir, state="completed")
    return run_dir


def photo_folder(tmp: Path, n: int, synthetic: bool) -> tuple[Path, str]:
    """``n`` photos in a folder of their own: the real sample where present, else synthetic 1024 px JPEGs."""
    folder = tmp / "photos"
    folder.mkdir()
    real = sorted(REAL.glob("*.jpeg")) if REAL.is_dir() and not synthetic else []
    if real:
        for path in real[:n]:
            shutil.copy(path, folder / path.name)
        return folder, f"real EyePACS sample ({min(n, len(real))} photos, {REAL})"
    from PIL import Image
    from retino.data.synthetic import render_fundus
    for i in range(n):
        rgb, _ = render_fundus(i % 5, eye="left" if i % 2 else "right", size=1024, seed=i)
        Image.fromarray(rgb).save(folder / f"{i // 2}_{'left' if i % 2 else 'right'}.jpeg", quality=90)
    return folder, f"synthetic 1024 px JPEGs ({n})"


def measure(paths, run, trained, folder, tmp: Path, *, batch_size: int, workers: int) -> dict:
    """Seconds each way takes for the same photos (in turn, so each meets the same load), and the
    largest probability difference between the screen and the predict loop."""
    t = {}
    t0 = time.perf_counter()
    loop = [predict(trained, [path])[0] for path in paths]
    t["predict_loop"] = time.perf_counter() - t0
    quarter = max(1, len(paths) // 4)  # the reloading loop only adds the load to the loop above
    t0 = time.perf_counter()
    for path in paths[:quarter]:
        predict(run, [path])
    t["predict_loop_reloading"] = (time.perf_counter() - t0) * len(paths) / quarter
    for name, kw in (("screen", {"workers": 0}), ("screen_workers", {"workers": workers}),
                     ("screen_no_gate", {"workers": 0, "quality_gate": False})):
        t0 = time.perf_counter()
        result = screen(run, folder, tmp / f"{name}-{time.monotonic_ns()}.csv", batch_size=batch_size, **kw)
        t[name] = time.perf_counter() - t0
        if name == "screen":
            rows = result.photos.set_index("image")
            diff = max(float(np.abs(rows.loc[path.name, [f"p{g}" for g in range(5)]].to_numpy(float)
                                    - np.asarray(pred.probs)).max()) for path, pred in zip(paths, loop) if pred.ok)
    return {"seconds": t, "max_prob_diff": diff}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="8 photos, one round (about a minute on 2 busy cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--size", type=int, default=512, help="the run's image size")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--n", type=int, default=16, help="photos")
    p.add_argument("--rounds", type=int, default=5, help="rounds, every way once a round; medians are kept")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes of the 'screen, W workers' row (default: cores - 1)")
    p.add_argument("--synthetic", action="store_true", help="synthetic photos even where the real sample exists")
    args = p.parse_args(argv)
    n, rounds = (8, 1) if args.quick else (args.n, args.rounds)
    workers = max(1, (os.cpu_count() or 2) - 1) if args.workers is None else args.workers
    rows = {"predict_loop": "predict loop (model loaded once)",
            "predict_loop_reloading": "predict loop (run folder each call)",
            "screen": "screen, decoding in-process (default here)",
            "screen_workers": f"screen, {workers} decoding process{'es' if workers > 1 else ''}",
            "screen_no_gate": "screen in-process, no quality gate"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = fresh_run(tmp / "run", size=args.size, arch=args.arch)
        folder, source = photo_folder(tmp, n, args.synthetic)
        paths = sorted(folder.iterdir())
        trained = load_trained(run)
        predict(trained, [paths[0]])  # warm-up: first-call allocations and oneDNN kernel selection
        results = [measure(paths, run, trained, folder, tmp / "reports", batch_size=args.batch_size, workers=workers)
                   for _ in range(rounds)]
    rates = {k: [n / r["seconds"][k] for r in results] for k in rows}
    # the ratio within each round (both met the same load from other jobs), then the median over rounds
    ratios = {k: [r["seconds"]["predict_loop"] / r["seconds"][k] for r in results] for k in rows}
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
           "photos": source, "n": n, "rounds": rounds, "image_size": args.size, "arch": args.arch,
           "batch_size": args.batch_size, "workers": workers,
           "img_s": {k: float(np.median(v)) for k, v in rates.items()},
           "x_predict_loop": {k: float(np.median(v)) for k, v in ratios.items()},
           "img_s_rounds": rates, "max_prob_diff": max(r["max_prob_diff"] for r in results)}
    out["speedup"] = out["x_predict_loop"]["screen"]
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{out['machine']}; {source}; {args.arch} at {args.size} px, batch {args.batch_size}; medians of "
          f"{rounds} round{'s' if rounds > 1 else ''} (img/s each round in brackets)")
    for k, label in rows.items():
        each = " ".join(f"{v:.2f}" for v in rates[k])
        print(f"  {label:<44} {out['img_s'][k]:6.2f} img/s  x{out['x_predict_loop'][k]:.2f}   ({each})")
    print(f"  largest probability difference, screen vs predict: {out['max_prob_diff']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
