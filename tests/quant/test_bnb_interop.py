"""QLoRA interop with the real tools: loratune's NF4 base holds the same codes as a bitsandbytes ``Linear4bit`` base
quantized from the same weights; an adapter trained by loratune on its NF4 base gives, in PEFT on the bitsandbytes
base, loratune's logits to fp32 round-off, and the other way round (tiny Llamas, CPU, fp32 compute).

bitsandbytes' CPU dequantization kernel (0.50.2) reads the wrong block scales when a weight's rows are not a whole
number of blocks in some layouts, e.g. conftest's tiny Llama's down_proj (96 inputs) at blocksize 64: its
bitsandbytes base then computes a different function from the same codes (``test_bitsandbytes_cpu_kernel_bug``,
a strict xfail that turns into a failure once bitsandbytes fixes it). So the interop cases use layouts where its
kernel is right: conftest's tiny Llama at blocksize 32, and a tiny Llama with a 128-wide MLP at QLoRA's 64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from loratune import LoraConfig, LoraModel, get_lora_model
from loratune.ops import causal_lm_loss
from loratune.quant import NF4Linear, quantize_model, quantize_nf4

from conftest import LLAMA_TARGETS, ids, rel_err, tiny_llama

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOL = 1e-5


def tiny_llama_128(seed: int = 0) -> LlamaForCausalLM:
    """conftest's tiny Llama with a 128-wide MLP: every linear's rows are whole 64-blocks."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


CASES = [pytest.param(tiny_llama, 32, id="tiny-llama-blocksize32"),
         pytest.param(tiny_llama_128, 64, id="tiny-llama-mlp128-blocksize64")]


def bnb_base(base: nn.Module, blocksize: int = 64) -> nn.Module:
    """A copy of ``base`` whose linears (not the head) are bitsandbytes NF4 ``Linear4bit`` (double quant, fp32
    compute), quantized by bitsandbytes itself from the same weights."""
    model = copy.deepcopy(base)
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and name != "lm_head":
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(m.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", blocksize=blocksize, module=q)
            if m.bias is not None:
                q.bias = nn.Parameter(m.bias.data.clone(), requires_grad=False)
            q = q.to("cpu")  # bitsandbytes quantizes here
            q.support_avx512bf16_for_cpu = False  # its fp32 products, not its bf16 inference kernel
            model.set_submodule(name, q)
    return model.eval()


def train_a_little(model, params, steps=3):
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = ids(2, 12, seed=3)
    model.train()
    for _ in range(steps):
        out = model(input_ids=x, labels=x) if not isinstance(model, LoraModel) else None
        loss = out.loss if out is not None else causal_lm_loss(model, x, torch.ones_like(x), x)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@torch.no_grad()
def logits(model, x):
    return model(input_ids=x).logits


@pytest.mark.parametrize("make, blocksize", CASES)
def test_same_codes_as_bitsandbytes_linear4bit(make, blocksize):
    base = make()
    ours, theirs = quantize_model(copy.deepcopy(base), blocksize=blocksize), bnb_base(base, blocksize)
    pairs = [(n, m, theirs.get_submodule(n)) for n, m in ours.named_modules() if isinstance(m, NF4Linear)]
    assert len(pairs) == 14
    for name, a, b in pairs:
        state = b.weight.quant_state
        assert torch.equal(a.packed, b.weight.data.view(-1)), name
        assert torch.equal(a.absmax, state.absmax) and torch.equal(a.absmax2, state.state2.absmax), name
        assert torch.equal(a.offset, state.offset) and state.blocksize == a.blocksize, name
    x = ids(2, 10)
    assert rel_err(logits(ours, x), logits(theirs, x)) < TOL  # the frozen bases agree too


@pytest.mark.parametrize("make, blocksize", CASES)
def test_adapter_trained_by_loratune_on_nf4_runs_in_peft_on_bitsandbytes(tmp_path, make, blocksize):
    base = make()
    torch.manual_seed(0)
    lt = get_lora_model(quantize_model(copy.deepcopy(base), blocksize=blocksize),
                        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LLAMA_TARGETS))
    train_a_little(lt, [p for p in lt.parameters() if p.requires_grad])
    assert all(layer.adapters["default"].lora_B.abs().sum() > 0 for _, layer in lt.lora_layers())  # trained
    lt.save_pretrained(tmp_path)
    pm = peft.PeftModel.from_pretrained(bnb_base(base, blocksize), tmp_path).eval()
    x = ids(2, 10, seed=4)
    ours, theirs = logits(lt, x), logits(pm, x)
    assert rel_err(theirs, ours) < TOL
    with torch.no_grad(), lt.disable_adapter():
        assert rel_err(logits(lt, x), ours) > 1e-3  # the adapter matters


@pytest.mark.parametrize("make, blocksize", CASES)
def test_adapter_trained_by_peft_on_bitsandbytes_runs_in_loratune_on_nf4(tmp_path, make, blocksize):
    base = make()
    torch.manual_seed(0)
    pm = peft.get_peft_model(bnb_base(base, blocksize), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                             target_modules=LLAMA_TARGETS))
    train_a_little(pm, [p for p in pm.parameters() if p.requires_grad])
    pm.save_pretrained(tmp_path)
    lt = LoraModel.from_pretrained(quantize_model(copy.deepcopy(base), blocksize=blocksize), tmp_path)
    x = ids(2, 10, seed=4)
    theirs, ours = logits(pm.eval(), x), logits(lt, x)
    assert rel_err(ours, theirs) < TOL
    with torch.no_grad(), pm.disable_adapter():
        assert rel_err(logits(pm, x), theirs) > 1e-3


@pytest.mark.xfail(strict=True, reason="bitsandbytes' CPU dequantize_4bit kernel reads the wrong scales for a 64x96 "
                                       "weight at blocksize 64 (its torch implementation and loratune agree)")
def test_bitsandbytes_cpu_kernel_bug():
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(quantize_nf4(w).packed, packed.view(-1))  # the same codes...
    assert torch.equal(dequantize_4bit(packed, state, quant_type="nf4"), quantize_nf4(w).dequantize())  # ...values
