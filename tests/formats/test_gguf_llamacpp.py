"""The exported files loaded by llama.cpp itself (llama-cpp-python) on the bundled Q4_1 base, compared with
loratune on the same token ids: the adapter's logits and effect (plain, rsLoRA + rank/alpha patterns, f16/q8_0),
a trained adapter's greedy answers, and the merged GGUF model (tokenizer, chat template, greedy answers).

Tolerances: llama.cpp multiplies Q4_1 weights by activations it quantizes to 8 bits (Q8_1), loratune by the same
weights dequantized to float32 with float activations, so base logits differ by up to ~1.5 (measured 1.36 on
these prompts, logits spanning ~40). The adapter's own effect (lora - base logits) is compared in relative norm,
where a wrong scale or q/k order gives ~100 % and the measured error is ~10 %."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from export_helpers import save_adapter

from loratune import LoraConfig, LoraModel, load_base_model
from loratune.cli import main
from loratune.cli.infer import prompt_ids
from loratune.formats.gguf import base_gguf_file, export_adapter

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/setup.sh builds it)")
pytestmark = [pytest.mark.slow, pytest.mark.bundled]
BASE = "smollm2-135m-instruct"
SYSTEM = "Answer with the date only."


def _plain_buffers():
    """llama.cpp's model parameters with its "extra buffer types" (weights repacked for AMX and other kernels)
    off: a VM may advertise AMX that it does not let a process use (a native build then dies of an illegal
    instruction here), and the LoRA tensors stay in plain buffers anyway."""
    params = _default_params()
    params.use_extra_bufts = False
    return params


_default_params = llama_cpp.llama_cpp.llama_model_default_params


def llama(path, lora=None):
    """llama.cpp on ``path`` (and LoRA adapter ``lora``), every position's logits kept."""
    kw = {"lora_path": str(lora)} if lora else {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llama_cpp.llama_cpp, "llama_model_default_params", _plain_buffers)
        return llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, n_threads=2, verbose=False, **kw)


def cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def cpp_greedy(llm, ids: list[int], n: int, eos: int) -> list[int]:
    """Greedy continuation by argmax over llama.cpp's logits (no sampler settings involved)."""
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    while len(out) < n:
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        if nxt == eos:
            break
        llm.eval([nxt])
    return out


