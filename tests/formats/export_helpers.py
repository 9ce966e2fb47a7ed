"""Shared pieces of the export tests (a plain module: a second conftest.py would shadow tests/conftest.py for the
`from conftest import` lines elsewhere): adapters with non-zero B."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import LlamaForCausalLM

from loratune import LoraConfig, get_lora_model

TINY_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomize_b(lm, seed: int = 0, std: float = 0.02) -> None:
    """Give every lora_B a random value (a fresh adapter has B = 0, which would hide every mistake)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def save_adapter(model, out: Path, config: LoraConfig, base: str, seed: int = 0, std: float = 0.02) -> Path:
    """``config`` injected into ``model`` with random B, saved to ``out`` with ``base`` as its recorded base."""
    torch.manual_seed(seed)
    config.base_model_name_or_path = base
    lm = get_lora_model(model, config)
    randomize_b(lm, seed, std)
    lm.save_pretrained(out)
    return out


def tiny_adapter(tiny_dir: Path, out: Path, **config) -> Path:
    """A random all-projections adapter (r=4 unless ``config`` says otherwise) on the tiny Llama (4 heads, 2 KV
    heads: the q and k permutations differ)."""
    model = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    config = {"r": 4, "lora_alpha": 8, "target_modules": TINY_TARGETS, **config}
    return save_adapter(model, out, LoraConfig(**config), str(tiny_dir))


def gguf_pairs(path: Path) -> tuple[float, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(alpha, {base tensor name: (A (r, in), B (out, r))}) of a llama.cpp LoRA adapter file, read with the gguf
    package and dequantized to float64 (numpy's order is the reversed GGUF ``ne``, i.e. torch's)."""
    reader = gguf.GGUFReader(path)
    out: dict[str, list] = {}
    for t in reader.tensors:
        stem, _, which = t.name.rpartition(".")
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            arr = np.asarray(t.data, dtype=np.float64)
        else:
            arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        out.setdefault(stem, [None, None])[0 if which == "lora_a" else 1] = arr.reshape(
            [int(n) for n in reversed(t.shape)])
    return float(reader.fields["adapter.lora.alpha"].contents()), {k: (a, b) for k, (a, b) in out.items()}


def peft_deltas(adapter_dir: Path, info) -> dict[str, np.ndarray]:
    """{GGUF base tensor name: ΔW (out, in) in HF row order, float64} as loratune's own LoRA layers compute it for
    the adapter loaded on its base (the tiny HF model ``info`` describes)."""
    from loratune import LoraModel
    from loratune.formats.gguf import gguf_tensor_name

    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    base = LlamaForCausalLM.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float64)
    lm = LoraModel.from_pretrained(base, adapter_dir)
    with torch.no_grad():
        return {gguf_tensor_name(name, info): layer.delta_weight("default").double().numpy()
                for name, layer in lm.lora_layers()}
