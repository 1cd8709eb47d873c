#!/usr/bin/env bash
# The product's scoring path on a lent GPU machine, in one `run` call with carry=["device/carry"]
# (build the carry first: python device/build_carry.py build; docs/device.md). About 5 minutes
# (an estimate: it has not yet run on a GPU):
#
#   bash device/gpu_run.sh                  # on the GPU machine; results under $OUT (the run's folder)
#   GPU_RUN_DRY=1 bash device/gpu_run.sh    # CPU variant at tiny sizes (device/build_carry.py dry runs it)
#
# 1. unpacks device/carry/site.tar.xz (slimmed Ray, Keras...) into a temporary folder; PYTHONPATH is
#    that folder and this repository, Keras runs on JAX;
# 2. device/carry_check.py: imports, a Ray Data job, a Train V2 JaxTrainer run, `score` on 100 cells
#    (a broken carry stops here, a minute in, not after the long phases);
# 3. samples nvidia-smi every 250 ms throughout;
# 4. hard-links the carried cells up to $IMAGES (default 50,000) under copyNNN/<class>/;
# 5. saves the product's untrained model at $IMAGE_SIZE (128) under Keras on JAX;
# 6. `malaria-ray score --backend jax --gpus-per-actor 1` at --batch-size $BATCH (1024), fp32 then bf16;
# 7. the bare model on the same GPU, fp32 and bf16, same size and batch (bench/gpu_ceiling.py: on
#    device-resident input and fed from host arrays, as an actor is);
# 8. prints each job's images/s, its ratio to the bare model fed from the host, and the mean GPU
#    utilisation of each phase; everything is kept under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY="${GPU_RUN_DRY:-0}"
PY="${PYTHON:-python3}"
OUT="${GPU_RUN_OUT:-${OUT:-$(mktemp -d -t malaria-gpu-run-XXXXXX)}}"
mkdir -p "$OUT"
if (( DRY )); then
  IMAGES="${IMAGES:-240}"; IMAGE_SIZE="${IMAGE_SIZE:-32}"; BATCH="${BATCH:-32}"; GPUS=0; SECONDS_PER_PHASE=0.5
  CHECK_IMAGES=0  # build_carry.py dry has just run carry_check.py
  export JAX_PLATFORMS=cpu
else
  IMAGES="${IMAGES:-50000}"; IMAGE_SIZE="${IMAGE_SIZE:-128}"; BATCH="${BATCH:-1024}"; GPUS=1; SECONDS_PER_PHASE=8
  CHECK_IMAGES="${CHECK_IMAGES:-100}"
fi

phase() {  # phase NAME CMD...: one line per start and end in phases.txt (epoch seconds), output to log.txt
  local name="$1"; shift
  echo "== $name: $*"
  echo "$name start $(date +%s.%N)" >> "$OUT/phases.txt"
  "$@" 2>&1 | tee -a "$OUT/$name.log"
  echo "$name end $(date +%s.%N)" >> "$OUT/phases.txt"
}

SITE="$(mktemp -d -t malaria-carry-XXXXXX)"
WORK="$(mktemp -d -t malaria-gpu-work-XXXXXX)"  # the linked cells and the model: not brought back
SMI=""
cleanup() {
  [[ -n "$SMI" ]] && kill "$SMI" 2>/dev/null
  rm -rf "$SITE" "$WORK"
}
trap cleanup EXIT
phase unpack "$PY" device/build_carry.py unpack "$SITE"
export PYTHONPATH="$SITE:$PWD" KERAS_BACKEND=jax PYTHONNOUSERSITE=1 TF_CPP_MIN_LOG_LEVEL=2
unset RAY_ADDRESS

if (( ! DRY )); then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 250 \
    > "$OUT/nvidia-smi.csv" &
  SMI=$!
fi
if (( CHECK_IMAGES )); then  # its driver and Train worker both use JAX on the GPU: neither may take 75% up front
  XLA_PYTHON_CLIENT_PREALLOCATE=false phase carry-check "$PY" device/carry_check.py --cells device/carry/cells \
    --images "$CHECK_IMAGES" --out "$OUT/check"
fi

phase link "$PY" - "$IMAGES" "$WORK/cells" <<'PYEOF'
import os, pathlib, sys
n, dest = int(sys.argv[1]), pathlib.Path(sys.argv[2])
par, uninf = (sorted(pathlib.Path("device/carry/cells", cls).glob("*.png")) for cls in ("Parasitized", "Uninfected"))
cells = [p for pair in zip(par, uninf) for p in pair]  # alternating: any n holds both classes
for i in range(n):  # bench/score_throughput.py's layout: copyNNN/<class>/<NIH name>
    src = cells[i % len(cells)]
    folder = dest / f"copy{i // len(cells):03d}" / src.parent.name
    folder.mkdir(parents=True, exist_ok=True)
    os.link(src, folder / src.name)
print(f"{n} links to {len(cells)} carried cells under {dest}")
PYEOF
phase model "$PY" -c "from malaria_ray.model import build_model, save_model; import sys; \
print('model', save_model(build_model(int(sys.argv[1]), seed=0), sys.argv[2]))" "$IMAGE_SIZE" "$WORK/model"

for precision in fp32 bf16; do
  phase "score-$precision" "$PY" -m malaria_ray.cli score --input "$WORK/cells" --model "$WORK/model" \
    --output "$OUT/scores-$precision" --backend jax --gpus-per-actor "$GPUS" --precision "$precision" --batch-size "$BATCH"
done
phase bare "$PY" bench/gpu_ceiling.py --skip train,decode --precisions fp32,bf16 --image-size "$IMAGE_SIZE" \
  --infer-batch "$BATCH" --seconds "$SECONDS_PER_PHASE" --json "$OUT/bare.json"
[[ -n "$SMI" ]] && kill "$SMI" 2>/dev/null && SMI=""

"$PY" device/gpu_report.py "$OUT" --batch "$BATCH" | tee "$OUT/report.txt"
