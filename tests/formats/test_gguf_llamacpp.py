"""The exported LoRA adapter GGUF, loaded by llama.cpp itself (llama-cpp-python) on the bundled Q4_1 base."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_helpers import save_adapter

from loratune import LoraConfig, LoraModel, load_base_model
from loratune.formats.gguf import base_gguf_file, export_adapter

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = [pytest.mark.slow, pytest.mark.bundled]


def _llama_logits(ids: list[int], lora: str | None = None) -> np.ndarray:
    kw = {"lora_path": lora} if lora else {}
    llm = llama_cpp.Llama(str(base_gguf_file("smollm2-135m-instruct")), n_ctx=64, logits_all=True, n_threads=2,
                          verbose=False, **kw)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def test_adapter_in_llama_cpp_matches_loratune(tmp_path):
    model, tok = load_base_model("smollm2-135m-instruct")
    ad = save_adapter(model, tmp_path / "ad", LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                                init_lora_weights="gaussian"),
                      "smollm2-135m-instruct")
    export_adapter(ad, tmp_path / "ad.gguf")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    model, _ = load_base_model("smollm2-135m-instruct")
    with torch.no_grad():
        hf_base = model(ids).logits[0].numpy()
        hf_lora = LoraModel.from_pretrained(model, ad)(input_ids=ids).logits[0].numpy()
    cpp_base, cpp_lora = _llama_logits(ids[0].tolist()), _llama_logits(ids[0].tolist(), str(tmp_path / "ad.gguf"))
    # llama.cpp quantizes activations for its Q4_1 products: measured 1.36 (base) / 1.12 (adapter) max abs logits
    assert np.abs(cpp_base - hf_base).max() < 2.5
    assert np.abs(cpp_lora - hf_lora).max() < 2.5
    # the adapter's own effect (max ~12 logits here) agrees to ~12 % (a wrong q/k permutation or scale: ~100 %)
    effect_hf, effect_cpp = hf_lora - hf_base, cpp_lora - cpp_base
    assert np.abs(effect_hf).max() > 3
    assert np.linalg.norm(effect_cpp - effect_hf) / np.linalg.norm(effect_hf) < 0.25
    assert (cpp_lora.argmax(-1) == hf_lora.argmax(-1)).all()
