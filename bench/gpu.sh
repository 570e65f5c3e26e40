#!/usr/bin/env bash
# Retino's speed on this machine in one go, printed as ONE JSON document on stdout (progress on stderr).
#
#   bash bench/gpu.sh [--quick] [--sizes 512[,256...]] [--archs resnet18,resnet50]
#                     [--amp on|off|both] [--channels-last on|off|both] [--compile on|off|both]
#                     [--out FILE]
#
# Per (arch, size, variant): Retino's training images/s through its real loop (retino.train.fit on a
# synthetic set, cache warm), the model-only ceiling, their ratio (target >= 0.9 at 512 px on a GPU),
# peak memory; the time to build the cache; the lab report's grid projected on this device (ResNet-18
# and -50, scratch and pretrained, 10 epochs of 28,099 + 7,025 images; target under 20 minutes); and
# the loader's feed rate, per-row against batched reads (bench/feed.py). Nothing is downloaded
# (scratch models, generated photos); all of it lives in a temporary folder removed at exit.
#
# Defaults on a GPU: 512 px, both archs, AMP on, channels_last on, compile off then on. Without
# compile it took 112 s on one H200; each compiled part runs in its own process under a time limit
# (COMPILE_LIMIT, default 600 s), since a compiled run there once did not finish in 8 minutes: the
# summary then says so for that part and keeps the rest. On a CPU the variants do not apply
# (Retino's CPU path is fp32 NHWC, uncompiled):
#   bash bench/gpu.sh --quick        # 32 px, tiny: a smoke run of the whole thing (~1-2 minutes)
# Environment: PYTHON (default .venv/bin/python, else python3), DEVICE (auto), SIZE (old name of
# --sizes), STEP_LIMIT (seconds for each uncompiled part, default 900), COMPILE_LIMIT.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=.venv/bin/python
    if [[ ! -x "$PYTHON" ]]; then
        PYTHON=$(command -v python3 || true)
        echo "no .venv/bin/python here; using ${PYTHON:-nothing} (set PYTHON to choose)" >&2
    fi
fi
if [[ -z "$PYTHON" ]] || ! "$PYTHON" -c "import torch, torchvision" 2>/dev/null; then
    echo "gpu.sh: ${PYTHON:-python} cannot import torch and torchvision; set PYTHON to an interpreter with requirements.txt installed" >&2
    exit 2
fi

quick=0 sizes=${SIZE:-} archs=resnet18,resnet50 amp=on cl=on compile=both out=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) quick=1 ;;
        --sizes|--size) sizes=$2; shift ;;
        --archs) archs=$2; shift ;;
        --amp) amp=$2; shift ;;
        --channels-last) cl=$2; shift ;;
        --compile) compile=$2; shift ;;
        --out) out=$2; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ -n "$sizes" ]] || { [[ $quick == 1 ]] && sizes=32 || sizes=512; }
DEVICE=${DEVICE:-auto} STEP_LIMIT=${STEP_LIMIT:-900} COMPILE_LIMIT=${COMPILE_LIMIT:-600}

TMP=$(mktemp -d "${TMPDIR:-/tmp}/retino-gpu.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
export RETINO_CACHE="$TMP/cache" RETINO_RUNS="$TMP/runs" PYTHONUNBUFFERED=1
q=()
[[ $quick == 1 ]] && q=(--quick)
t0=$SECONDS

cuda=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))")
"$PYTHON" - >&2 <<'EOF'
import torch
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, " + (f"CUDA: {torch.cuda.get_device_name()}" if cuda
      else "no CUDA: a CPU run, its figures are not GPU figures"))
EOF
case "$compile" in on) compiles=(on) ;; off) compiles=(off) ;; *) compiles=(off on) ;; esac
[[ $cuda == 1 || $DEVICE == cuda ]] || compiles=(off)  # Retino compiles on CUDA only

