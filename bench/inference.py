"""Inference engines on this CPU, Screen end to end, and where one photo's time goes.

Three sections, all measured in one run on this machine (random weights: the time does not depend on them):

  engines     images/s of one forward pass of ResNet-18 and ResNet-50 at the run's size, batch 1 and 8,
              for every engine that imports here:
                eager          the model as loaded (NCHW), the baseline
                channels_last  the same model and input in channels_last
                torch fast     Screen's previous path: ``TorchEngine(fast=True)`` (BatchNorm folded, channels_last)
                jit frozen     ``torch.jit.freeze(torch.jit.trace(model))``
                onnxruntime    the file ``retino.inference.engine.export_onnx`` writes, in ``OnnxEngine``
                openvino       the same .onnx file compiled by OpenVINO for the CPU, when it imports
              Each round times every engine once, in an order rotated round by round, so load from other
              jobs hits them alike; ratios are taken within a round and the median over rounds kept.
              The largest output difference from eager on the same input is printed beside each.
  end to end  Screen (default engine, batch 16) against Screen with ``engine="torch"`` and against the
              one-photo ``predict`` loop (model loaded once, default engine), on the same photos (the 50
              real EyePACS photos of ../shared/real_fundus_sample when present, else synthetic), with a fresh
              run folder; and Screen's decoding: in-process without read-ahead (the previous default
              here), in-process with a read-ahead thread (``READ_AHEAD_BATCHES``), and 1 and 2 decoding processes.
  breakdown   one 16 MP photo (a real one upscaled to 4608 x 3456) and one 512 px photo: ms to decode (PIL
              draft mode, as ``retino.inference.trained.decode``), run the quality gate
              (``retino.inference.quality.assess``, its re-decode included), preprocess, and forward (the
              default engine, alone and as one of a batch of 16).

Usage::

    python bench/inference.py [--quick] [--size 512] [--batch 1 8] [--threads N] [--rounds 3]
                              [--n 50] [--workers 0 1 2] [--only engines end2end breakdown]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from screen import REAL, fresh_run, photo_folder  # noqa: E402  (bench/screen.py)
from retino.data._workers import usable_cores  # noqa: E402
from retino.inference import engine as engines, grading, quality  # noqa: E402
from retino.inference import trained as inference  # noqa: E402
from retino.inference.predict import predict  # noqa: E402
from retino.models import build_model  # noqa: E402
from retino.screening import screen as screening  # noqa: E402

ARCHS = ("resnet18", "resnet50")


# ----------------------------------------------------------------------------- engines

def _openvino():
    try:
        import openvino
    except ImportError:
        return None
    return openvino


def make_engines(model: torch.nn.Module, size: int, threads: int, tmp: Path) -> tuple[dict, dict]:
    """``{name: fn(x) -> (N, K) array}`` for every engine that can run here, and ``{name: why not}``."""
    model = model.eval()
    out, missing = {}, {}

    def eager(x):
        with torch.inference_mode():
            return model(x).numpy()
    out["eager"] = eager

    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def channels_last(x):
        with torch.inference_mode():
            return cl(x.contiguous(memory_format=torch.channels_last)).numpy()
    out["channels_last"] = channels_last

    fast = engines.TorchEngine(model, fast=True)
    out["torch fast"] = lambda x: fast.run(x, features=False)[0]

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit is deprecated": it is measured all the same
            frozen = torch.jit.freeze(torch.jit.trace(copy.deepcopy(model), torch.zeros(1, 3, size, size)))

        def jit(x):
            with torch.no_grad():
                return frozen(x).numpy()
        out["jit frozen"] = jit
    except Exception as e:  # noqa: BLE001 - TorchScript is deprecated in recent torch: report, go on
        missing["jit frozen"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    path = tmp / f"model-{size}.onnx"
    engines.export_onnx(model, size, path)
    ort = engines.OnnxEngine(path, threads=threads)
    out["onnxruntime"] = lambda x: ort.run(x, features=False)[0]

    ov = _openvino()
    if ov is None:
        missing["openvino"] = "not installed"
        return out, missing
    core = ov.Core()
    # OpenVINO's default precision on a CPU with AMX or AVX512-BF16 is bf16: measured too, beside f32
    default = core.get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    for precision in dict.fromkeys(["f32", default]):
        compiled = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT":
                                                         "LATENCY", "INFERENCE_PRECISION_HINT": precision})
        name = "openvino" if precision == "f32" else f"openvino {precision} (its default here)"
        out[name] = (lambda c, port: lambda x: c({"image": x.numpy()})[port])(compiled, compiled.output("output"))
    return out, missing


def bench_engines(arch: str, size: int, batches: list[int], threads: int, rounds: int, tmp: Path) -> dict:
    """img/s (median over rounds), ratios to eager and to torch fast, and the largest difference from eager."""
    torch.manual_seed(0)
    model = build_model(arch, pretrained=False).eval()
    fns, missing = make_engines(model, size, threads, tmp)
    names = list(fns)
    gen = torch.Generator().manual_seed(1)
    res = {"rate": {}, "x_eager": {}, "x_fast": {}, "diff": {}, "missing": missing}
    for b in batches:
        x = torch.randn(b, 3, size, size, generator=gen)
        want = fns["eager"](x)
        for name in names:  # warm-up (kernel choice, first allocations), and the outputs compared
            res["diff"][(name, b)] = float(np.abs(np.asarray(fns[name](x), np.float64) - want).max())
        reps = max(1, 8 // b)  # about 8 images a timing, whatever the batch
        per_round = []
        for r in range(rounds):
            secs = {}
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                for _ in range(reps):
                    fns[name](x)
                secs[name] = (time.perf_counter() - t0) / reps
            per_round.append(secs)
        for name in names:
            res["rate"][(name, b)] = statistics.median(b / s[name] for s in per_round)
            res["x_eager"][(name, b)] = statistics.median(s["eager"] / s[name] for s in per_round)
            res["x_fast"][(name, b)] = statistics.median(s["torch fast"] / s[name] for s in per_round)
    res["names"] = names
    return res


def print_engines(arch: str, size: int, batches: list[int], res: dict) -> None:
    print(f"\n### {arch} at {size} px (img/s, median of rounds; x: within-round ratio)\n")
    head = "| engine |" + "".join(f" batch {b} img/s | x eager | x torch fast |" for b in batches) + " max abs diff |"
    print(head)
    print("| --- |" + " ---: | ---: | ---: |" * len(batches) + " ---: |")
    for name in res["names"]:
        cells = "".join(f" {res['rate'][(name, b)]:.2f} | {res['x_eager'][(name, b)]:.2f} |"
                        f" {res['x_fast'][(name, b)]:.2f} |" for b in batches)
        diff = max(res["diff"][(name, b)] for b in batches)
        print(f"| {name} |{cells} {diff:.1e} |")
    for name, why in res["missing"].items():
        print(f"| {name} |" + " - | - | - |" * len(batches) + f" {why} |")
    auto = {"onnx": "onnxruntime", "torch": "torch fast"}[engines.resolve("auto", "cpu")]
    for b in batches:
        # an engine whose outputs part from PyTorch's by more than the engine's own check allows is no candidate
        fair = [n for n in res["names"] if res["diff"][(n, b)] <= engines.PARITY_ATOL]
        best = max(fair, key=lambda n: res["rate"][(n, b)])
        fastest = max(res["names"], key=lambda n: res["rate"][(n, b)])
        share = res["rate"][(auto, b)] / res["rate"][(best, b)]
        print(f"\nbatch {b}: `auto` picks {auto}; fastest measured within {engines.PARITY_ATOL:g} of eager: {best}; "
              f"auto at {share:.0%} of it ({'within' if share >= 0.9 else 'NOT within'} 10%)"
              + (f"; fastest of all: {fastest} ({res['rate'][(fastest, b)] / res['rate'][(auto, b)]:.2f}x auto, "
                 f"outputs {res['diff'][(fastest, b)]:.1e} from eager)" if fastest != best else ""))


# ----------------------------------------------------------------------------- end to end

@contextlib.contextmanager
def read_ahead(batches: int):
    """Screen's in-process read-ahead set to ``batches`` (0: a photo decoded only when its batch needs it)."""
    before = screening.READ_AHEAD_BATCHES
    screening.READ_AHEAD_BATCHES = batches
    try:
        yield
    finally:
        screening.READ_AHEAD_BATCHES = before


