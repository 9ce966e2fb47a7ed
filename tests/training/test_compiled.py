"""train.compile: torch.compile (inductor) on each decoder layer gives the eager losses within 1e-4 over a few
optimizer steps, and does compile graphs."""

from __future__ import annotations

import pytest
import torch

from loratune import LoraConfig, get_lora_model
from loratune.ops import causal_lm_loss
from loratune.training.compiled import compile_layers
from loratune.training.distributed import decoder_layers

from conftest import ids, tiny_llama


def _losses(compiled: bool, steps: int = 3) -> list[float]:
    torch.manual_seed(0)
    lm = get_lora_model(tiny_llama(layers=2), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0,
                                                         init_lora_weights="gaussian"))
    lm.train()
    if compiled:
        assert compile_layers(lm) == 2
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    out = []
    for s in range(steps):
        x = ids(2, 10 + s, seed=s)  # a new length each step, as batches padded to their longest row have
        loss = causal_lm_loss(lm.model, x, labels=x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


def test_decoder_layers_are_found():
    assert [type(m).__name__ for m in decoder_layers(tiny_llama(layers=3))] == ["LlamaDecoderLayer"] * 3


@pytest.mark.slow
def test_compiled_layers_match_eager_within_1e_4():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = _losses(False)
    compiled = _losses(True)
    assert counters["stats"]["unique_graphs"] > 0  # the compiler did run
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert eager[-1] < eager[0]
