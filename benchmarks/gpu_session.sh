#!/usr/bin/env bash
# One device-machine call: environment, the self-test, the test suite compiled on the GPU, then benchmarks.
# Usage (on the GPU machine, repo root):
#   bash benchmarks/gpu_session.sh [check] [tests|tests:GROUP] [quick|linear|unload|full] [train] [train_dropout]
#        [nccl]
#   (no argument: `check quick`)
#   check  `plora check --device cuda --out $OUT` (limit $CHECK_TIMEOUT, default 150 s): every op on every
#          implementation this GPU runs, against the float64 reference, as a table and a JSON record
#          (check-cuda<N>-<time>.json); it builds the CUDA twin into $PLORA_CSRC_CACHE on the way. `quick` runs it
#          first when the call has not run it yet. $CHECK_ARGS adds flags, e.g. "--quick"; $CHECK_DEVICE replaces
#          the device (cpu runs the script end to end on a machine without a GPU).
#   tests  the test suite on the GPU (CPU-only files are left to CI): first the CUDA twin (csrc/) is built once
#          into $PLORA_CSRC_CACHE (limit $CSRC_TIMEOUT, default 120 s), then one pytest call per group of test files
#          (kernels, unload, api; any test file in no group and not CPU-only runs in a last group, other), each with
#          its own limit ($TEST_TIMEOUT_<GROUP>, defaults below), `-p xdist -n $TEST_WORKERS` (default 4)
#          `--dist loadgroup`, `--timeout $TEST_TIMEOUT_EACH` per test (default 90 s) and a `--session-timeout` 40 s
#          under the group's limit, so every group ends with pytest's own summary (-ra: each failure, error and
#          skip with its reason) even when it runs out of time; its log is $OUT/tests_<group>.log, written as it
#          runs. $TEST_ARGS adds flags to every group.
#   tests:GROUP  one group alone (tests:kernels, tests:unload, tests:api, tests:other), after the build: the groups
#          add up to more than one call's budget, so a second call can run the ones the first had to skip
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
# The device tool allows 600 s per call and the step limits add up to more: run `check quick nccl`, then `tests`
# (then `tests:api` if the first `tests` call had to skip it), then `train`.
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
# the CUDA twin's build cache (ops/cuda_unload.py reads $PLORA_CSRC_CACHE): built once per call, by the check or by
# the tests step, and found there by every later process (the check, each pytest worker); build/ is git-ignored, so
# the device machine keeps it between calls
export PLORA_CSRC_CACHE=${PLORA_CSRC_CACHE:-$PWD/build/plora_csrc}
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
    *) status="FAILED (exit $rc)"
       if grep -q "session-timeout: .* exceeded" "$OUT/$name.log"; then  # pytest stopped itself, summary printed
         status="STOPPED by --session-timeout, the rest not run (exit $rc): $(grep -E " in [0-9.]+s" \
           "$OUT/$name.log" | tail -1 | tr -d '=')"
       fi ;;
  esac
  (( rc != 0 )) && FAILED=1
  echo "$name: $status, $(( $(date +%s) - t0 )) s, log $name.log" | tee -a "$STEPS"
}

unload_quick() {
  step bench_unload_quick "${UNLOAD_TIMEOUT:-200}" 75 $PLORA bench unload --quick --out "$OUT" ${UNLOAD_ARGS:-}
}

CHECKED=0
check() {  # plora check, once per call
  (( CHECKED )) && return
  CHECKED=1
  step check "${CHECK_TIMEOUT:-150}" 40 $PLORA check --device "${CHECK_DEVICE:-cuda}" --out "$OUT" \
    ${CHECK_ARGS:-}
}

BUILT=0
csrc_build() {  # the CUDA twin, once per call, before any pytest process can race to compile it
  (( BUILT )) && return
  BUILT=1
  step csrc_build "${CSRC_TIMEOUT:-120}" 5 python3 -c "
from plora_kernels.ops import cuda_unload
if cuda_unload.available():
    print('csrc library:', cuda_unload.build(verbose=True))
else:
    print('no nvcc and no prebuilt library: the CUDA twin is not built (its tests skip)')"
}

