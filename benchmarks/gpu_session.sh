#!/usr/bin/env bash
# One device-machine call: environment, the test suite compiled on the GPU, then benchmarks.
# Usage (on the GPU machine, repo root):
#   bash benchmarks/gpu_session.sh [tests] [quick|linear|unload|full] [train] [train_dropout] [nccl]
#   tests  the test suite on the GPU (CPU-only files are left to CI)
#   quick  the target shapes: `bench linear --quick --pieces` (M=8192, 4096->4096, r=16, bf16 x/W with fp32 and
#          with bf16 adapters: the cuBLAS floor, PEFT, every resolver implementation of lora_linear and the default,
#          and the kernels' parts, the backward's dy pass among them; limit $LINEAR_QUICK_TIMEOUT, default 180 s;
#          $LINEAR_ARGS adds flags, e.g. "--implementations torch,triton"), then `bench unload --quick`:
#          8192x8192 r=16 bf16 W with bf16 and with fp32 factors (the writing pass and the check pass alone, the
#          guarded unload_, PEFT's W += and safe_merge, the CUDA twin where it builds), then unload_many_ over the
#          112 layers of the 1b config. $UNLOAD_ARGS adds flags to bench unload, e.g. "--model none" (no
#          whole-model rows) or "--contenders unload_-stochastic,triton-write-stochastic" (those rows and copy;
#          '-' stands for the space in a row's name).
#   linear every shape of bench linear alone (M in {2048, 8192} x the Llama-7B projections x r in {16, 64} x bf16,
#          fp16 x fp32 and same-dtype adapters, the target first), limit $LINEAR_TIMEOUT (default 540 s): more than
#          one call's worth of shapes may not fit; the record is saved after every config, so a run cut off keeps
#          what it measured ("complete": false)
#   unload the unload half of quick alone (`train unload`: the issue #12 numbers with the step to compare with)
#   full   every shape of bench linear (limit $LINEAR_TIMEOUT, here 240 s by default) and bench unload
#   train  bench train (1b). Run before quick/full in the same call (`train quick`), bench unload reports the
#          whole-model unload as a share of its step; otherwise benchmarks/make_report.py joins them later.
#   nccl   the DDP example on NCCL, world size 1 (one GPU): unloads and the replica check on the real backend
# The device tool allows 600 s per call and the step limits add up to more: run `quick nccl`, then `tests train`.
#
# Results reach $OUT (the device tool's return folder; ./gpu_out by default) as they exist: each step's log is
# written there while it runs, and the benches write their JSON there (bench linear and bench unload after every
# config). Each step is stopped with SIGINT at its limit: pytest still prints which tests failed and why, bench
# linear and bench unload save the rows they have (their record then says "complete": false). $OUT/steps.txt gets
# one line per step with its status (ok, FAILED, TIMED OUT, SKIPPED) as soon as it ends, and the script ends by
# printing them.
# BUDGET (default 570 s) caps the whole call: a step's limit is cut to what is left of it less 15 s, and a step
# with under 30 s left is skipped, so the script reports before the device tool's own limit stops it.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PLORA="python3 -m plora_kernels.cli"
START=$(date +%s)
BUDGET=${BUDGET:-570}
STEPS="$OUT/steps.txt"
: > "$STEPS"
FAILED=0

summary() {
  echo "== steps (also in $STEPS)"
  cat "$STEPS"
  ls -l "$OUT"
}
trap 'echo "== session interrupted"; summary; exit 143' TERM INT

# step NAME LIMIT TAIL CMD...: run CMD, its output in $OUT/NAME.log, SIGINT at LIMIT s (KILL 30 s later); print the
# log's last TAIL lines and record the outcome in $STEPS
step() {
  local name=$1 limit=$2 tail_n=$3
  shift 3
  local left=$(( BUDGET - ($(date +%s) - START) - 15 ))
  if (( left < 30 )); then
    echo "$name: SKIPPED (${left} s of the ${BUDGET} s budget left)" | tee -a "$STEPS"
    FAILED=1
    return
  fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit} s): $*"
  local t0
  t0=$(date +%s)
  timeout -s INT -k 30 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "$tail_n" "$OUT/$name.log"
  local status
  case $rc in
    0) status=ok ;;
    124) status="TIMED OUT at ${limit} s (stopped with SIGINT; what it wrote is in \$OUT)" ;;
    137) status="KILLED 30 s after its ${limit} s limit" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  (( rc != 0 )) && FAILED=1
  echo "$name: $status, $(( $(date +%s) - t0 )) s, log $name.log" | tee -a "$STEPS"
}

unload_quick() {
  step bench_unload_quick "${UNLOAD_TIMEOUT:-200}" 75 $PLORA bench unload --quick --out "$OUT" ${UNLOAD_ARGS:-}
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/env.txt"
for stage in "$@"; do
  t0=$(date +%s)
  case $stage in
    # CPU-only files (demo, gloo, example, sm_90 cross-compile, bench smoke) are left to CI
    tests) step gpu_tests "${TEST_TIMEOUT:-420}" 0 python3 -m pytest -q -n 14 -p no:cacheprovider --timeout 60 \
             --tb=short -rfE --durations=10 --ignore=tests/test_demo.py --ignore=tests/test_example_ddp.py \
             --ignore=tests/test_distributed.py --ignore=tests/test_kernels_compile.py \
             --ignore=tests/test_bench_smoke.py --ignore=tests/test_bench_train.py \
             --ignore=tests/test_integration_transformers.py ${TEST_ARGS:-} tests
           grep -E "^(FAILED|ERROR)|passed|failed|Timeout|KeyboardInterrupt" "$OUT/gpu_tests.log" | tail -40 ;;
    quick) step bench_linear_quick "${LINEAR_QUICK_TIMEOUT:-180}" 40 $PLORA bench linear --quick --pieces --out "$OUT" \
             ${LINEAR_ARGS:-}
           unload_quick ;;
    linear) step bench_linear "${LINEAR_TIMEOUT:-540}" 60 $PLORA bench linear --out "$OUT" ${LINEAR_ARGS:-} ;;
    unload) unload_quick ;;
    full)  step bench_linear "${LINEAR_TIMEOUT:-240}" 60 $PLORA bench linear --out "$OUT" ${LINEAR_ARGS:-}
           step bench_unload "${UNLOAD_TIMEOUT:-300}" 80 $PLORA bench unload --out "$OUT" ${UNLOAD_ARGS:-} ;;
    train) step bench_train 180 30 $PLORA bench train --out "$OUT" ;;
    # the same step with LoRA dropout 0.05 on every contender with adapters (PEFT keeps its mask; ours does not)
    train_dropout) step bench_train_dropout 180 30 $PLORA bench train --lora-dropout 0.05 --out "$OUT" ;;
    nccl)  step train_ddp_nccl 120 15 torchrun --standalone --nproc_per_node=1 examples/train_ddp.py --dtype bf16 ;;
    *) echo "unknown stage $stage" | tee -a "$STEPS"; FAILED=1 ;;
  esac
  echo "== stage $stage took $(( $(date +%s) - t0 )) s"
done
summary
exit $FAILED
