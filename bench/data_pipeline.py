"""Training images per second that the data pipeline delivers, with no model: the lab report's
loader against Retino's, on the same images, with the same batch size and number of workers.

  lab              the lab report's ``RetinopathyLoader`` (Part 2-B, copied below): per image
                   ``PIL.Image.open`` of a 512x512 JPEG, RandomVerticalFlip(0.5), RandomRotation(30),
                   ToTensor; a DataLoader with shuffle and W workers; batches moved to the device
  retino           Retino's warm pipeline doing the lab's augmentation (flip, +-30 deg rotation with
                   nearest resampling, as RandomRotation's default): the decode-once cache already
                   built, the loader from ``retino.data.loaders.make_loader`` over ``CachedImages``, then
                   ``to_input(batch, device, norm, mode="lab", interpolation="nearest")``: exactly
                   what ``train_one_epoch`` does before the model, normalised float input included
  retino_bilinear  the same with bilinear rotation (Retino's default ``--interpolation``)
  retino_loader    the same loader alone, each batch's bytes read once (no augmentation): what the
                   cache delivers (on a CPU the loader hands over views of the memory-mapped rows)
  retino_augment   ``to_input`` alone on one batch already in memory: the device's share

Rounds alternate lab / retino / retino_loader, each with fresh worker processes, a warm-up and then
K timed batches; the figures are the medians over rounds, so a busy machine hurts both alike.

It also times the FIRST pass (what building the cache costs) on large camera JPEGs, one process:
``load_and_preprocess`` (JPEG draft mode: decode at 1/2, 1/4 or 1/8 scale) against a full-size decode
then ``preprocess``. The photographs are the ten 12-16 MP originals of ../shared/real_fundus_sample
when present, else synthetic 3072x2048 camera JPEGs. Usage::

    python bench/data_pipeline.py [--quick] [--json] [--device auto|cpu|cuda] [--workers W]
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils import data
from torchvision import transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retino.data import read_dataset  # noqa: E402
from retino.data.cache import build_cache  # noqa: E402
from retino.paths import cache_root  # noqa: E402
from retino.data.loaders import CachedImages, make_loader
from retino.data.augment import to_input
from retino.models import normalization  # noqa: E402
from retino.data.preprocess import load_and_preprocess, load_image, preprocess  # noqa: E402

REAL_SAMPLE = ROOT.parent / "shared" / "real_fundus_sample" / "train"
TARGET_RATIO = 5.0  # issue 6: the warm pipeline delivers >= 5x the lab loader's images/s


# ----------------------------------------------------------------------------- the lab report's loader

class RetinopathyLoader(data.Dataset):
    """The lab report's Dataset (Part 2-B), kept as written: the names come from a list instead of
    its ``getData(mode)`` CSV reader, and the "Found N images" print is left out."""

    def __init__(self, root, img_name, label, augmentation=1):
        self.root, self.img_name, self.label = root, list(img_name), list(label)
        if augmentation == 1:
            self.transformation = transforms.Compose([transforms.RandomVerticalFlip(p=0.5),
                                                      transforms.RandomRotation(30),
                                                      transforms.ToTensor()])
        else:
            self.transformation = transforms.Compose([transforms.ToTensor()])

    def __len__(self):
        return len(self.img_name)

    def __getitem__(self, index):
        img_path = os.path.join(self.root, self.img_name[index] + ".jpeg")
        img = Image.open(img_path)
        img = self.transformation(img)
        label = self.label[index]
        return img, label


def lab_loader(root, names, labels, batch_size: int, workers: int) -> data.DataLoader:
    """The lab report's DataLoader: batch size B, shuffle, W workers."""
    return data.DataLoader(RetinopathyLoader(root, names, labels), batch_size=batch_size, shuffle=True,
                           num_workers=workers)


# ----------------------------------------------------------------------------- Retino's pipeline

