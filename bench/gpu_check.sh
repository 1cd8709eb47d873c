#!/usr/bin/env bash
# The GPU check: one script, about 8 minutes on one GPU machine (H100/H200, 16 CPUs), that runs the
# product's GPU paths on the shared NIH sample and prints what they reach.
#
#   MALARIA_SAMPLE_DIR=../shared/data/nih_malaria bash bench/gpu_check.sh [--dry-run]
#
# 1. trains 2 epochs at 128 px with --use-gpu in bf16, fp32 and bf16 with --xla (global batch 256), and reads
#    each run's training images/s from its history (epoch 2: the first pays tracing);
# 2. times the bare compiled train step on the same GPU, model, size and batch (the baseline);
# 3. scores a 100,000-image archive (10,000 cells replicated 10x) with --gpus-per-actor 1, with the
#    bare model's images/s measured in the same run (bench/score_throughput.py);
# 4. samples GPU utilisation with nvidia-smi every 0.5 s throughout.
# It prints images/s, mean GPU utilisation per phase and each figure's ratio to the bare model.
# --dry-run prints the commands without running them (what CI checks on machines without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
SAMPLE="${MALARIA_SAMPLE_DIR:-$(cd .. && pwd)/shared/data/nih_malaria}"
OUT="${OUT:-$(mktemp -d -t malaria-gpu-check-XXXXXX)}"
PY="${PYTHON:-python}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

run() {  # echo, then run unless --dry-run; each phase's start and end go to phases.txt
  echo "+ $*"
  if (( ! DRY )); then
    echo "$1 start $(date +%s.%N) ${*: -1}" >> "$OUT/phases.txt"
    "$@" 2>&1 | tee -a "$OUT/log.txt"
    echo "$1 end $(date +%s.%N)" >> "$OUT/phases.txt"
  fi
}

if (( ! DRY )); then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 \
    > "$OUT/nvidia-smi.csv" &
  SMI=$!
  trap 'kill $SMI 2>/dev/null || true' EXIT
fi

for variant in bf16 fp32 bf16-xla; do
  precision="${variant%-xla}"
  xla=(); [[ "$variant" == *-xla ]] && xla=(--xla)
  run "$PY" -m malaria_ray.cli train --data "$SAMPLE" --output "$OUT/train-$variant" --image-size 128 \
    --epochs 2 --batch-size 256 --learning-rate 0.004 --use-gpu --precision "$precision" --bn-recal-batches 10 \
    "${xla[@]}" --overwrite
done
run "$PY" bench/train_throughput.py --data "$SAMPLE" --bare-only on --images 3000 --image-size 128 \
  --batch-size 256 --steps 10
run "$PY" bench/score_throughput.py --images 10000 --replicate 10 --image-size 128 --batch-size 512 \
  --gpus-per-actor 1 --no-stages

if (( ! DRY )); then
  "$PY" - "$OUT" <<'PYEOF'
import json, pathlib, sys
import pandas as pd
out = pathlib.Path(sys.argv[1])
bare = [json.loads(line)["bare"] for line in (out / "log.txt").read_text().splitlines() if line.startswith('{"bare"')]
print(f"\n== GPU check ({(out / 'gpu.txt').read_text().strip()}); outputs in {out}")
for p in ("bf16", "fp32", "bf16-xla"):
    h = pd.read_parquet(out / f"train-{p}" / "history.parquet").iloc[-1]
    rate = h["train_images"] / h["train_seconds"]
    print(f"train {p}: {rate:,.0f} images/s (epoch 2)" + (f"; ratio to the bare fp32 step {rate / bare[0]:.2f}" if bare else ""))
if bare:
    print(f"bare fp32 train step: {bare[0]:,.0f} images/s")
smi = pd.read_csv(out / "nvidia-smi.csv", header=None, names=["t", "util", "mem"])
print(f"GPU utilisation: mean {smi['util'].mean():.0f}% over {len(smi)} samples (per phase: phases.txt)")
PYEOF
fi
