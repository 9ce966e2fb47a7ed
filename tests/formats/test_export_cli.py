"""`loratune export` through the real command line (loratune.cli.main): what it prints, and every bad input of
the issue as a one-line error with exit code 2."""

from __future__ import annotations

import pytest
import torch
from export_helpers import save_adapter, tiny_adapter
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from loratune import LoraConfig
from loratune.cli import main


def _error(capsys, *argv) -> str:
    assert main(["export", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_gguf_adapter_export_prints_how_to_run_it(capsys, tiny_dir, tmp_path):
    ad = tiny_adapter(tiny_dir, tmp_path / "dates-ad", use_rslora=True)
    assert main(["export", "--adapter", str(ad), "--format", "gguf-adapter", "--out", str(tmp_path / "a.gguf"),
                 "--outtype", "f16"]) == 0
    out = capsys.readouterr().out
    assert f"llama.cpp LoRA adapter written to {tmp_path / 'a.gguf'} (14 pairs, alpha 8" in out
    assert "per-module scales folded into B for 14 module(s)" in out  # rsLoRA: alpha/sqrt(r), not alpha/r
    assert f"--lora {tmp_path / 'a.gguf'}" in out
    assert (f"vllm serve {tiny_dir} --enable-lora --lora-modules dates-ad={ad.resolve()} --max-lora-rank 8"
            in out)
    # an existing file is kept unless --overwrite
    err = _error(capsys, "--adapter", ad, "--format", "gguf-adapter", "--out", tmp_path / "a.gguf")
    assert "--overwrite" in err


@pytest.fixture(scope="module")
def bad(tiny_dir, tmp_path_factory):
    """Adapters the GGUF adapter format cannot carry."""
    d = tmp_path_factory.mktemp("bad")

    def llama():
        return LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)

    save_adapter(llama(), d / "mts", LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                 str(tiny_dir))
    save_adapter(llama(), d / "emb", LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]), str(tiny_dir))
    save_adapter(llama(), d / "head", LoraConfig(r=4, target_modules=["q_proj", "lm_head"]), str(tiny_dir))
    # a module llama.cpp has no tensor name for (a Qwen-MoE-like shared_expert_gate beside the MLP), as a PEFT
    # file for a model whose HF code has one
    unnamed = tiny_adapter(tiny_dir, d / "unnamed", target_modules=["q_proj"])
    sd = load_file(unnamed / "adapter_model.safetensors")
    save_file({k.replace("self_attn.q_proj", "mlp.shared_expert_gate"): v for k, v in sd.items()},
              unnamed / "adapter_model.safetensors", metadata={"format": "pt"})
    torch.manual_seed(0)
    gpt2_dir = d / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=32)).save_pretrained(
        gpt2_dir)
    save_adapter(GPT2LMHeadModel.from_pretrained(gpt2_dir), d / "gpt2-ad",
                 LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True), str(gpt2_dir))
    return d


def test_bad_inputs_are_one_line_errors(capsys, bad, tiny_dir, tmp_path):
    out = tmp_path / "x.gguf"
    err = _error(capsys, "--adapter", bad / "gpt2-ad", "--format", "gguf-adapter", "--out", out)
    assert "'gpt2'" in err and "supported architectures: llama (llama.cpp 'llama'), mistral" in err
    err = _error(capsys, "--adapter", bad / "mts", "--format", "gguf-adapter", "--out", out)
    assert "modules_to_save (lm_head)" in err and "use --format gguf" in err
    err = _error(capsys, "--adapter", bad / "emb", "--format", "gguf-adapter", "--out", out)
    assert "embedding 'model.embed_tokens'" in err and "use --format gguf" in err
    err = _error(capsys, "--adapter", bad / "head", "--format", "gguf-adapter", "--out", out)
    assert "ties its output head" in err and "use --format gguf" in err
    err = _error(capsys, "--adapter", bad / "unnamed", "--format", "gguf-adapter", "--out", out)
    assert "'model.layers.0.mlp.shared_expert_gate' has no llama.cpp tensor name" in err and "q_proj" in err
    err = _error(capsys, "--adapter", bad / "unnamed", "--format", "gguf-adapter", "--out", tmp_path / "no" / "x.gguf")
    assert f"the folder {tmp_path / 'no'} does not exist" in err
    err = _error(capsys, "--adapter", bad / "unnamed", "--format", "gguf-adapter", "--out", out, "--outtype", "q4_k")
    assert "use one of f32, f16, bf16, q8_0" in err
    err = _error(capsys, "--adapter", bad / "unnamed", "--format", "gguf", "--out", out, "--outtype", "q3_k")
    assert "not a GGUF model type" in err
    # a merged GGUF needs the base's GGUF tokenizer; an HF directory has none
    err = _error(capsys, "--adapter", bad / "mts", "--format", "gguf", "--out", out)
    assert "HF directory" in err and ".gguf file as --model" in err
    err = _error(capsys, "--adapter", bad / "mts", "--format", "ollama", "--out", tmp_path / "nope" / "o")
    assert "does not exist" in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_an_adapter_for_another_base_is_refused(capsys, tiny_dir, tmp_path):
    """A Llama adapter with 48-wide layers, exported against the 32-wide tiny Llama."""
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    ad = save_adapter(other, tmp_path / "other", LoraConfig(r=4, target_modules=["q_proj"]), "elsewhere")
    err = _error(capsys, "--adapter", ad, "--format", "gguf-adapter", "--out", tmp_path / "x.gguf",
                 "--model", tiny_dir)
    assert "made for another base model" in err
