"""How long predict + Grad-CAM take for one photograph, after the model is loaded.

For ResNet-18 and ResNet-50 at 512 px (random weights: the time does not depend on them) it times,
after a warm-up, the best (and the median) of N repetitions of:

  forward    a plain forward pass of one preprocessed (1, 3, 512, 512) tensor (the baseline)
  predict    ``retino.inference.predict.predict``: decode a ~1 MP JPEG, crop, resize, normalise, forward
  explain    ``retino.inference.explain.explain`` with Grad-CAM on that prediction (forward + backward to layer4)
  total      predict + explain, what the Predict page does for one photo
  cam_full   pytorch-grad-cam without explain's cut at the target layer (backward through every weight)

and the ratio of total to the forward pass. Usage::

    python bench/predict_cam.py [--quick] [--json] [--reps N] [--size 512] [--image PHOTO]
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retino.inference import explain as ex  # noqa: E402
from retino.config import TrainConfig  # noqa: E402
from retino.inference.trained import Trained  # noqa: E402
from retino.inference.predict import predict as predict_photos  # noqa: E402
from retino.models import build_model, normalization  # noqa: E402


def photo_bytes(path: str | None) -> bytes:
    """The photo to grade: ``path``, or a synthetic 1024 px grade-3 fundus as a JPEG."""
    if path:
        return Path(path).read_bytes()
    from PIL import Image
    from retino.data.synthetic import render_fundus
    rgb, _ = render_fundus(3, size=1024, seed=1)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def timings(fn, reps: int) -> tuple[float, float]:
    """(best, median) seconds of ``reps`` calls after a warm-up. The best is what the code costs;
    the median shows how much a busy machine (other jobs on the same 2 cores) added."""
    fn()  # warm-up: first-call allocations and oneDNN kernel selection
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def bench_arch(arch: str, size: int, photo: bytes, reps: int) -> dict:
    torch.manual_seed(0)
    model = build_model(arch).eval()
    trained = Trained(model, TrainConfig(arch=arch, image_size=size), normalization(arch, False),
                      [0.5, 1.5, 2.5, 3.5], 0, Path("."))
    x = torch.randn(1, 3, size, size)

    def forward():
        with torch.inference_mode():
            model(x)

    def predict():
        return predict_photos(trained, [photo])[0]

    pred = predict()
    assert pred.ok, pred.error

    def explain():
        ex.explain(trained, pred, method="gradcam")

    def total():
        ex.explain(trained, predict_photos(trained, [photo])[0], method="gradcam")

    def cam_full():
        with ex.GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
            cam(input_tensor=x, targets=[ex.ClassifierOutputTarget(3)])

    out = {name: timings(fn, reps) for name, fn in
           [("forward", forward), ("predict", predict), ("explain", explain), ("total", total),
            ("cam_full", cam_full)]}
    return {"arch": arch, "image_size": size, "reps": reps,
            **{f"{k}_s": round(best, 4) for k, (best, _) in out.items()},
            **{f"{k}_median_s": round(med, 4) for k, (_, med) in out.items()},
            **{f"{k}_vs_forward": round(best / out["forward"][0], 2) for k, (best, _) in out.items() if k != "forward"}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 repetitions instead of --reps")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--image", help="a photograph to grade (default: a synthetic 1024 px fundus)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    reps = 3 if args.quick else args.reps
    photo = photo_bytes(args.image)
    results = [bench_arch(arch, args.size, photo, reps) for arch in ("resnet18", "resnet50")]
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine()}
    if args.json:
        print(json.dumps({"env": env, "results": results}, indent=1))
        return 0
    print(f"torch {env['torch']}, {env['threads']} threads, {args.size} px; best of {reps} after a warm-up "
          "(median in brackets)")
    names = ("forward", "predict", "explain", "total", "cam_full")
    print(f"{'arch':<10}" + "".join(f"{n:>17}" for n in names) + "   total/forward")
    for r in results:
        cells = "".join(f"{r[n + '_s']:>7.3f}s ({r[n + '_median_s']:.3f})" for n in names)
        print(f"{r['arch']:<10}{cells}   {r['total_vs_forward']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