def end_to_end(tmp: Path, *, size: int, n: int, rounds: int, synthetic: bool, workers: list[int]) -> dict:
    """Seconds of each way per round on the same photos, and the largest probability gap screen vs loop."""
    run = fresh_run(tmp / "run", size=size, arch="resnet18")
    folder, source = photo_folder(tmp, n, synthetic)
    paths = sorted(folder.iterdir())
    trained = inference.load_trained(run)
    ways = {"screen": dict(engine="auto", workers=None),
            "screen torch": dict(engine="torch", workers=None),
            "screen torch, decoding in-process without read-ahead (the path before the engine)":
                dict(engine="torch", workers=0, ahead=0),
            **{f"screen, {w} decoding process{'es' if w > 1 else ''}" if w else
               "screen, decoding in-process with read-ahead": dict(engine="auto", workers=w) for w in workers
               if w or screening.default_workers(n) != 0},  # else the first row is that one
            "screen, decoding in-process without read-ahead": dict(engine="auto", workers=0, ahead=0)}

    graded = [0.0]  # seconds inside Screen's grading of its batches (the forward pass and the rows)
    grade_rows = screening._rows

    def timed_rows(*a, **kw):
        t0 = time.perf_counter()
        try:
            return grade_rows(*a, **kw)
        finally:
            graded[0] += time.perf_counter() - t0

    def run_screen(kw: dict, tag: str):
        kw = dict(kw)
        ahead = kw.pop("ahead", screening.READ_AHEAD_BATCHES)
        graded[0] = 0.0
        with read_ahead(ahead), _patched(screening, "_rows", timed_rows):
            return screening.screen(run, folder, tmp / "reports" / f"{tag}-{time.monotonic_ns()}.csv",
                                    batch_size=16, **kw)

    (tmp / "reports").mkdir()
    loop = [predict(trained, [p])[0] for p in paths[:2]]  # warm-up; the ONNX model exported once, into the run
    run_screen(ways["screen"], "warm")  # the page cache holds the photos for every way alike
    per_round, shares, diff = [], [], 0.0
    for r in range(rounds):
        secs, share = {}, {}
        t0 = time.perf_counter()
        loop = [predict(trained, [p])[0] for p in paths]
        secs["predict loop"] = time.perf_counter() - t0
        for name in list(ways)[r % len(ways):] + list(ways)[:r % len(ways)]:
            t0 = time.perf_counter()
            result = run_screen(ways[name], name.replace(" ", "_").replace(",", ""))
            secs[name] = time.perf_counter() - t0
            share[name] = graded[0] / secs[name]
            rows = result.photos.set_index("image")
            diff = max([diff] + [float(np.abs(rows.loc[p.name, [f"p{g}" for g in range(5)]].to_numpy(float)
                                              - np.asarray(pred.probs)).max()) for p, pred in zip(paths, loop) if pred.ok])
        per_round.append(secs)
        shares.append(share)
        print(f"  round {r + 1}: " + ", ".join(f"{k} {len(paths) / v:.2f}" for k, v in secs.items()) + " img/s",
              file=sys.stderr, flush=True)
    return {"source": source, "n": len(paths), "per_round": per_round, "shares": shares, "diff": diff,
            "default_workers": screening.default_workers(len(paths))}