i=0
for size in ${sizes//,/ }; do
    for c in "${compiles[@]}"; do
        limit=$STEP_LIMIT
        [[ $c == on ]] && limit=$COMPILE_LIMIT
        echo "[train] $size px, compile $c: ceiling and retino.train.fit per arch (limit ${limit} s) ..." >&2
        rc=0
        timeout -k 20 "$limit" "$PYTHON" bench/train_throughput.py --json ${q[@]+"${q[@]}"} --device "$DEVICE" \
            --size "$size" --archs "$archs" --amp "$amp" --channels-last "$cl" --compile "$c" \
            --work "$TMP/work-$size" >"$TMP/train-$i.json" || rc=$?
        if [[ $rc != 0 ]]; then
            echo "      failed (exit $rc$([[ $rc == 124 || $rc == 137 ]] && echo ", over ${limit} s"))" >&2
            printf '{"failed": true, "size": %s, "compile": "%s", "exit": %s, "limit_s": %s}\n' \
                "$size" "$c" "$rc" "$limit" >"$TMP/train-$i.json"
        fi
        i=$((i + 1))
    done
    rm -rf "$TMP/work-$size" "$RETINO_CACHE"  # each size's data and cache take disk; the next starts clean
done
feed_size=${sizes%%,*}
[[ $quick == 1 ]] || feed_size=512
echo "[feed] $feed_size px: per-row against batched cache reads (bench/feed.py) ..." >&2
timeout -k 20 "$STEP_LIMIT" "$PYTHON" bench/feed.py --json ${q[@]+"${q[@]}"} --device "$DEVICE" \
    --size "$feed_size" --work "$TMP/feed" >"$TMP/feed.json" || echo '{"failed": true}' >"$TMP/feed.json"

"$PYTHON" - "$TMP" "$((SECONDS - t0))" "$out" "$quick" "$amp" "$cl" "$compile" <<'EOF'
import glob, json, sys
tmp, wall, out, quick, amp, cl, comp = sys.argv[1:]
parts = [json.load(open(p)) for p in sorted(glob.glob(f"{tmp}/train-*.json"), key=lambda p: int(p[:-5].split("-")[-1]))]
done, failed = [t for t in parts if not t.get("failed")], [t for t in parts if t.get("failed")]
feed = json.load(open(f"{tmp}/feed.json"))
keys = ("arch", "size", "batch_size", "amp", "channels_last", "compile", "retino_images_per_s",
        "ceiling_images_per_s", "retino_over_ceiling", "target_met", "retino_peak_mem_gb", "ceiling_peak_mem_gb",
        "eval_images_per_s", "epoch_seconds", "workers", "ceiling_warmup_s", "lab_grid_min_this_arch")
results = [{k: r[k] for k in keys} for t in done for r in t["results"]]
cache, grid = [], []
for size in sorted({t["size"] for t in done}):
    at = [t for t in done if t["size"] == size]
    built = [t for t in at if not t["cache_found"]] or at  # the part that built it, not one that found it
    c = built[0]
    cache.append({"size": size, "images": c["cache_images"], "workers": c["cache_workers"],
                  "build_s": c["cache_build_s"], "images_per_s": c["cache_images_per_s"],
                  "lab_35124_projected_min": c["cache_lab_projected_min"]})
    rows = [r for r in results if r["size"] == size]
    best = {a: min((r for r in rows if r["arch"] == a), key=lambda r: r["lab_grid_min_this_arch"])
            for a in dict.fromkeys(r["arch"] for r in rows)}
    minutes = round(sum(r["lab_grid_min_this_arch"] for r in best.values()) + c["cache_lab_projected_min"], 1)
    grid.append({"size": size, **{k: at[0]["lab_grid"][k] for k in ("train", "test", "epochs", "runs_per_arch")},
                 "variant_used": {a: {k: r[k] for k in ("amp", "channels_last", "compile")} for a, r in best.items()},
                 "projected_min": minutes, "target_min": 20, "target_met": minutes < 20})
first = done[0] if done else {}
summary = {
    "benchmark": "retino bench/gpu.sh", "date": first.get("date"), "device": first.get("device"),
    "machine": first.get("machine"), "torch": first.get("torch"), "quick": quick == "1", "wall_s": int(wall),
    "options": {"amp": amp, "channels_last": cl, "compile": comp,
                "note": "variants apply on CUDA only; a CPU run measures fp32 NHWC, uncompiled"},
    "fit": {k: first.get(k) for k in ("epochs", "train_images", "test_images")},
    "results": results, "failed": failed, "cache": cache, "lab_grid": grid,
    "feed": feed if feed.get("failed") else {k: feed[k] for k in (
        "size", "batch_size", "workers", "pinned", "per_row_1proc_images_per_s", "batched_1proc_images_per_s",
        "ratio_1proc", "per_row_workers_images_per_s", "batched_workers_images_per_s", "ratio_workers",
        "ratio_vs_before", "target_ratio", "target_met")},
}
text = json.dumps(summary)
if out:
    with open(out, "w") as f:
        f.write(text + "\n")
print(text)
EOF