def hf_greedy(model, ids: list[int], n: int, eos: int) -> list[int]:
    with torch.no_grad():
        g = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                           pad_token_id=eos)
    return g[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def base():
    model, tok = load_base_model(BASE)
    ids = tok("The capital of France is a city where", return_tensors="pt").input_ids
    with torch.no_grad():
        hf = model(ids).logits[0].double().numpy()
    cpp = cpp_logits(llama(base_gguf_file(BASE)), ids[0].tolist())
    return model, tok, ids, hf, cpp


ADAPTERS = {
    "plain-f32": (dict(r=8, lora_alpha=16), "f32"),
    "plain-f16": (dict(r=8, lora_alpha=16), "f16"),
    "plain-q8_0": (dict(r=8, lora_alpha=16), "q8_0"),
    # llama.cpp knows one alpha and divides by each pair's rank: every scale below differs from alpha/r
    "rslora-patterns": (dict(r=16, lora_alpha=16, use_rslora=True, rank_pattern={"k_proj": 4, "down_proj": 8},
                             alpha_pattern={"v_proj": 64, "o_proj": 4}), "f32"),
}


@pytest.mark.parametrize("label", list(ADAPTERS))
def test_adapter_in_llama_cpp_matches_loratune(base, tmp_path, label):
    model, tok, ids, hf_base, cpp_base = base
    cfg, outtype = ADAPTERS[label]
    ad = save_adapter(copy.deepcopy(model), tmp_path / "ad", LoraConfig(target_modules="all-linear", **cfg), BASE,
                      std=0.05)
    res = export_adapter(ad, tmp_path / "ad.gguf", outtype=outtype)
    assert bool(res.folded) == (label == "rslora-patterns")
    lm = LoraModel.from_pretrained(copy.deepcopy(model), ad)
    with torch.no_grad():
        hf_lora = lm(input_ids=ids).logits[0].double().numpy()
    cpp_lora = cpp_logits(llama(base_gguf_file(BASE), tmp_path / "ad.gguf"), ids[0].tolist())
    rel = np.linalg.norm(cpp_lora - cpp_base - hf_lora + hf_base) / np.linalg.norm(hf_lora - hf_base)
    print(f"\n{label}: base max|d| {np.abs(cpp_base - hf_base).max():.3f} lora max|d| "
          f"{np.abs(cpp_lora - hf_lora).max():.3f} effect max {np.abs(hf_lora - hf_base).max():.3f} effect rel "
          f"{rel:.4f} argmax {(cpp_lora.argmax(-1) == hf_lora.argmax(-1)).mean():.3f}")
    assert np.abs(cpp_base - hf_base).max() < 2.5  # Q4_1 x Q8_1 activations vs float: measured 1.36
    # with the adapter, the noise grows with the adapter's effect: measured 1.2 (effect 5) and 5.3 (effect 26)
    assert np.abs(cpp_lora - hf_lora).max() < 2.5 + 0.25 * np.abs(hf_lora - hf_base).max()
    effect_hf, effect_cpp = hf_lora - hf_base, cpp_lora - cpp_base
    assert np.abs(effect_hf).max() > 3  # the adapter matters on these logits
    assert rel < 0.35, rel  # measured 0.25 (plain), 0.18 (rsLoRA + patterns): the Q8_1 noise of two runs
    assert (cpp_lora.argmax(-1) == hf_lora.argmax(-1)).mean() >= 0.6  # measured 0.75-0.875 of 8 positions
    if res.folded:  # what llama.cpp's own converter gives (one alpha / r for every module) is far off
        cfg_file = ad / "adapter_config.json"
        one_alpha = {**json.loads(cfg_file.read_text()), "use_rslora": False, "alpha_pattern": {}}
        cfg_file.write_text(json.dumps(one_alpha))
        with torch.no_grad():
            wrong = LoraModel.from_pretrained(copy.deepcopy(model), ad)(input_ids=ids).logits[0].double().numpy()
        assert np.linalg.norm(effect_cpp - (wrong - hf_base)) / np.linalg.norm(wrong - hf_base) > 2 * rel


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A dates adapter trained for a few steps with loratune's own loop (the quickstart's settings, shorter)."""
    from loratune.cli.quickstart import QUICKSTART
    from loratune.data.dates_task import make_dates_task
    from loratune.training.config import load_run_config
    from loratune.training.loop import train

    d = tmp_path_factory.mktemp("dates")
    train_f, eval_f = make_dates_task(d / "data", n_train=STEPS * 8, n_eval=8, seed=0)
    cfg = load_run_config(None, [f"data.train={train_f}", f"data.eval={eval_f}", f"output_dir={d / 'run'}",
                                 f"train.max_steps={STEPS}", "data.max_seq_len=64", "lora.r=8", "lora.alpha=16",
                                 "train.save_every=0"], defaults=QUICKSTART)
    result = train(cfg, overwrite=True, progress=False)
    rows = [json.loads(line) for line in eval_f.read_text().splitlines()]
    return result.adapter_dir, result.model.eval(), result.tokenizer, rows


STEPS = 10  # the loss is ~0.02 by step 8 (quickstart settings, r=8)


def _prompts(tok, rows):
    return [prompt_ids(tok, [{"role": "user", "content": r["prompt"]}], SYSTEM) for r in rows]


def test_trained_adapter_gives_trained_behaviour_in_llama_cpp(trained, tmp_path):
    ad, lm, tok, rows = trained
    export_adapter(ad, tmp_path / "dates.gguf")
    with_lora, plain = llama(base_gguf_file(BASE), tmp_path / "dates.gguf"), llama(base_gguf_file(BASE))
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    same = right = base_right = 0
    for ids, row in zip(_prompts(tok, rows), rows):
        cpp = cpp_greedy(with_lora, ids, 12, eos)
        same += cpp == hf_greedy(lm, ids, 12, eos)
        right += tok.decode(cpp, skip_special_tokens=True).strip() == row["completion"]
        base_right += tok.decode(cpp_greedy(plain, ids, 12, eos), skip_special_tokens=True).strip() == row["completion"]
    assert same == len(rows)  # the same greedy answer, token for token, on every held-out prompt
    assert right >= len(rows) - 2 and base_right <= 1, (right, base_right)


def test_merged_gguf_and_ollama_folder(trained, tmp_path, capsys):
    """`loratune export --format ollama` (merged q8_0): the model file loads in llama.cpp, tokenizes like the HF
    tokenizer, carries the adapter's chat template (llama-cpp-python's chat API renders it) and answers greedily as
    loratune does; the Modelfile names it with the saved system prompt."""
    ad, lm, tok, rows = trained
    out = tmp_path / "ollama"
    assert main(["export", "--adapter", str(ad), "--format", "ollama", "--out", str(out), "--name", "dates"]) == 0
    printed = capsys.readouterr().out
    assert f"ollama create dates -f {out / 'Modelfile'}" in printed and "--max-lora-rank 8" in printed
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model.gguf" in modelfile and f'SYSTEM """{SYSTEM}"""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "ADAPTER" not in modelfile
    llm = llama(out / "model.gguf")
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    same = right = 0
    for ids, row in zip(_prompts(tok, rows), rows):
        text = tok.decode(ids)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        cpp = cpp_greedy(llm, ids, 12, eos)
        same += cpp == hf_greedy(lm, ids, 12, eos)
        right += tok.decode(cpp, skip_special_tokens=True).strip() == row["completion"]
    assert same == len(rows) and right >= len(rows) - 2, (same, right)
    chat = llm.create_chat_completion([{"role": "system", "content": SYSTEM},
                                       {"role": "user", "content": rows[0]["prompt"]}], temperature=0.0, max_tokens=12)
    answer = chat["choices"][0]["message"]["content"].strip()
    assert answer == tok.decode(hf_greedy(lm, _prompts(tok, rows[:1])[0], 12, eos), skip_special_tokens=True).strip()


def test_ollama_adapter_folder(trained, tmp_path, capsys):
    ad, _, _, _ = trained
    out = tmp_path / "ollama"
    assert main(["export", "--adapter", str(ad), "--format", "ollama", "--out", str(out), "--ollama-adapter",
                 "--outtype", "f16"]) == 0
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./base.gguf\nADAPTER ./adapter.gguf\n" in modelfile
    assert (out / "base.gguf").read_bytes() == base_gguf_file(BASE).read_bytes()
    llama(out / "base.gguf", out / "adapter.gguf")  # llama.cpp accepts the pair as Ollama would hand it over


@pytest.mark.parametrize("outtype", ["f16", "bf16"])
def test_merged_gguf_in_half_precision_answers_as_loratune(trained, tmp_path, outtype):
    """`--format gguf` at f16 / bf16 (the q8_0 file is checked above): llama.cpp loads it and gives loratune's greedy
    answers (f16: token for token; bf16 rounds the weights more coarsely: the right answer on all but two)."""
    ad, lm, tok, rows = trained
    out = tmp_path / f"merged-{outtype}.gguf"
    assert main(["export", "--adapter", str(ad), "--format", "gguf", "--out", str(out), "--outtype", outtype]) == 0
    llm = llama(out)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    same = right = 0
    for ids, row in zip(_prompts(tok, rows), rows):
        cpp = cpp_greedy(llm, ids, 12, eos)
        same += cpp == hf_greedy(lm, ids, 12, eos)
        right += tok.decode(cpp, skip_special_tokens=True).strip() == row["completion"]
    assert right >= len(rows) - 2, (outtype, same, right)
    if outtype == "f16":
        assert same == len(rows), (same, len(rows))
