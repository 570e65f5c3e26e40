#!/usr/bin/env bash
# Retino's speed benchmarks in one go, for a machine with a GPU (about 3-8 minutes on one H100).
#
# Generates synthetic data in a temporary folder (nothing is downloaded), then runs
#   1. bench/train_throughput.py  ResNet-18 and ResNet-50 at $SIZE px: ceiling / Retino / lab
#   2. bench/data_pipeline.py     the lab loader against Retino's warm pipeline, and draft decoding
# and prints one summary table. Runs on a CPU too, small: SIZE=128 QUICK=1 bash bench/gpu.sh
#
# Environment: PYTHON (default .venv/bin/python), SIZE (512), QUICK (0), WORKERS (min(8, cores)),
# DEVICE (auto), RESULTS_DIR (when set, the two JSON results are copied there).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-.venv/bin/python}
SIZE=${SIZE:-512}
QUICK=${QUICK:-0}
DEVICE=${DEVICE:-auto}
cores=$(nproc 2>/dev/null || echo 2)
WORKERS=${WORKERS:-$((cores < 8 ? cores : 8))}

TMP=$(mktemp -d "${TMPDIR:-/tmp}/retino-bench.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
export RETINO_CACHE="$TMP/cache"
quick=()
if [[ "$QUICK" == 1 ]]; then
    quick=(--quick)
fi
common=(--device "$DEVICE" --size "$SIZE" --workers "$WORKERS" --work "$TMP/work" --json ${quick[@]+"${quick[@]}"})

"$PYTHON" - <<'EOF'
import torch
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA available: {cuda}"
      + (f" ({torch.cuda.get_device_name()})" if cuda else " -- CPU run: figures are not GPU figures"))
EOF
echo "size $SIZE px, $WORKERS workers, quick=$QUICK, scratch folder $TMP"

t0=$SECONDS
echo "[1/2] training throughput (bench/train_throughput.py) ..."
"$PYTHON" bench/train_throughput.py "${common[@]}" --archs resnet18,resnet50 >"$TMP/train.json"
echo "      done in $((SECONDS - t0)) s"
t1=$SECONDS
echo "[2/2] data pipeline (bench/data_pipeline.py) ..."
"$PYTHON" bench/data_pipeline.py "${common[@]}" >"$TMP/data.json"
echo "      done in $((SECONDS - t1)) s"

if [[ -n "${RESULTS_DIR:-}" ]]; then
    mkdir -p "$RESULTS_DIR"
    cp "$TMP/train.json" "$TMP/data.json" "$RESULTS_DIR/"
fi

"$PYTHON" - "$TMP/train.json" "$TMP/data.json" "$((SECONDS - t0))" <<'EOF'
import json, sys
train = json.load(open(sys.argv[1]))
data = json.load(open(sys.argv[2]))
print()
print(f"== Retino benchmarks, {data['date']}, {train[0]['device']} ({train[0]['machine']}), "
      f"torch {data['torch']}, {sys.argv[3]} s ==")
print(f"training, batch {train[0]['batch_size']}, {train[0]['workers']} workers (images/s):")
print(f"  {'arch':<10}{'size':>6}{'ceiling':>10}{'retino':>10}{'lab':>10}{'retino/ceiling':>16}{'retino/lab':>12}")
for r in train:
    print(f"  {r['arch']:<10}{r['size']:>6}{r['ceiling']:>10.1f}{r['retino']:>10.1f}{r['lab']:>10.1f}"
          f"{r['retino_over_ceiling']:>16.3f}{r['retino_over_lab']:>12.2f}"
          f"   target >= 0.9: {'met' if r['target_met'] else 'NOT met'}")
print(f"data pipeline at {data['size']} px, batch {data['batch_size']}, {data['workers']} workers (images/s):")
print(f"  lab loader {data['lab_images_per_s']:.1f}   retino warm {data['retino_images_per_s']:.1f}   "
      f"ratio {data['ratio']:.2f}x   target >= {data['target_ratio']:.0f}x: "
      f"{'met' if data['target_met'] else 'NOT met'}")
print(f"  retino warm, bilinear rotation {data['retino_bilinear_images_per_s']:.1f} "
      f"({data['retino_bilinear_ratio']:.2f}x)")
print(f"  retino loader alone {data['retino_loader_images_per_s']:.1f}   "
      f"to_input alone {data['retino_augment_images_per_s']:.1f}")
print(f"first pass on {data['first_pass_source']}: draft {data['first_pass_draft_images_per_s']:.2f}, "
      f"full decode {data['first_pass_full_images_per_s']:.2f} images/s ({data['first_pass_draft_ratio']:.2f}x)")
print()
print("raw:")
print(json.dumps(train))
print(json.dumps(data))
EOF
