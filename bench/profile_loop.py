"""Where the real training loop's time goes: one ``torch.profiler`` trace of 20 steps of ``retino.training.train.fit``.

``bench/gpu.sh`` runs this for an architecture whose loop fell short of 0.9 of the model's own ceiling:
it trains the same synthetic set ``bench/train_throughput.py`` made (its cache warm), profiles steps
6-25 of the first epoch (after cuDNN's autotuning and the loader's start), and prints one JSON line with

  top_ops     the ten ops with the most self time on the device (CPU time where there is no GPU)
  top_kernels the ten kernels with the most device time
  idle_share  the share of the profiled window in which the device ran no kernel, copy or memset:
              time the host kept the GPU waiting (loader, launches, syncs)
  host_sync_ms the host's time blocked in stream or device synchronisation
  step_ms     wall time per profiled step

and writes the Chrome trace (gzipped) beside it for chrome://tracing or Perfetto. The run is stopped
as soon as the trace is taken (Retino's own stop flag), so it costs one partial epoch.

    python bench/profile_loop.py --arch resnet50 --size 512 --work DIR [--trace-dir DIR] [--quick]
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile, schedule

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline import pick_device  # noqa: E402
from train_throughput import replicated_set  # noqa: E402
from retino.training import lifecycle  # noqa: E402
from retino.config import ARCHS, TrainConfig  # noqa: E402
from retino.training.train import fit  # noqa: E402

WAIT, WARMUP, ACTIVE = 5, 3, 20  # steps skipped, warmed up, then recorded
QUICK_STEPS = (1, 1, 2)          # --quick: 40 photos at batch 8 make 5 steps an epoch
MAX_TRACE_BYTES = 15 * 2**20     # what the device tool brings back per file


def _self_time(avg, cuda: bool) -> float:
    """Self time of one op in microseconds (device time on CUDA; the attribute was renamed in torch 2.4)."""
    if cuda:
        return float(getattr(avg, "self_device_time_total", None) or getattr(avg, "self_cuda_time_total", 0.0))
    return float(avg.self_cpu_time_total)


DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")  # trace categories of time the GPU spends working


def timeline(trace: dict) -> dict:
    """From a Chrome trace: the profiled window, the device's busy time (the union of its kernels, copies
    and memsets), the ten kernels with most device time, and the host's time waiting in stream syncs."""
    events = [e for e in trace.get("traceEvents", []) if "dur" in e and "ts" in e]
    steps = [e for e in events if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith("ProfilerStep#")]
    spans = steps or events
    w0, w1 = min(e["ts"] for e in spans), max(e["ts"] + e["dur"] for e in spans)
    work = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in DEVICE_WORK)
    busy, cur = 0.0, None
    for a, b in work:  # the union of overlapping intervals, clipped to the window
        a, b = max(a, w0), min(b, w1)
        if b <= a:
            continue
        if cur is None or a > cur[1]:
            busy += 0 if cur is None else cur[1] - cur[0]
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    busy += 0 if cur is None else cur[1] - cur[0]
    kernels: dict[str, float] = {}
    for e in events:
        if e.get("cat") in DEVICE_WORK:
            kernels[e["name"]] = kernels.get(e["name"], 0.0) + e["dur"]
    syncs = sum(e["dur"] for e in events if e.get("cat") == "cuda_runtime"
                and e.get("name") in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    window = w1 - w0
    return {"window_ms": round(window / 1e3, 1), "device_busy_ms": round(busy / 1e3, 1),
            "idle_share": round(1 - busy / window, 3) if window and work else None,
            "host_sync_ms": round(syncs / 1e3, 1),
            "top_kernels": [{"kernel": k[:120], "ms": round(v / 1e3, 2)}
                            for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:10]]}


def profile_fit(args) -> dict:
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    data = replicated_set(Path(args.work), args.unique, args.repeat, args.size)
    cfg = TrainConfig(data=str(data), arch=args.arch, image_size=args.size, batch_size=args.batch_size, epochs=1,
                      workers="auto", device=device.type, amp=cuda, channels_last=cuda, compile=False, seed=0)
    run_dir = Path(args.work) / "runs" / f"profile-{args.arch}-{args.size}"
    shutil.rmtree(run_dir, ignore_errors=True)
    trace_dir = Path(args.trace_dir or args.work)
    trace_dir.mkdir(parents=True, exist_ok=True)
    wait, warmup, active = QUICK_STEPS if args.quick else (WAIT, WARMUP, ACTIVE)
    result: dict = {}
    steps = {"t": []}

    def ready(prof) -> None:
        ops = [a for a in prof.key_averages() if not a.key.startswith("ProfilerStep")]
        top = sorted(ops, key=lambda a: _self_time(a, cuda), reverse=True)[:10]
        raw = trace_dir / f"trace-{args.arch}-{args.size}.json"
        prof.export_chrome_trace(str(raw))
        with open(raw) as f:
            result.update(timeline(json.load(f)))
        result["top_ops"] = [{"op": a.key[:120], "self_ms": round(_self_time(a, cuda) / 1e3, 2), "calls": a.count}
                             for a in top]
        packed = raw.with_suffix(".json.gz")
        with open(raw, "rb") as src, gzip.open(packed, "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
        result["trace"] = packed.name if packed.stat().st_size <= MAX_TRACE_BYTES else None
        if result["trace"] is None:
            packed.unlink()
        lifecycle.STOP.set()  # the trace is taken: the run stops at its next log point

    def step_hook(optimizer, *_):
        steps["t"].append(time.perf_counter())
        prof.step()

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
                 on_trace_ready=ready) as prof:
        handle = register_optimizer_step_post_hook(step_hook)
        try:
            fit(cfg, run_dir, progress=False)
        finally:
            handle.remove()
            lifecycle.STOP.clear()
    t = steps["t"][wait + warmup:wait + warmup + active + 1]
    step_ms = round((t[-1] - t[0]) / (len(t) - 1) * 1e3, 1) if len(t) > 1 else None
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"part": "profile", "arch": args.arch, "size": args.size, "batch_size": args.batch_size,
            "device": str(device), "torch": torch.__version__, "profiled_steps": active, "step_ms": step_ms,
            "images_per_s_while_profiled": round(args.batch_size / step_ms * 1e3, 1) if step_ms else None,
            **result}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50", choices=ARCHS)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--work", required=True, help="the folder bench/train_throughput.py made its data in")
    p.add_argument("--trace-dir", help="where the gzipped trace goes (default: --work)")
    p.add_argument("--quick", action="store_true", help="the data of train_throughput --quick")
    p.add_argument("--batch-size", type=int)
    args = p.parse_args(argv)
    cuda = pick_device(args.device).type == "cuda"
    args.unique, args.repeat = (40, 1) if args.quick else (512, 8)
    args.batch_size = args.batch_size or (64 if cuda else 8)
    print(json.dumps(profile_fit(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
