"""Images per second a loader feeds from a warm decode-once cache: per-row reads against batched reads.

The uint8 rows a GPU run trains on, at ``--size`` px (default 512), batch ``--batch-size``:

  per_row   before issue 12: ``EpochSampler`` + ``DataLoader(batch_size=B)``, one
            ``CachedImages[i]`` call and one memory-mapped row per image, stacked by the default
            collate; in one process, and with N worker processes (N=2: what training on a GPU used)
  batched   ``retino.data.loaders.make_loader``: ``EpochBatchSampler`` batches, sorted, each read
            at once: in one process by its ``CacheFeeder`` (what ``--workers auto`` gives on a GPU:
            a thread reads ahead with one ``index_select`` into pinned memory), and with N worker
            processes (``CachedImages.__getitems__``: one fancy index into shared memory)

On CUDA every way pins its batches and copies them to the device with ``non_blocking=True``, as
training does. The cache is random bytes (the speed of a copy does not depend on them) in a
temporary folder, read once before timing (warm page cache); each figure is one untimed epoch,
then ``--epochs`` timed epochs; rounds interleave the ways and the medians are reported. Ratios:
batched / per-row in one process (target >= 2.5x, issue 12) and with N workers, and ``ratio_vs_before``:
``make_loader``'s default against the per-row loader with 2 workers that GPU training used. Usage::

    python bench/feed.py [--quick] [--json] [--size 512] [--workers N] [--device auto|cpu|cuda]
"""
from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline import machine, report, sync  # noqa: E402  (bench/data_pipeline.py)
from retino.data.loaders import CachedImages, EpochSampler, make_loader
from retino.data._workers import usable_cores

TARGET_RATIO = 2.5  # issue 12: batched reads feed >= 2.5x the images/s of per-row reads


def random_cache(folder: Path, n: int, size: int) -> Path:
    """An (n, size, size, 3) uint8 .npy of random bytes, read once so the page cache holds it."""
    path = folder / f"feed-{n}x{size}.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    rng = np.random.default_rng(0)
    for i in range(n):
        arr[i] = rng.integers(0, 256, arr.shape[1:], dtype=np.uint8)
    arr.flush()
    del arr
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass
    return path


def per_row_loader(ds: CachedImages, batch: int, workers: int, pin: bool) -> DataLoader:
    """The loader ``retino.training.splits.make_loader`` built for a GPU before batched reads."""
    sampler = EpochSampler(ds.labels, seed=0)
    return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, pin_memory=pin,
                      persistent_workers=workers > 0)


def batched_loader(ds: CachedImages, batch: int, workers: int, pin: bool):
    """``make_loader`` as a GPU run gets it: workers 0 is its CacheFeeder, more are worker processes."""
    return make_loader(ds, batch_size=batch, train=True, seed=0, device_type="cuda", workers=workers,
                       pin_memory=pin, drop_single=False)


def feed_rate(loader: DataLoader, device: torch.device, epochs: int) -> float:
    """Images/s over ``epochs`` epochs after one untimed epoch (worker start, first page mappings)."""
    sampler = loader.batch_sampler if hasattr(loader.batch_sampler, "set_epoch") else loader.sampler

    def epoch(e: int) -> int:
        sampler.set_epoch(e)
        n = 0
        for images, labels in loader:
            if device.type == "cuda":
                images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            n += len(labels)
        return n

    epoch(1)
    sync(device)
    t0 = time.perf_counter()
    n = sum(epoch(2 + e) for e in range(epochs))
    sync(device)
    return n / (time.perf_counter() - t0)


