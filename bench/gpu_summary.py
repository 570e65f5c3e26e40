"""bench/gpu.sh's bookkeeping: the grid, feed and summary lines from the parts' files, and which archs to profile.

    python bench/gpu_summary.py grid TMP
    python bench/gpu_summary.py feed TMP
    python bench/gpu_summary.py to-profile TMP auto|on|off SIZE
    python bench/gpu_summary.py summary TMP WALL_S OUT_FILE QUICK AMP CL COMPILE [OUT_DIR]

TMP holds ``train-<i>.json`` (bench/train_throughput.py's summaries, or ``{"failed": true, ...}``),
``feed.json`` and ``profile-<arch>.json``.
"""
from __future__ import annotations

import glob
import json
import os
import sys

TARGET_RATIO = 0.9  # the loop keeps >= 90% of the model's own speed on a GPU at 512 px
TARGET_MIN = 20     # the lab grid in under 20 minutes
RESULT_KEYS = ("arch", "size", "batch_size", "amp", "channels_last", "compile", "retino_images_per_s",
               "ceiling_images_per_s", "retino_over_ceiling", "target_met", "retino_peak_mem_gb",
               "ceiling_peak_mem_gb", "eval_images_per_s", "epoch_seconds", "workers", "ceiling_warmup_s",
               "lab_grid_min_this_arch")
FEED_KEYS = ("size", "batch_size", "workers", "pinned", "per_row_1proc_images_per_s", "batched_1proc_images_per_s",
             "ratio_1proc", "per_row_workers_images_per_s", "batched_workers_images_per_s", "ratio_workers",
             "ratio_vs_before", "target_ratio", "target_met")


def _parts(tmp: str) -> list[dict]:
    paths = sorted(glob.glob(f"{tmp}/train-*.json"), key=lambda p: int(p[:-5].split("-")[-1]))
    return [json.load(open(p)) for p in paths]


def _results(done: list[dict]) -> list[dict]:
    return [{k: r[k] for k in RESULT_KEYS} for t in done for r in t["results"]]


def grid(tmp: str) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """(results, cache rows, grid rows, failed parts) from the train parts."""
    parts = _parts(tmp)
    done, failed = [t for t in parts if not t.get("failed")], [t for t in parts if t.get("failed")]
    results = _results(done)
    cache, rows = [], []
    for size in sorted({t["size"] for t in done}):
        at = [t for t in done if t["size"] == size]
        c = ([t for t in at if not t["cache_found"]] or at)[0]  # the part that built the cache, not one that found it
        cache.append({"size": size, "images": c["cache_images"], "workers": c["cache_workers"],
                      "build_s": c["cache_build_s"], "images_per_s": c["cache_images_per_s"],
                      "lab_35124_projected_min": c["cache_lab_projected_min"]})
        here = [r for r in results if r["size"] == size]
        best = {a: min((r for r in here if r["arch"] == a), key=lambda r: r["lab_grid_min_this_arch"])
                for a in dict.fromkeys(r["arch"] for r in here)}
        minutes = round(sum(r["lab_grid_min_this_arch"] for r in best.values()) + c["cache_lab_projected_min"], 1)
        rows.append({"size": size, **{k: at[0]["lab_grid"][k] for k in ("train", "test", "epochs", "runs_per_arch")},
                     "archs": list(best),
                     "variant_used": {a: {k: r[k] for k in ("amp", "channels_last", "compile")} for a, r in best.items()},
                     "projected_min": minutes, "target_min": TARGET_MIN, "target_met": minutes < TARGET_MIN})
    return results, cache, rows, failed


def _feed(tmp: str) -> dict:
    try:
        feed = json.load(open(f"{tmp}/feed.json"))
    except (OSError, ValueError):
        return {"failed": True}
    return feed if feed.get("failed") else {k: feed[k] for k in FEED_KEYS}


def to_profile(tmp: str, mode: str, size: int) -> list[str]:
    """The archs to profile: those under the target at ``size`` (auto), all measured (on), none (off)."""
    if mode == "off":
        return []
    results = [r for r in grid(tmp)[0] if r["size"] == size]
    archs = dict.fromkeys(r["arch"] for r in results)
    if mode == "on":
        return list(archs)
    # an arch is short when even its best variant misses the ratio
    return [a for a in archs if max(r["retino_over_ceiling"] for r in results if r["arch"] == a) < TARGET_RATIO]


def main(argv: list[str]) -> int:
    verb, tmp = argv[0], argv[1]
    if verb == "grid":
        _, _, rows, failed = grid(tmp)
        for row in rows:
            print(json.dumps({"part": "grid", **row}))
        if not rows:
            print(json.dumps({"part": "grid", "failed": True, "why": "no train part finished", "failed_parts": failed}))
    elif verb == "feed":
        print(json.dumps({"part": "feed", **_feed(tmp)}))
    elif verb == "to-profile":
        print(" ".join(to_profile(tmp, argv[2], int(argv[3]))))
    elif verb == "summary":
        wall, out, quick, amp, cl, comp = argv[2:8]
        out_dir = argv[8] if len(argv) > 8 else ""
        results, cache, rows, failed = grid(tmp)
        done = [t for t in _parts(tmp) if not t.get("failed")]
        first = done[0] if done else {}
        profiles = [json.load(open(p)) for p in sorted(glob.glob(f"{tmp}/profile-*.json"))]
        summary = {
            "part": "summary", "benchmark": "retino bench/gpu.sh", "date": first.get("date"),
            "device": first.get("device"), "machine": first.get("machine"), "torch": first.get("torch"),
            "quick": quick == "1", "wall_s": int(wall),
            "options": {"amp": amp, "channels_last": cl, "compile": comp,
                        "note": "variants apply on CUDA only; a CPU run measures fp32 NHWC, uncompiled"},
            "fit": {k: first.get(k) for k in ("epochs", "train_images", "test_images")},
            "results": results, "failed": failed, "cache": cache, "lab_grid": rows, "feed": _feed(tmp),
            "profile": profiles,
        }
        text = json.dumps(summary)
        for path in ([out] if out else []) + ([os.path.join(out_dir, "gpu.json")] if out_dir else []):
            with open(path, "w") as f:
                f.write(text + "\n")
        print(text)
    else:
        print(f"gpu_summary.py: unknown verb {verb!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