def retino_loader(cache_path, indices, labels, batch_size: int, workers: int, device) -> data.DataLoader:
    """Retino's training loader (``retino.data.loaders.make_loader``: whole sorted batches read at once,
    pinned memory on CUDA; on a CPU row views read in this process) over the cache."""
    return make_loader(CachedImages(cache_path, indices, labels), batch_size=batch_size, train=True, seed=0,
                       device_type=torch.device(device).type, workers=workers)


def pick_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


# ----------------------------------------------------------------------------- data

def synthetic_set(work: Path, n: int, size: int) -> Path:
    """A synthetic set of ``n`` ``size`` px JPEGs (Retino layout), written once and reused."""
    from retino.data.synthetic import make_dataset
    out = work / f"synth-{size}px-{n}"
    if not (out / "synth.json").is_file():
        print(f"writing {n} synthetic {size} px fundus JPEGs to {out} ...", file=sys.stderr, flush=True)
        make_dataset(out, n=n, size=size, progress=False)
    return out


def camera_jpegs(work: Path, n: int) -> tuple[list[str], str]:
    """Large camera JPEGs: the real originals (> 4 MP) when present, else synthetic 3072x2048 ones."""
    if REAL_SAMPLE.is_dir():
        big = [p for p in sorted(REAL_SAMPLE.glob("*.jpeg")) if _pixels(p) > 4_000_000]
        if big:
            return [str(p) for p in big[:n]], f"{len(big[:n])} real EyePACS camera originals (4.8-16 MP)"
    from retino.data.synthetic import render_fundus
    out = work / "camera-3072x2048"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = out / f"{i}_{('left', 'right')[i % 2]}.jpeg"
        if not p.is_file():
            rgb, _ = render_fundus(i % 5, eye=("left", "right")[i % 2], size=(3072, 2048), seed=i)
            Image.fromarray(rgb).save(p.with_suffix(".tmp"), format="JPEG", quality=90)
            os.replace(p.with_suffix(".tmp"), p)
        paths.append(str(p))
    return paths, f"{n} synthetic 3072x2048 camera JPEGs (quality 90)"


def _pixels(path) -> int:
    with Image.open(path) as im:
        return im.size[0] * im.size[1]


# ----------------------------------------------------------------------------- timing

