#!/usr/bin/env bash
# One command for an accelerator, sized for under 8 minutes on one GPU:
#   1. update_cost.py on the large trees (25M and 100M parameters, float32 and
#      bfloat16): time and achieved memory bandwidth of each optimizer;
#   2. step_throughput.py: samples/s of the harness step, and the cost of the
#      norm batch-size test (per-device statistics on 2+ devices; on one
#      device, the moments of 2 microbatches);
#   3. a short large_batch.py run (B = 4096, 20k examples, 5 epochs, 2
#      learning rates each);
# then accelerator_summary.py writes OUT/summary.md, naming the device: the
# fraction of HBM bandwidth each optimizer achieves, the step throughput and
# whether the batch-size test stays under 2 % of a step. Everything (JSON,
# figures, logs, the MNIST-1D cache) goes under one folder.
#
#   bash benchmarks/accelerator_check.sh [OUT]  # default runs/accelerator_check/<UTC time>
#   TINY=1 bash benchmarks/accelerator_check.sh OUT  # seconds-sized settings:
#                                                    # checks every command (CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/accelerator_check/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export SNGM_OPTAX_CACHE="$out/cache"
python="${PYTHON:-python}"

devices="$("$python" -c 'import jax; print(jax.device_count())')"
"$python" -c 'import jax; print("devices:", jax.devices())' | tee "$out/devices.txt"

if [[ "${TINY:-0}" == 1 ]]; then
  update_sizes=(--trees flat_1m --dtypes float32 --rounds 1 --repeats 2)
  step_sizes=(--models mlp --batch-sizes 64 --repeats 1 --steps 1)
  large_batch_sizes=(--batch-sizes 256 --epochs 1 --num-samples 2000
                     --grid-size 1)
  per_device_tree=flat_1m
else
  update_sizes=(--trees resnet50_like transformer_like
                --dtypes float32 bfloat16 --rounds 3 --repeats 10)
  step_sizes=(--models mlp cnn --batch-sizes 128 1024 4096 --repeats 5
              --steps 10)
  large_batch_sizes=(--batch-sizes 4096 --epochs 5 --num-samples 20000
                     --grid-size 2)
  per_device_tree=resnet50_like
fi
# The per-device (pmapped) transforms need 2+ devices.
per_device_trees=()
if (( devices >= 2 )); then per_device_trees=("$per_device_tree"); fi

step() {  # step NAME COMMAND...: runs it, logs to OUT/NAME_log.txt, times it
  local name="$1" start="$SECONDS"
  shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$out/${name}_log.txt"
  echo "=== $name: $((SECONDS - start)) s" | tee -a "$out/times.txt"
}

step update_cost "$python" benchmarks/update_cost.py "${update_sizes[@]}" \
  --devices "$devices" --per-device-trees "${per_device_trees[@]}" \
  --out "$out/update_cost.json"

if (( devices >= 2 )); then
  step step_throughput "$python" benchmarks/step_throughput.py \
    "${step_sizes[@]}" --devices 1 "$devices" \
    --out "$out/step_throughput.json"
else
  step step_throughput "$python" benchmarks/step_throughput.py \
    "${step_sizes[@]}" --devices 1 --optimizers msgd sngm \
    --out "$out/step_throughput.json"
  step step_throughput_test "$python" benchmarks/step_throughput.py \
    "${step_sizes[@]}" --devices 1 --microbatches 2 \
    --optimizers sngm sngm+norm_test \
    --out "$out/step_throughput_microbatch_test.json"
fi

step large_batch "$python" benchmarks/large_batch.py "${large_batch_sizes[@]}" \
  --extra-seeds 0 --out "$out" --quiet

"$python" benchmarks/accelerator_summary.py "$out"
echo "wrote $out/summary.md; total $SECONDS s"
