"""The train-step benchmark's bf16 mode (issue 29): loratune's fp32 step on the same weights is timed in the same
run, and --core keeps a short run to floor, loratune (bf16 and fp32) and PEFT."""

from __future__ import annotations

import json

import torch

from conftest import load_benchmark, rel_err, tiny_llama

train_step = load_benchmark("train_step")


def test_bf16_run_times_loratune_fp32_beside_floor_and_peft(tmp_path, capsys):
    tiny_llama().config.save_pretrained(tmp_path)
    out = tmp_path / "out.json"
    argv = ["--model", str(tmp_path), "--random-weights", "--dtype", "bfloat16", "--batch", "2", "--seq", "8",
            "--repeats", "2", "--mem-batch", "0", "--no-inference", "--core", "--json", str(out),
            "--configs", "all-linear r16 dropout0"]
    assert train_step.main(argv) == 0
    r = json.loads(out.read_text())["results"][0]
    assert set(r["median_s"]) == {"floor", "loratune", "loratune_fp32", "peft"}
    assert r["loratune_over_loratune_fp32"] > 0 and r["loratune_fp32_over_peft"] > 0
    assert "lt/lt_fp32" in capsys.readouterr().out


def test_the_fp32_twin_computes_what_the_bf16_model_does(tmp_path):
    import argparse

    tiny_llama().config.save_pretrained(tmp_path)
    args = train_step.parse_args(["--model", str(tmp_path), "--random-weights", "--dtype", "bfloat16"])
    cfg = train_step.CONFIGS["all-linear r16 dropout0"]
    _, lt, _, _ = train_step.build_models(cfg, args)
    twin = train_step.fp32_twin(lt, cfg, argparse.Namespace(**vars(args)))
    assert {p.dtype for n, p in twin.named_parameters() if "lora_" not in n} == {torch.float32}
    x = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        a, b = lt(input_ids=x).logits.float(), twin(input_ids=x).logits.float()
    assert rel_err(a, b) < 3e-2  # the same model and adapter, bf16 against fp32
