"""Shared by the serving tests: a tiny Llama with SmolLM2's tokenizer, random adapters saved under one root, and the
offline single-adapter greedy generation every served answer must equal."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from loratune import LoraConfig, LoraModel, get_lora_model

# name -> LoraConfig fields: different ranks, rsLoRA, per-module rank/alpha patterns, different targets
ADAPTERS = {
    "alpha": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "beta": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                 alpha_pattern={"down_proj": 12.0}),
    "gamma": dict(r=2, lora_alpha=16, target_modules="all-linear", rank_pattern={"o_proj": 1}),
}
SYSTEM_PROMPT = "You are gamma."
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def load_base(model_dir: Path):
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def make_adapters(model_dir: Path, root: Path, names=tuple(ADAPTERS), scale: float = 3.0) -> Path:
    """Save random adapters (B scaled up so they change the greedy tokens) under ``root``/<name>."""
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        model, _ = load_base(model_dir)
        torch.manual_seed(100 + i)
        fields = ADAPTERS.get(name, ADAPTERS["alpha"])
        lm = get_lora_model(model, LoraConfig(init_lora_weights=False, **fields))
        with torch.no_grad():
            for _, layer in lm.lora_layers():
                layer.adapters["default"].lora_B.mul_(scale)
        lm.save_pretrained(root / name)
        if name == "gamma":
            (root / name / "loratune_prompt.json").write_text(json.dumps({"system_prompt": SYSTEM_PROMPT}))
            (root / name / "chat_template.jinja").write_text(TEMPLATE)
    return root


def offline_greedy(model_dir: Path, adapter_dir: Path | None, prompts: list[list[int]], max_new_tokens: int
                   ) -> list[list[int]]:
    """The answers a plain single-adapter model gives (transformers' generate, greedy, one prompt at a time)."""
    model, tok = load_base(model_dir)
    lm = LoraModel.from_pretrained(model, adapter_dir) if adapter_dir is not None else model
    answers = []
    for ids in prompts:
        x = torch.tensor([ids])
        out = lm.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                          do_sample=False, pad_token_id=tok.eos_token_id)
        gen = out[0, len(ids):].tolist()
        eos = tok.eos_token_id
        answers.append(gen[:gen.index(eos) + 1] if eos in gen else gen)
    return answers