def sync(device) -> None:
    """Wait for the GPU's queued work (``device``: a name like "cuda:0" or a torch.device); no-op on a CPU."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def time_batches(loader, step, warmup: int, k: int, device: str) -> float:
    """Images/s over ``k`` batches after ``warmup`` batches, each passed through ``step``."""
    it = iter(loader)
    for _ in range(warmup):
        step(next(it)[0])
    sync(device)
    n, t0 = 0, time.perf_counter()
    for _ in range(k):
        images = next(it)[0]
        step(images)
        n += len(images)
    sync(device)
    return n / (time.perf_counter() - t0)


def warm_pipeline(train_dir: Path, cache_path: Path, size: int, batch: int, workers: int, warmup: int,
                  k: int, rounds: int, device: str) -> dict:
    """Interleaved rounds of the three pipelines; medians and every round's figure."""
    ds = read_dataset(train_dir).splits["train"]
    names = [Path(p).stem for p in ds["path"]]
    labels = ds["grade"].to_numpy(dtype=np.int64)
    root = str(Path(ds["path"].iloc[0]).parent)
    reps = math.ceil((warmup + k) * batch / len(names))  # one epoch covers warm-up + timed batches
    names_r, labels_r, index_r = names * reps, np.tile(labels, reps), np.tile(np.arange(len(names)), reps)
    gen = torch.Generator().manual_seed(0)
    dev, norm = torch.device(device), normalization("resnet18", False)

    def lab_step(x):
        x.to(device, non_blocking=True)

    def retino_step(interpolation):
        def step(images):  # (B, 3, S, S) normalised, on the device
            to_input(images, dev, norm, mode="lab", gen=gen, interpolation=interpolation)
        return step

    held = {}

    def read_rows(images):  # every byte of the batch read once (on a CPU the loader hands over views)
        if torch.is_tensor(images):
            images = list(images)
        buf = held.setdefault(len(images), np.empty((len(images), *images[0].shape), np.uint8))
        for i, row in enumerate(images):
            buf[i] = row

    fresh = {
        "lab": (lambda: lab_loader(root, names_r, labels_r, batch, workers), lab_step),
        "retino": (lambda: retino_loader(cache_path, index_r, labels_r, batch, workers, device),
                   retino_step("nearest")),
        "retino_bilinear": (lambda: retino_loader(cache_path, index_r, labels_r, batch, workers, device),
                            retino_step("bilinear")),
        "retino_loader": (lambda: retino_loader(cache_path, index_r, labels_r, batch, workers, device),
                          read_rows),
    }
    per_round = {name: [] for name in fresh}
    for _ in range(rounds):
        for name, (make, step) in fresh.items():
            loader = make()
            per_round[name].append(time_batches(loader, step, warmup, k, device))
            del loader  # with its iterator and workers: the next round starts on an idle machine
            gc.collect()
    batch_u8 = torch.from_numpy(np.array(np.load(cache_path, mmap_mode="r")[:batch]))  # (B, S, S, 3) uint8
    per_round["retino_augment"] = [_time_augment(batch_u8, dev, norm, gen, max(2, k // 2)) for _ in range(rounds)]
    return {name: statistics.median(v) for name, v in per_round.items()} | {"rounds": per_round}


def _time_augment(batch_u8, device, norm, gen, k: int) -> float:
    def step():
        to_input(batch_u8, device, norm, mode="lab", gen=gen, interpolation="nearest")
    step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(k):
        step()
    sync(device)
    return k * len(batch_u8) / (time.perf_counter() - t0)


def first_pass(paths: list[str], size: int, rounds: int) -> dict:
    """Images/s of decode + preprocess in one process, with and without JPEG draft mode."""
    ways = {"draft": lambda p: load_and_preprocess(p, size),
            "full": lambda p: preprocess(load_image(p), size)}
    for p in paths:  # warm the page cache, so both read the files from memory
        Path(p).read_bytes()
    rates = {name: [] for name in ways}
    for _ in range(rounds):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            for p in paths:
                out = fn(p)
            rates[name].append(len(paths) / (time.perf_counter() - t0))
            assert out.shape == (size, size, 3)
    draft, full = statistics.median(rates["draft"]), statistics.median(rates["full"])
    return {"draft": draft, "full": full, "ratio": draft / full}


# ----------------------------------------------------------------------------- report

def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({model})"


def run(args) -> dict:
    device = str(pick_device(args.device))
    work = Path(args.work) if args.work else cache_root() / "bench"
    work.mkdir(parents=True, exist_ok=True)
    synth = synthetic_set(work, args.n, args.size)
    train = read_dataset(synth).splits["train"]["path"].tolist()
    cache = build_cache(train, args.size, workers=args.workers, progress=False, root=work / "cache")
    warm = warm_pipeline(synth, cache.path, args.size, args.batch_size, args.workers, args.warmup,
                         args.batches, args.rounds, device)
    cams, source = camera_jpegs(work, args.camera_images)
    fp = first_pass(cams, args.size, args.first_pass_rounds)
    ratio = warm["retino"] / warm["lab"]
    return {
        "benchmark": "data_pipeline", "date": time.strftime("%Y-%m-%d"), "machine": machine(device),
        "device": device, "torch": torch.__version__, "size": args.size, "batch_size": args.batch_size,
        "workers": args.workers, "train_images": len(train), "warmup_batches": args.warmup,
        "timed_batches": args.batches, "rounds": args.rounds,
        "lab_images_per_s": round(warm["lab"], 1), "retino_images_per_s": round(warm["retino"], 1),
        "ratio": round(ratio, 2), "target_ratio": TARGET_RATIO, "target_met": ratio >= TARGET_RATIO,
        "retino_bilinear_images_per_s": round(warm["retino_bilinear"], 1),
        "retino_bilinear_ratio": round(warm["retino_bilinear"] / warm["lab"], 2),
        "retino_loader_images_per_s": round(warm["retino_loader"], 1),
        "retino_loader_ratio": round(warm["retino_loader"] / warm["lab"], 2),
        "retino_augment_images_per_s": round(warm["retino_augment"], 1),
        "per_round": {k: [round(x, 1) for x in v] for k, v in warm["rounds"].items()},
        "first_pass_source": source, "first_pass_images": len(cams),
        "first_pass_draft_images_per_s": round(fp["draft"], 2),
        "first_pass_full_images_per_s": round(fp["full"], 2),
        "first_pass_draft_ratio": round(fp["ratio"], 2),
    }


def print_table(r: dict) -> None:
    print(f"data pipeline at {r['size']} px on {r['device']} ({r['machine']}), batch {r['batch_size']}, "
          f"{r['workers']} workers, {r['train_images']} images, median of {r['rounds']} rounds "
          f"x {r['timed_batches']} batches")
    rows = [("lab report loader (PIL per image)", r["lab_images_per_s"], 1.0),
            ("retino warm pipeline (lab's augmentation)", r["retino_images_per_s"], r["ratio"]),
            ("retino warm pipeline, bilinear rotation", r["retino_bilinear_images_per_s"],
             r["retino_bilinear_ratio"]),
            ("  retino loader alone (batch bytes read)", r["retino_loader_images_per_s"], r["retino_loader_ratio"]),
            ("  retino to_input alone (one batch)", r["retino_augment_images_per_s"],
             r["retino_augment_images_per_s"] / r["lab_images_per_s"])]
    print(f"  {'pipeline':<42}{'images/s':>10}{'x lab':>8}")
    for name, rate, x in rows:
        print(f"  {name:<42}{rate:>10.1f}{x:>8.2f}")
    verdict = "met" if r["target_met"] else "NOT met"
    print(f"  target: retino >= {r['target_ratio']:.0f}x lab -> {r['ratio']:.2f}x, {verdict}")
    print(f"first pass (cache building, one process) on {r['first_pass_source']}:")
    print(f"  draft decode + preprocess {r['first_pass_draft_images_per_s']:.2f} images/s, full decode + "
          f"preprocess {r['first_pass_full_images_per_s']:.2f} images/s: {r['first_pass_draft_ratio']:.2f}x")


def report(result, as_json: bool, table) -> int:
    """Print one JSON document with ``--json``, else the readable table (every benchmark's ending)."""
    if as_json:
        print(json.dumps(result))
    else:
        table(result)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small and fast (under a minute on 2 CPU cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--size", type=int, default=512, help="image side in pixels (the lab's data: 512)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers, the same for both")
    p.add_argument("--n", type=int, help="synthetic images to generate (default 256; quick 64)")
    p.add_argument("--batches", type=int, help="timed batches per round (default 10; quick 4)")
    p.add_argument("--warmup", type=int, help="batches before timing (default 2; quick 1)")
    p.add_argument("--rounds", type=int, help="alternating rounds (default 5; quick 2)")
    p.add_argument("--camera-images", type=int, help="large JPEGs for the first pass (default 10; quick 4)")
    p.add_argument("--first-pass-rounds", type=int, help="rounds over them (default 3; quick 1)")
    p.add_argument("--work", help="folder for the generated data and the cache (default: $RETINO_CACHE/bench)")
    args = p.parse_args(argv)
    defaults = dict(n=64, batches=4, warmup=1, rounds=2, camera_images=4, first_pass_rounds=1) if args.quick \
        else dict(n=256, batches=10, warmup=2, rounds=5, camera_images=10, first_pass_rounds=3)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return report(run(args), args.json, print_table)


if __name__ == "__main__":
    sys.exit(main())
