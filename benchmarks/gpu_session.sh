#!/usr/bin/env bash
# One device-machine call: environment, the test suite compiled on the GPU, then benchmarks.
# Usage (on the GPU machine, repo root): bash benchmarks/gpu_session.sh [tests] [quick|full] [train] [nccl]
# quick: the target shapes, with the forward's parts (--pieces) and the unload ablations (--sweep)
# The device tool allows 600 s per call: the stage limits add up to more, so run `quick nccl`, then `tests train`.
# Logs and JSON go to $OUT (the device tool's return folder) or ./gpu_out.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PLORA="python3 -m plora_kernels.cli"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/env.txt"
for stage in "$@"; do
  t0=$(date +%s)
  case $stage in
    # CPU-only files (demo, gloo, example, sm_90 cross-compile, bench smoke) are left to CI
    # SIGINT, not SIGTERM, at the limit: pytest then still prints which tests failed and why
    tests) timeout -s INT -k 30 "${TEST_TIMEOUT:-200}" python3 -m pytest -q -n 14 -p no:cacheprovider --timeout 60 \
             --tb=short -rfE --durations=10 --ignore=tests/test_demo.py --ignore=tests/test_example_ddp.py \
             --ignore=tests/test_distributed.py --ignore=tests/test_kernels_compile.py \
             --ignore=tests/test_bench_smoke.py --ignore=tests/test_bench_train.py \
             --ignore=tests/test_integration_transformers.py ${TEST_ARGS:-} tests > "$OUT/gpu_tests.log" 2>&1
           grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.log" | tail -40 ;;
    quick) timeout 150 $PLORA bench linear --quick --pieces --out "$OUT" 2>&1 | tee "$OUT/bench_linear_quick.log" | tail -25
           timeout 240 $PLORA bench unload --quick --sweep --out "$OUT" 2>&1 | tee "$OUT/bench_unload_quick.log" | tail -45 ;;
    full)  timeout "${LINEAR_TIMEOUT:-240}" $PLORA bench linear --out "$OUT" 2>&1 | tee "$OUT/bench_linear.log" | tail -60
           timeout 150 $PLORA bench unload --out "$OUT" 2>&1 | tee "$OUT/bench_unload.log" | tail -60 ;;
    train) timeout 180 $PLORA bench train --out "$OUT" 2>&1 | tee "$OUT/bench_train.log" | tail -30 ;;
    # the DDP example on NCCL, world size 1 (one GPU): unloads and the replica check on the real backend
    nccl)  timeout 120 torchrun --standalone --nproc_per_node=1 examples/train_ddp.py --dtype bf16 2>&1 \
             | tee "$OUT/train_ddp_nccl.log" | tail -15 ;;
    *) echo "unknown stage $stage" ;;
  esac
  echo "== stage $stage took $(( $(date +%s) - t0 )) s"
done
