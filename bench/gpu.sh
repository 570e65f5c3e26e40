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
# and -50, scratch and pretrained, 10 epochs of 28,099 + 7,025 images); and the loader's feed rate,
# per-row against batched reads (bench/feed.py). Nothing is downloaded (scratch models, generated
# photos); everything lives in a temporary folder removed at exit (RETINO_CACHE points into it).
#
# Defaults on a GPU: 512 px, both archs, AMP on, channels_last on, compile off and on (~5-8 minutes
# on one H100/H200). On a CPU the variants do not apply (Retino's CPU path is fp32 NHWC, uncompiled):
#   bash bench/gpu.sh --quick        # 32 px, tiny: a smoke run of the whole thing (~1-2 minutes)
# Environment: PYTHON (default .venv/bin/python, else python3), DEVICE (auto), SIZE (old name of --sizes).
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
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ -n "$sizes" ]] || { [[ $quick == 1 ]] && sizes=32 || sizes=512; }
DEVICE=${DEVICE:-auto}

TMP=$(mktemp -d "${TMPDIR:-/tmp}/retino-gpu.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
export RETINO_CACHE="$TMP/cache" RETINO_RUNS="$TMP/runs"
q=()
[[ $quick == 1 ]] && q=(--quick)
t0=$SECONDS

"$PYTHON" - >&2 <<'EOF'
import torch
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, " + (f"CUDA: {torch.cuda.get_device_name()}" if cuda
      else "no CUDA: a CPU run, its figures are not GPU figures"))
EOF
i=0
for size in ${sizes//,/ }; do
    echo "[train] $size px: ceiling and retino.train.fit per arch and variant ..." >&2
    "$PYTHON" bench/train_throughput.py --json ${q[@]+"${q[@]}"} --device "$DEVICE" --size "$size" \
        --archs "$archs" --amp "$amp" --channels-last "$cl" --compile "$compile" --work "$TMP/work-$size" \
        >"$TMP/train-$i.json"
    rm -rf "$TMP/work-$size" "$RETINO_CACHE"  # each size's data and cache take disk; the next starts clean
    i=$((i + 1))
done
feed_size=${sizes%%,*}
[[ $quick == 1 ]] || feed_size=512
echo "[feed] $feed_size px: per-row against batched cache reads (bench/feed.py) ..." >&2
"$PYTHON" bench/feed.py --json ${q[@]+"${q[@]}"} --device "$DEVICE" --size "$feed_size" --work "$TMP/feed" \
    >"$TMP/feed.json"

"$PYTHON" - "$TMP" "$((SECONDS - t0))" "$out" "$quick" "$amp" "$cl" "$compile" <<'EOF'
import glob, json, sys
tmp, wall, out, quick, amp, cl, comp = sys.argv[1:]
trains = [json.load(open(p)) for p in sorted(glob.glob(f"{tmp}/train-*.json"))]
feed = json.load(open(f"{tmp}/feed.json"))
first = trains[0]
results = []
for t in trains:
    for r in t["results"]:
        results.append({
            "arch": r["arch"], "size": r["size"], "batch_size": r["batch_size"],
            "amp": r["amp"], "channels_last": r["channels_last"], "compile": r["compile"],
            "retino_images_per_s": r["retino_images_per_s"], "ceiling_images_per_s": r["ceiling_images_per_s"],
            "retino_over_ceiling": r["retino_over_ceiling"], "target_met": r["target_met"],
            "retino_peak_mem_gb": r["retino_peak_mem_gb"], "ceiling_peak_mem_gb": r["ceiling_peak_mem_gb"],
            "eval_images_per_s": r["eval_images_per_s"], "epoch_seconds": r["epoch_seconds"],
            "loader_workers": r["workers"], "lab_grid_min_this_arch": r["lab_grid_min_this_arch"]})
summary = {
    "benchmark": "retino gpu.sh", "date": first["date"], "device": first["device"], "machine": first["machine"],
    "torch": first["torch"], "quick": quick == "1", "wall_s": int(wall),
    "options": {"amp": amp, "channels_last": cl, "compile": comp,
                "note": "variants apply on CUDA only; a CPU run measures fp32 NHWC, uncompiled"},
    "fit": {"epochs": first["epochs"], "train_images": first["train_images"], "test_images": first["test_images"]},
    "results": results,
    "cache": [{"size": t["size"], "images": t["cache_images"], "workers": t["cache_workers"],
               "build_s": t["cache_build_s"], "images_per_s": t["cache_images_per_s"],
               "lab_35124_projected_min": t["cache_lab_projected_min"]} for t in trains],
    "lab_grid": [{"size": t["size"], **t["lab_grid"], "target_min": 20,
                  "target_met": t["lab_grid"]["projected_min"] < 20} for t in trains],
    "feed": {k: feed[k] for k in ("size", "batch_size", "workers", "pinned", "per_row_1proc_images_per_s",
                                  "batched_1proc_images_per_s", "ratio_1proc", "per_row_workers_images_per_s",
                                  "batched_workers_images_per_s", "ratio_workers", "target_ratio", "target_met")},
}
text = json.dumps(summary)
if out:
    with open(out, "w") as f:
        f.write(text + "\n")
print(text)
EOF