# The test files by group. CPU-only files (the demo, gloo and torchrun runs, the sm_90 cross-compile, the bench smoke
# tests, the study, transformers) are left to CI; a test file in no group and not CPU-only lands in `other`.
TEST_GROUPS="kernels unload api other"
CPU_ONLY="test_demo.py test_example_ddp.py test_distributed.py test_integration_ddp.py test_kernels_compile.py
  test_bench_smoke.py test_bench_train.py test_integration_transformers.py test_study.py"
GROUP_kernels="test_lora_linear.py test_lora_dy_pass.py test_lora_dropout.py test_lora_matmul_tma.py
  test_lora_matmul_ws.py test_lora_matmul_offsets.py"
GROUP_unload="test_unload.py test_unload_many.py test_csrc_unload.py test_device_guard.py test_formats.py"
GROUP_api="test_bad_input.py test_resolver.py test_modules.py test_train.py test_pipelines_rounding.py
  test_pipelines_steps.py test_auto_every.py test_imports.py test_check.py"
LIMIT_kernels=${TEST_TIMEOUT_KERNELS:-180}
LIMIT_unload=${TEST_TIMEOUT_UNLOAD:-150}
LIMIT_api=${TEST_TIMEOUT_API:-150}
LIMIT_other=${TEST_TIMEOUT_OTHER:-90}

group_files() {  # the test files of group $1, as paths
  local group=$1 f name listed
  if [[ $group == other ]]; then
    listed=" $CPU_ONLY $GROUP_kernels $GROUP_unload $GROUP_api "
    listed=${listed//$'\n'/ }
    for f in tests/test_*.py; do
      name=${f#tests/}
      [[ $listed == *" $name "* ]] || echo "$f"
    done
    return
  fi
  local var="GROUP_$group"
  for name in ${!var}; do echo "tests/$name"; done
}

# test_group GROUP: one pytest call over the group's files, ending with its summary inside the group's limit
test_group() {
  local group=$1 var="LIMIT_$1"
  local limit=${!var} files
  files=$(group_files "$group")
  if [[ -z $files ]]; then
    echo "== tests_$group: no test files"
    return
  fi
  local left=$(( BUDGET - ($(date +%s) - START) - 15 ))
  (( limit > left )) && limit=$left
  # pytest stops starting tests 40 s before the limit (worker shutdown and the summary fit in the rest); a test
  # still running then is stopped by --timeout, and the step's SIGINT at the limit is the last resort
  local session=$(( limit - 40 ))
  (( session < 20 )) && session=20
  step "tests_$group" "$limit" 0 python3 -m pytest -p xdist -p timeout -n "${TEST_WORKERS:-4}" --dist loadgroup \
    -q -ra --tb=short -p no:cacheprovider --durations=5 --timeout "${TEST_TIMEOUT_EACH:-90}" \
    --session-timeout "$session" ${TEST_ARGS:-} $files
  grep -E "^(FAILED|ERROR)|passed|failed|no tests ran|Timeout|session-timeout|KeyboardInterrupt" \
    "$OUT/tests_$group.log" | tail -40
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/env.txt"
(( $# )) || set -- check quick
for stage in "$@"; do
  t0=$(date +%s)
  case $stage in
    check) check ;;
    tests) csrc_build
           for group in $TEST_GROUPS; do test_group "$group"; done ;;
    tests:*) group=${stage#tests:}
           if [[ " $TEST_GROUPS " == *" $group "* ]]; then
             csrc_build
             test_group "$group"
           else
             echo "unknown test group $group (one of: $TEST_GROUPS)" | tee -a "$STEPS"; FAILED=1
           fi ;;
    quick) check
           step bench_linear_quick "${LINEAR_QUICK_TIMEOUT:-180}" 40 $PLORA bench linear --quick --pieces --out "$OUT" \
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