def print_end_to_end(res: dict, size: int) -> None:
    n, per_round = res["n"], res["per_round"]
    names = list(per_round[0])
    print(f"\n### End to end: ResNet-18 at {size} px, batch 16, {res['source']}; medians of {len(per_round)} rounds\n")
    old = next(k for k in names if k.startswith("screen torch, "))
    print("| way | img/s | x predict loop | x screen torch | x the path before the engine | share of wall time "
          "grading | img/s each round |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name in names:
        rate = statistics.median(n / s[name] for s in per_round)
        x = [statistics.median(s[base] / s[name] for s in per_round) for base in ("predict loop", "screen torch", old)]
        share = (f"{statistics.median(s[name] for s in res['shares']):.0%}" if name in res["shares"][0] else "-")
        each = " ".join(f"{n / s[name]:.2f}" for s in per_round)
        print(f"| {name} | {rate:.2f} | " + " | ".join(f"{v:.2f}" for v in x) + f" | {share} | {each} |")
    print(f"\n`screen` runs Screen's defaults here: engine {engines.resolve('auto', 'cpu')}, "
          f"{res['default_workers']} decoding processes, read-ahead {screening.READ_AHEAD_BATCHES} batch(es). "
          f"Largest probability difference, screen vs predict loop: {res['diff']:.1e}")


@contextlib.contextmanager
def _patched(module, name: str, value):
    before = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, before)


