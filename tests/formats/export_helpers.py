"""Shared pieces of the export tests (a plain module: a second conftest.py would shadow tests/conftest.py for the
`from conftest import` lines elsewhere): adapters with non-zero B."""

from __future__ import annotations

from pathlib import Path

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
