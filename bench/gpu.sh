#!/usr/bin/env bash
# Retino's training speed on this machine, part by part, most important first.
#
#   bash bench/gpu.sh [--quick] [--sizes 512[,256...]] [--archs resnet50,resnet18]
#                     [--amp on|off|both] [--channels-last on|off|both] [--compile on|off|both]
#                     [--profile auto|on|off] [--out FILE]
#
# The parts, in order, each printed on stdout as ONE JSON line the moment it is measured (and appended
# to $OUT/gpu.jsonl when $OUT is set, so a run cut short still returns what it measured):
#   cache    building the decode-once cache of the synthetic set (images/s, the lab's 35,124 projected)
#   train    per arch (ResNet-50 first, then ResNet-18) and variant: Retino's training images/s through
#            its real loop (retino.training.train.fit, cache warm) against the model-only ceiling, their ratio
#            (target >= 0.9 at 512 px on a GPU), eval images/s, peak memory
#   grid     the lab report's grid projected on this device (ResNet-18 and -50, scratch and pretrained,
#            10 epochs of 28,099 + 7,025 images; target under 20 minutes)
#   feed     the loader's feed rate, per-row against batched cache reads (bench/feed.py)
#   profile  (auto: only for an arch under 0.9 of its ceiling) one torch.profiler trace of 20 steps of
#            the real loop: the top ten ops by device time and the device's idle share
#            (bench/profile_loop.py; the gzipped trace goes to $OUT too)
# and last a summary line holding all of it ({"part": "summary", ...}; also written to --out and
# $OUT/gpu.json). Progress goes to stderr. Nothing is downloaded (scratch models, generated photos);
# all of it lives in a temporary folder removed at exit.
#
# Defaults on a GPU: 512 px, both archs, AMP on, channels_last on, compile off then on. The one command
# for a lent GPU is `bash bench/gpu.sh --compile off` (112 s on one H200 for the loop before the
# host-sync work); each compiled part runs in its own process under COMPILE_LIMIT (default 600 s),
# since a compiled run there once did not finish in 8 minutes. On a CPU the variants do not apply
# (Retino's CPU path is fp32 NHWC, uncompiled):
#   bash bench/gpu.sh --quick        # 32 px, tiny: a smoke run of every part (~2 minutes)
# Environment: PYTHON (default .venv/bin/python, else python3), DEVICE (auto), SIZE (old name of
# --sizes), STEP_LIMIT (seconds for each uncompiled part, default 900), COMPILE_LIMIT, PROFILE_LIMIT
# (default 180), OUT (a folder that receives gpu.jsonl, gpu.json and the traces).
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

quick=0 sizes=${SIZE:-} archs=resnet50,resnet18 amp=on cl=on compile=both out="" profile=auto
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) quick=1 ;;
        --sizes|--size) sizes=$2; shift ;;
        --archs) archs=$2; shift ;;
        --amp) amp=$2; shift ;;
        --channels-last) cl=$2; shift ;;
        --compile) compile=$2; shift ;;
        --out) out=$2; shift ;;
        --profile) profile=$2; shift ;;
        -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
        *) echo "gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ -n "$sizes" ]] || { [[ $quick == 1 ]] && sizes=32 || sizes=512; }
DEVICE=${DEVICE:-auto} STEP_LIMIT=${STEP_LIMIT:-900} COMPILE_LIMIT=${COMPILE_LIMIT:-600} PROFILE_LIMIT=${PROFILE_LIMIT:-180}
case "$profile" in auto|on|off) ;; *) echo "gpu.sh: --profile takes auto, on or off" >&2; exit 2 ;; esac

TMP=$(mktemp -d "${TMPDIR:-/tmp}/retino-gpu.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
export RETINO_CACHE="$TMP/cache" RETINO_RUNS="$TMP/runs" PYTHONUNBUFFERED=1
q=()
[[ $quick == 1 ]] && q=(--quick)
# Every part's line goes to stdout and to $LINES as it is measured: under $OUT when the caller gave one.
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    LINES="$OUT/gpu.jsonl" TRACES="$OUT"
else
    LINES="$TMP/gpu.jsonl" TRACES="$TMP"
fi
: >"$LINES"
part() { tee -a "$LINES"; }  # stdin: JSON lines of one part
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
        echo "[train] $size px, compile $c: ceiling and retino.training.train.fit per arch (limit ${limit} s) ..." >&2
        rc=0
        timeout -k 20 "$limit" "$PYTHON" bench/train_throughput.py --emit --summary "$TMP/train-$i.json" \
            ${q[@]+"${q[@]}"} --device "$DEVICE" --size "$size" --archs "$archs" --amp "$amp" \
            --channels-last "$cl" --compile "$c" --work "$TMP/work-$size" | part || rc=${PIPESTATUS[0]}
        if [[ $rc != 0 ]]; then
            echo "      failed (exit $rc$([[ $rc == 124 || $rc == 137 ]] && echo ", over ${limit} s"))" >&2
            printf '{"failed": true, "size": %s, "compile": "%s", "exit": %s, "limit_s": %s}\n' \
                "$size" "$c" "$rc" "$limit" >"$TMP/train-$i.json"
            printf '{"part": "train", "failed": true, "size": %s, "compile": "%s", "exit": %s, "limit_s": %s}\n' \
                "$size" "$c" "$rc" "$limit" | part
        fi
        i=$((i + 1))
    done
done
"$PYTHON" bench/gpu_summary.py grid "$TMP" | part

feed_size=${sizes%%,*}
[[ $quick == 1 ]] || feed_size=512
echo "[feed] $feed_size px: per-row against batched cache reads (bench/feed.py) ..." >&2
timeout -k 20 "$STEP_LIMIT" "$PYTHON" bench/feed.py --json ${q[@]+"${q[@]}"} --device "$DEVICE" \
    --size "$feed_size" --work "$TMP/feed" >"$TMP/feed.json" || echo '{"failed": true}' >"$TMP/feed.json"
rm -rf "$TMP/feed"
"$PYTHON" bench/gpu_summary.py feed "$TMP" | part

# The profile: for each arch of the first size that missed 0.9 of its ceiling (auto), or every arch (on).
psize=${sizes%%,*}
for arch in $("$PYTHON" bench/gpu_summary.py to-profile "$TMP" "$profile" "$psize"); do
    echo "[profile] $arch $psize px: 20 steps of the real loop under torch.profiler (limit ${PROFILE_LIMIT} s) ..." >&2
    rc=0
    timeout -k 20 "$PROFILE_LIMIT" "$PYTHON" bench/profile_loop.py ${q[@]+"${q[@]}"} --device "$DEVICE" \
        --arch "$arch" --size "$psize" --work "$TMP/work-$psize" --trace-dir "$TRACES" \
        >"$TMP/profile-$arch.json" || rc=$?
    if [[ $rc != 0 ]]; then
        echo "      failed (exit $rc)" >&2
        printf '{"part": "profile", "arch": "%s", "failed": true, "exit": %s}\n' "$arch" "$rc" >"$TMP/profile-$arch.json"
    fi
    part <"$TMP/profile-$arch.json"
done

"$PYTHON" bench/gpu_summary.py summary "$TMP" "$((SECONDS - t0))" "$out" "$quick" "$amp" "$cl" "$compile" \
    "${OUT:-}" | part
