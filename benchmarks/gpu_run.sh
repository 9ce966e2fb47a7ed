#!/usr/bin/env bash
# Issue 4's GPU evidence in one call on a lent GPU machine (README, Performance): the fused LoRA path's exactness on
# CUDA, then the train-step benchmark in bf16 at 4×128 tokens (with memory at 8×512 and inference) and at 8×512.
# MODEL_DIR: a folder with the bundled model's config.json (its weights are random there: they do not travel, and
# the times do not depend on them); OUT_DIR: where the JSON and logs go.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out=${OUT_DIR:-.}
model=${MODEL_DIR:?set MODEL_DIR to a folder holding the model config.json}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
python3 benchmarks/check_fused_device.py --device cuda 2>&1 | tee "$out/check_fused_cuda.txt" || echo "FUSED CHECK FAILED"
run() { python3 benchmarks/train_step.py --device cuda --dtype bfloat16 --model "$model" --random-weights "$@"; }
run --repeats 9 --json "$out/train_step_gpu_bf16_4x128.json" 2>&1 | tee "$out/train_step_gpu_bf16_4x128.txt"
run --repeats 9 --batch 8 --seq 512 --mem-batch 0 --no-inference --json "$out/train_step_gpu_bf16_8x512.json" 2>&1 \
    | tee "$out/train_step_gpu_bf16_8x512.txt"