# ----------------------------------------------------------------------------- where one photo's time goes

def photo_sizes(tmp: Path, synthetic: bool) -> dict[str, Path]:
    """A 16 MP JPEG (a real photo upscaled to 4608 x 3456) and a 512 px one (its short side), in ``tmp``."""
    from PIL import Image
    real = sorted(REAL.glob("*.jpeg")) if REAL.is_dir() and not synthetic else []
    if real:
        src = Image.open(real[0]).convert("RGB")
    else:
        from retino.data.synthetic import render_fundus
        src = Image.fromarray(render_fundus(2, size=1024, seed=0)[0])
    big, small = tmp / "16mp.jpeg", tmp / "512px.jpeg"
    src.resize((4608, 3456), Image.Resampling.BICUBIC).save(big, quality=92)
    w, h = src.size
    src.resize((round(512 * w / h), 512) if w >= h else (512, round(512 * h / w)),
               Image.Resampling.LANCZOS).save(small, quality=92)
    return {"16 MP (4608 x 3456)": big, "512 px": small}


def breakdown(tmp: Path, *, size: int, reps: int, synthetic: bool) -> dict:
    """ms (median of ``reps``) of each stage of one photo, for each photo size, and decode's output size."""
    from retino.inference.trained import ORIGINAL_MAX_PX, decode, fundus_crop
    from retino.data import preprocess
    run = fresh_run(tmp / "run", size=size, arch="resnet18") if not (tmp / "run").exists() else tmp / "run"
    trained = inference.load_trained(run)
    runner = engines.get(trained, "auto", fast=True)
    cfg = trained.config
    # does the runtime use both cores? the same model on one thread, to compare
    single = engines.OnnxEngine(runner.path, threads=1) if isinstance(runner, engines.OnnxEngine) else None
    out = {}
    for label, path in photo_sizes(tmp, synthetic).items():
        def dec():
            return decode(path, path.name, cfg.image_size)

        def gate():
            rgb = np.asarray(dec())
            if min(rgb.shape[:2]) < quality.GATE_MIN_SIDE:  # as prepare_input: decoded again for the gate
                rgb = np.asarray(decode(path, path.name, quality.GATE_TARGET))
            return quality.assess(rgb)

        img = dec()
        rgb = np.asarray(img)

        def prep():
            preprocess(rgb, cfg.image_size, ben_graham_norm=cfg.ben_graham, return_mask=True)
            fundus_crop(rgb)
            img.copy().thumbnail((ORIGINAL_MAX_PX, ORIGINAL_MAX_PX))

        seen = grading.prepare(path, cfg, path.name).seen
        one = inference.unit_input(seen[None], "cpu")
        sixteen = inference.unit_input(np.repeat(seen[None], 16, 0), "cpu")

        def fwd(x, engine=runner):
            return lambda: engine.run(grading.normalize(x, *trained.norm), False)

        stages = {"decode": (dec, 1), "quality gate": (gate, 1), "preprocess": (prep, 1),
                  "forward, batch 1": (fwd(one), 1), "forward, 1 of 16": (fwd(sixteen), 16),
                  **({"forward, 1 of 16, one thread": (fwd(sixteen, single), 16)} if single else {}),
                  "all but forward (grading.prepare)": (lambda: grading.prepare(path, cfg, path.name), 1)}
        ms = {}
        for name, (fn, per) in stages.items():
            fn()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            ms[name] = 1000 * statistics.median(times) / per
        out[label] = {"ms": ms, "decoded": "x".join(map(str, img.size)), "bytes": path.stat().st_size}
    out["_engine"] = engines.describe(runner.info())
    return out


