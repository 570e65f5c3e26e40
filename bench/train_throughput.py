"""Training images per second of ResNet-18/50: the model alone against Retino's own training run,
and what that makes of the lab report's grid on this device.

For each architecture at ``--size`` px (default 512), and each variant asked for (``--amp``,
``--channels-last``, ``--compile``: on, off or both), it measures:

  ceiling  the model alone on one fixed random batch already on the device: forward, loss, backward,
           AdamW step, in the variant's precision, memory format and compilation. No data pipeline:
           the most the device can do. Plain torch, so it does not move when Retino's loop does.
  retino   ``retino.training.train.fit`` itself, as a user runs it: a synthetic set's decode-once cache,
           the loader, augmentation on the device, training, evaluation and checkpoints each epoch.
           Training images/s is the last epoch's figure from metrics.jsonl (after compilation and
           cuDNN's autotuning in the first); evaluation images/s and the per-epoch overhead come
           from the same run.
  lab      (``--lab``) the lab report's loop: its PIL loader (bench/data_pipeline.py), fp32, no
           channels_last, ``model(x)``, weighted CrossEntropyLoss, SGD.

with retino / ceiling (target on a GPU: >= 0.9 at 512 px, issue 12), the peak memory of each, the
time to build the cache (images/s with every core, projected to the lab's 35,124 images), and the
lab grid projected on this device: ResNet-18 and -50, scratch and pretrained (4 runs), 10 epochs of
28,099 training and 7,025 test images, from the fastest variant measured per architecture.

The data: ``--unique`` synthetic photos generated once and linked ``--repeat`` times under new
names (decoding, caching and training see distinct files; generation is the slow part). Usage::

    python bench/train_throughput.py [--quick] [--json] [--device auto|cpu|cuda] [--size 512]
        [--archs resnet18,resnet50] [--amp on|off|both] [--channels-last on|off|both]
        [--compile on|off|both] [--batch-size B] [--epochs E] [--lab]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline import lab_loader, machine, pick_device, report, sync, synthetic_set  # noqa: E402
from retino import runs  # noqa: E402
from retino.config import ARCHS, TrainConfig  # noqa: E402
from retino.data import read_dataset  # noqa: E402
from retino.data.cache import build_cache, cache_key  # noqa: E402
from retino.paths import cache_root  # noqa: E402
from retino.data._workers import resolve_workers
from retino.models import build_model  # noqa: E402
from retino.training.train import fit  # noqa: E402

TARGET_CEILING_RATIO = 0.9  # issue 12: Retino's loop keeps >= 90% of the model's own speed on a GPU
LAB_GRID = {"train": 28_099, "test": 7_025, "epochs": 10, "runs_per_arch": 2}  # ANCHORS.md: the lab report


def _amp(device: torch.device, on: bool):
    if device.type == "cuda" and on:
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return contextlib.nullcontext()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float:
    """Peak device memory since the last reset; on a CPU the process's resident high-water mark."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB on Linux


