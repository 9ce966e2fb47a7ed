"""``train.compile``: torch.compile (inductor) on each decoder layer of the model.

Layer by layer, as torchtune does: the layers are alike, so their compiled graphs are shared (two: the first
layer's input, the frozen embedding's output, needs no gradient, the others' do; the compile time of a layer, not
of the whole model), the chunked loss stays eager (its buffers and chunk loop are not the compiler's business), and
FSDP's per-layer hooks sit outside each compiled region. loratune's fused path reaches the compiler as torch custom
ops with fake implementations and autograd formulas (``ops/traced.py`` for the LoRA linears and their seeded
dropout, ``ops/blocks.py`` for RMSNorm and SwiGLU), traced without a graph break (tests/training/test_compiled.py);
with dropout, each LoRA module then draws its own mask (docs/compile.md). On a CPU, inductor needs a C compiler
(scripts/setup.sh installs one).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import ops
from .distributed import decoder_layers


def compile_layers(lm: torch.nn.Module, backend: str | Callable = "inductor") -> int:
    """``torch.compile`` every decoder layer of ``lm`` in place (``nn.Module.compile``); returns how many. A model
    without recognisable decoder layers is compiled whole."""
    ops.load_kernels()  # loading one takes a lock, which would break the graph where the first call is traced
    layers = decoder_layers(lm)
    for layer in layers or [lm]:
        layer.compile(backend=backend)
    return len(layers)