def print_breakdown(res: dict, size: int) -> None:
    engine = res.pop("_engine")
    labels = list(res)
    print(f"\n### Where one photo's time goes (ms, median; ResNet-18 at {size} px, {engine})\n")
    print("| stage |" + "".join(f" {lab} |" for lab in labels))
    print("| --- |" + " ---: |" * len(labels))
    print("| JPEG size, decoded size |" + "".join(f" {res[lab]['bytes'] / 1e6:.1f} MB -> {res[lab]['decoded']} |"
                                            for lab in labels))
    for stage in res[labels[0]]["ms"]:
        print(f"| {stage} |" + "".join(f" {res[lab]['ms'][stage]:.1f} |" for lab in labels))


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: ResNet-18 only, 256 px, one round, 8 photos, workers 0 and 1")
    p.add_argument("--size", type=int, default=512, help="the run's image size")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes of the engine section")
    p.add_argument("--threads", type=int, default=usable_cores(), help="threads of every engine")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n", type=int, default=50, help="photos of the end-to-end section")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="Screen decoding processes to compare")
    p.add_argument("--synthetic", action="store_true", help="synthetic photos even where the real sample exists")
    p.add_argument("--only", nargs="+", choices=["engines", "end2end", "breakdown"],
                   default=["engines", "end2end", "breakdown"])
    args = p.parse_args(argv)
    archs, size, rounds, n, workers = ARCHS, args.size, args.rounds, args.n, args.workers
    if args.quick:
        archs, size, rounds, n, workers = ("resnet18",), 256, 1, 8, [0, 1]
    torch.set_num_threads(args.threads)
    ov = _openvino()
    print(f"{platform.machine()}, {os.cpu_count()} cores ({usable_cores()} usable), load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}; {args.threads} threads an engine; torch "
          f"{torch.__version__}; onnxruntime {_version('onnxruntime')}; "
          f"OpenVINO: {ov.__version__ if ov else 'not installed'}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "engines" in args.only:
            print("\n## Engines: one forward pass")
            for arch in archs:
                res = bench_engines(arch, size, args.batch, args.threads, rounds, tmp)
                print_engines(arch, size, args.batch, res)
        if "end2end" in args.only:
            (tmp / "e2e").mkdir()
            res = end_to_end(tmp / "e2e", size=size, n=n, rounds=rounds, synthetic=args.synthetic, workers=workers)
            print_end_to_end(res, size)
        if "breakdown" in args.only:
            (tmp / "one").mkdir()
            print_breakdown(breakdown(tmp / "one", size=size, reps=2 if args.quick else 5,
                                      synthetic=args.synthetic), size)
    return 0


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