def run(args) -> dict:
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    pin = device.type == "cuda"
    folder = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="retino-feed-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        path = random_cache(folder, args.n, args.size)
        labels = np.arange(args.n) % 5
        ds = CachedImages(path, np.arange(args.n), labels)
        ways = {f"{kind}_{w}": (maker, w) for w in (0, args.workers)
                for kind, maker in (("per_row", per_row_loader), ("batched", batched_loader))}
        rounds = {name: [] for name in ways}
        for _ in range(args.rounds):  # interleaved: a busy spell on a shared machine slows every way
            for name, (maker, w) in ways.items():
                loader = maker(ds, args.batch_size, w, pin)
                rounds[name].append(feed_rate(loader, device, args.epochs))
                del loader  # and its workers: the next way starts on an idle machine
                gc.collect()
    finally:
        if not args.work:
            shutil.rmtree(folder, ignore_errors=True)
    med = {name: statistics.median(v) for name, v in rounds.items()}
    w = args.workers
    one, many = med["batched_0"] / med["per_row_0"], med[f"batched_{w}"] / med[f"per_row_{w}"]
    before = med["per_row_2"] if "per_row_2" in med else None
    return {
        "benchmark": "feed", "date": time.strftime("%Y-%m-%d"), "machine": machine(str(device)),
        "device": str(device), "torch": torch.__version__, "size": args.size, "batch_size": args.batch_size,
        "images": args.n, "workers": w, "usable_cores": usable_cores(), "pinned": pin, "rounds": args.rounds,
        "timed_epochs": args.epochs,
        "per_row_1proc_images_per_s": round(med["per_row_0"], 1),
        "batched_1proc_images_per_s": round(med["batched_0"], 1), "ratio_1proc": round(one, 2),
        "per_row_workers_images_per_s": round(med[f"per_row_{w}"], 1),
        "batched_workers_images_per_s": round(med[f"batched_{w}"], 1), "ratio_workers": round(many, 2),
        "ratio_vs_before": round(med["batched_0"] / before, 2) if before else None,
        "target_ratio": TARGET_RATIO, "target_met": one >= TARGET_RATIO,
        "per_round": {name: [round(x, 1) for x in v] for name, v in rounds.items()},
    }


def print_table(r: dict) -> None:
    print(f"feed from a warm cache at {r['size']} px on {r['device']} ({r['machine']}), batch {r['batch_size']}, "
          f"{r['images']} images, {'pinned, copied to the device, ' if r['pinned'] else ''}median of "
          f"{r['rounds']} rounds x {r['timed_epochs']} epochs (images/s)")
    print(f"  {'':<22}{'per-row':>10}{'batched':>10}{'ratio':>8}")
    print(f"  {'one process':<22}{r['per_row_1proc_images_per_s']:>10.0f}{r['batched_1proc_images_per_s']:>10.0f}"
          f"{r['ratio_1proc']:>8.2f}")
    label = f"{r['workers']} workers"
    print(f"  {label:<22}{r['per_row_workers_images_per_s']:>10.0f}{r['batched_workers_images_per_s']:>10.0f}"
          f"{r['ratio_workers']:>8.2f}")
    print(f"  target: batched >= {r['target_ratio']}x per-row in one process -> "
          f"{'met' if r['target_met'] else 'NOT met'}")
    if r["ratio_vs_before"]:
        print(f"  make_loader's default (batched, one process) / per-row with 2 workers (GPU training before): "
              f"{r['ratio_vs_before']:.2f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer images and rounds (seconds on 2 CPU cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="N, the worker count compared (2: GPU training's before)")
    p.add_argument("--n", type=int, help="images in the cache (default 256; quick 96)")
    p.add_argument("--epochs", type=int, help="timed epochs per figure (default 2; quick 1)")
    p.add_argument("--rounds", type=int, help="interleaved rounds, medians reported (default 3; quick 1)")
    p.add_argument("--work", help="folder for the cache file, kept (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    args.n = args.n or (96 if args.quick else 256)
    args.epochs = args.epochs or (1 if args.quick else 2)
    args.rounds = args.rounds or (1 if args.quick else 3)
    if args.workers < 1 or args.n < 2 * args.batch_size or args.size < 8:
        p.error("need --workers >= 1, --n >= 2 x --batch-size and --size >= 8")
    return report(run(args), args.json, print_table)


if __name__ == "__main__":
    sys.exit(main())