def ceiling(arch: str, v: dict, args, device: torch.device) -> dict:
    """Images/s of forward + backward + AdamW step on one fixed batch already on the device."""
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = build_model(arch).to(device)
    if cuda and v["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    step_model = torch.compile(model) if v["compile"] else model
    x = torch.randn(args.batch_size, 3, args.size, args.size, device=device)  # (B, 3, S, S)
    if v["channels_last"] or not cuda:  # the memory format Retino's input arrives in (always NHWC on a CPU)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (args.batch_size,), device=device)
    model.train()

    def step():
        with _amp(device, v["amp"]):
            loss = F.cross_entropy(step_model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    _reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    rate = args.steps * args.batch_size / (time.perf_counter() - t0)
    return {"ceiling_images_per_s": round(rate, 1), "ceiling_warmup_s": round(warm, 1),
            "ceiling_peak_mem_gb": _peak_gb(device)}


def retino_fit(arch: str, v: dict, args, device: torch.device, data: Path, work: Path, n: dict) -> dict:
    """``retino.training.train.fit`` on the synthetic set; rates from its metrics.jsonl."""
    auto = isinstance(TrainConfig().workers, str)  # "auto" once the config takes it
    workers = "auto" if auto else resolve_workers("auto", purpose="loader", device_type=device.type)
    cfg = TrainConfig(data=str(data), arch=arch, image_size=args.size, batch_size=args.batch_size,
                      epochs=args.epochs, workers=workers, device=device.type, amp=v["amp"],
                      channels_last=v["channels_last"], compile=v["compile"], seed=0)
    run_dir = work / "runs" / f"{arch}-{args.size}-{_tag(v)}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time (Retino refuses to train over one)
    _reset_peak(device)
    t0 = time.perf_counter()
    fit(cfg, run_dir, progress=False)
    wall = time.perf_counter() - t0
    peak = _peak_gb(device)
    rows = runs.read_metrics(run_dir)
    last = rows[-1]
    train_rate = last["train_images_per_s"]
    eval_s = max(last["seconds"] - n["train"] / train_rate, 1e-6)
    overhead = max(0.0, (wall - sum(r["seconds"] for r in rows)) / len(rows))  # setup, checkpoints
    return {"retino_images_per_s": round(train_rate, 1), "eval_images_per_s": round(n["test"] / eval_s, 1),
            "epoch_seconds": [round(r["seconds"], 2) for r in rows], "fit_seconds": round(wall, 1),
            "overhead_per_epoch_s": round(overhead, 2), "first_epoch_extra_s": round(rows[0]["seconds"] - last["seconds"], 1),
            "retino_peak_mem_gb": peak, "workers": workers}


def lab_loop(arch: str, args, device: torch.device, data: Path) -> float:
    """Images/s of the lab report's training loop (its loader, fp32, weighted CE, SGD)."""
    train = read_dataset(data).splits["train"]
    names, labels = [Path(p).stem for p in train["path"]], train["grade"].to_numpy(dtype=np.int64)
    torch.manual_seed(0)
    model = build_model(arch).to(device)
    total = args.warmup + args.steps
    reps = math.ceil(total * args.batch_size / len(names)) + 1
    loader = lab_loader(str(Path(train["path"].iloc[0]).parent), names * reps, list(labels) * reps,
                        args.batch_size, 2)
    counts = np.bincount(labels, minlength=5)
    loss_func = nn.CrossEntropyLoss(weight=torch.FloatTensor([1 - (c / sum(counts)) for c in counts]).to(device))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-3)
    model.train()
    t0 = 0.0
    for i, (x, y) in enumerate(loader):
        x, y = x.to(device), y.to(device)
        loss = loss_func(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()
        if i + 1 == args.warmup:
            t0 = time.perf_counter()
        if i + 1 == total:
            break
    return args.steps * args.batch_size / (time.perf_counter() - t0)


def _tag(v: dict) -> str:
    return "-".join(f"{k}{int(v[k])}" for k in ("amp", "channels_last", "compile"))


def replicated_set(work: Path, unique: int, repeat: int, size: int) -> Path:
    """``unique`` synthetic photos, hard-linked ``repeat`` times as new patients (Retino's layout)."""
    src = synthetic_set(work, unique, max(64, size))  # the generator's smallest photo is 64 px
    if repeat <= 1:
        return src
    out = work / f"synth-{size}px-{unique}x{repeat}"
    if (out / "test.csv").is_file():
        return out
    (out / "images").mkdir(parents=True, exist_ok=True)
    ds = read_dataset(src)
    top = max(int(Path(p).stem.split("_")[0]) for df in ds.splits.values() for p in df["path"])
    for split, df in ds.splits.items():
        lines = ["image,level"]
        for k, (path, grade) in itertools.product(range(repeat), zip(df["path"], df["grade"])):
            patient, eye = Path(path).stem.split("_", 1)
            name = f"{int(patient) + k * top}_{eye}"
            target = out / "images" / f"{name}{Path(path).suffix}"
            if not target.exists():
                try:
                    os.link(path, target)
                except OSError:  # another file system: a copy
                    target.write_bytes(Path(path).read_bytes())
            lines.append(f"{name},{int(grade)}")
        (out / f"{split}.csv.tmp").write_text("\n".join(lines) + "\n")
    for split in ds.splits:  # test.csv last: its presence marks the set complete
        os.replace(out / f"{split}.csv.tmp", out / f"{split}.csv")
    return out


def cache_build(data: Path, size: int) -> dict:
    """Build both splits' caches as ``fit`` will look for them, with every usable core; time it."""
    ds, cfg = read_dataset(data), TrainConfig()
    workers = resolve_workers("auto", purpose="cache")
    keys = [cache_key(df["path"].tolist(), size, cfg.ben_graham) for df in ds.splits.values()]
    found = all((cache_root() / f"{k}.json").is_file() for k in keys)  # built by an earlier run: not timed anew
    n, t0 = 0, time.perf_counter()
    for split, df in ds.splits.items():
        build_cache(df["path"].tolist(), size, ben_graham=cfg.ben_graham, workers=workers, progress=False,
                    desc=f"cache {split}")
        n += len(df)
    seconds = time.perf_counter() - t0
    lab = LAB_GRID["train"] + LAB_GRID["test"]
    return {"cache_found": found, "cache_images": n, "cache_workers": workers, "cache_build_s": round(seconds, 1),
            "cache_images_per_s": round(n / seconds, 1), "cache_lab_projected_min": round(lab * seconds / n / 60, 1)}


def lab_grid_minutes(r: dict) -> float:
    """One architecture's two runs of the lab grid, from a measured variant (minutes)."""
    epoch = (LAB_GRID["train"] / r["retino_images_per_s"] + LAB_GRID["test"] / r["eval_images_per_s"]
             + r["overhead_per_epoch_s"])
    run = LAB_GRID["epochs"] * epoch + max(0.0, r["first_epoch_extra_s"])
    return LAB_GRID["runs_per_arch"] * run / 60


def variants(args, device: torch.device) -> list[dict]:
    """The asked-for combinations; on a CPU only one, since Retino's CPU path has none of them."""
    if device.type != "cuda":
        return [{"amp": False, "channels_last": False, "compile": False}]
    pick = {"on": [True], "off": [False], "both": [False, True]}
    return [{"amp": a, "channels_last": c, "compile": k} for a, c, k in
            itertools.product(pick[args.amp], pick[args.channels_last], pick[args.compile])]


def emit(args, part: str, row: dict) -> None:
    """With ``--emit``: one part's JSON line on stdout as soon as it is measured (a run cut short keeps it)."""
    if args.emit:
        print(json.dumps({"part": part, **row}), flush=True)


def run(args) -> dict:
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as Retino's run sets it
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = replicated_set(work, args.unique, args.repeat, args.size)
    ds = read_dataset(data)
    n = {split: len(df) for split, df in ds.splits.items()}
    print(f"  data: {n['train']} + {n['test']} images ({time.perf_counter() - t0:.0f} s); building the cache ...",
          file=sys.stderr, flush=True)
    build = cache_build(data, args.size)
    emit(args, "cache", {"size": args.size, "device": str(device), "torch": torch.__version__, **build})
    rows = []
    for arch in args.archs:
        for v in variants(args, device):
            print(f"  {arch} {args.size} px {_tag(v)} ({time.perf_counter() - t0:.0f} s) ...", file=sys.stderr,
                  flush=True)
            r = {"arch": arch, "size": args.size, "batch_size": args.batch_size, **v}
            r |= ceiling(arch, v, args, device)
            gc.collect()
            r |= retino_fit(arch, v, args, device, data, work, n)
            gc.collect()
            if args.lab:
                r["lab_images_per_s"] = round(lab_loop(arch, args, device, data), 1)
            r["retino_over_ceiling"] = round(r["retino_images_per_s"] / r["ceiling_images_per_s"], 3)
            r["target_met"] = r["retino_over_ceiling"] >= TARGET_CEILING_RATIO
            r["lab_grid_min_this_arch"] = round(lab_grid_minutes(r), 1)
            rows.append(r)
            emit(args, "train", {"device": str(device), **r})
    best = {arch: min((r for r in rows if r["arch"] == arch), key=lambda r: r["lab_grid_min_this_arch"])
            for arch in args.archs}
    grid = sum(r["lab_grid_min_this_arch"] for r in best.values()) + build["cache_lab_projected_min"]
    return {"benchmark": "train_throughput", "date": time.strftime("%Y-%m-%d"), "device": str(device),
            "machine": machine(str(device)), "torch": torch.__version__, "size": args.size,
            "batch_size": args.batch_size, "epochs": args.epochs, "train_images": n["train"],
            "test_images": n["test"], "ceiling_warmup_steps": args.warmup, "ceiling_steps": args.steps, **build,
            "results": rows,
            "lab_grid": {**LAB_GRID, "archs": list(best), "variant_used": {a: _tag(r) for a, r in best.items()},
                         "projected_min": round(grid, 1),
                         "note": "4 runs (each arch scratch + pretrained) x 10 epochs of train + test, plus "
                                 "building the cache once; from this device's measured rates"}}


def print_table(r: dict) -> None:
    print(f"training throughput on {r['device']} ({r['machine']}), {r['size']} px, batch {r['batch_size']}, "
          f"Retino's fit over {r['train_images']} + {r['test_images']} images x {r['epochs']} epochs (images/s)")
    print(f"  {'arch':<10}{'variant':<22}{'ceiling':>9}{'retino':>9}{'ratio':>7}{'eval':>9}{'peak GB':>9}"
          f"{'grid min':>10}")
    for x in r["results"]:
        print(f"  {x['arch']:<10}{_tag(x):<22}{x['ceiling_images_per_s']:>9.1f}{x['retino_images_per_s']:>9.1f}"
              f"{x['retino_over_ceiling']:>7.2f}{x['eval_images_per_s']:>9.1f}{x['retino_peak_mem_gb']:>9.2f}"
              f"{x['lab_grid_min_this_arch']:>10.1f}")
    print(f"  target (GPU, 512 px): retino/ceiling >= {TARGET_CEILING_RATIO}")
    print(f"cache: {r['cache_images']} images in {r['cache_build_s']} s with {r['cache_workers']} workers "
          f"({r['cache_images_per_s']} images/s; the lab's 35,124: ~{r['cache_lab_projected_min']} min)")
    print(f"lab grid projected on this device: {r['lab_grid']['projected_min']} min")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny: 32 px, 40 images, 2 epochs (a CPU smoke run)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--emit", action="store_true",
                   help="print each part's JSON line as soon as it is measured (then the summary, with --json)")
    p.add_argument("--summary", help="also write the summary JSON object to this file")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--size", type=int, help="image side in pixels (default 512; quick 32)")
    p.add_argument("--archs", default=",".join(ARCHS), help="comma-separated architectures")
    for flag, default in (("--amp", "on"), ("--channels-last", "on"), ("--compile", "both")):
        p.add_argument(flag, default=default, choices=["on", "off", "both"], help="variants on CUDA")
    p.add_argument("--batch-size", type=int, help="default 64 on CUDA, 16 on a CPU (quick 8)")
    p.add_argument("--epochs", type=int, help="epochs of each fit (default 3; quick 2)")
    p.add_argument("--steps", type=int, help="timed ceiling steps (default 40 on CUDA, 3 on a CPU)")
    p.add_argument("--warmup", type=int, help="ceiling steps before timing (default 10 on CUDA, 1 on a CPU)")
    p.add_argument("--unique", type=int, help="synthetic photos generated (default 512; quick 40)")
    p.add_argument("--repeat", type=int, help="times each is linked as a new image (default 8; quick 1)")
    p.add_argument("--lab", action="store_true", help="also time the lab report's loop")
    p.add_argument("--work", help="folder for data, cache and runs (default: $RETINO_CACHE/bench)")
    args = p.parse_args(argv)
    args.archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    bad = [a for a in args.archs if a not in ARCHS]
    if bad:
        p.error(f"unknown architecture {bad[0]!r}; choose from {', '.join(ARCHS)}")
    cuda = pick_device(args.device).type == "cuda"
    defaults = {"size": 32 if args.quick else 512, "batch_size": 64 if cuda else (8 if args.quick else 16),
                "epochs": 2 if args.quick else 3, "steps": 40 if cuda and not args.quick else 3,
                "warmup": 10 if cuda and not args.quick else 1, "unique": 40 if args.quick else 512,
                "repeat": 1 if args.quick else 8}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.warmup, args.steps, args.epochs, args.unique, args.repeat) < 1:
        p.error("--warmup, --steps, --epochs, --unique and --repeat must be at least 1")
    if args.work is None:
        args.work = str(cache_root() / "bench")
    result = run(args)
    if args.summary:
        Path(args.summary).write_text(json.dumps(result) + "\n")
    if args.emit and not args.json:  # stdout holds the parts' lines: the readable table goes beside them
        with contextlib.redirect_stdout(sys.stderr):
            return report(result, False, print_table)
    return report(result, args.json, print_table)


if __name__ == "__main__":
    sys.exit(main())
