"""The llama.cpp LoRA adapter GGUF (formats/gguf.py) read back with the ``gguf`` package: metadata, tensor names and
shapes against the rules of llama.cpp's loader (src/llama-adapter.cpp), the q/k row permutation, per-module scales
folded into B, and the output types. llama.cpp itself loads these files in test_gguf_llamacpp.py."""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest
import torch
from export_helpers import TINY_TARGETS, gguf_pairs, peft_deltas, tiny_adapter

from loratune.formats.gguf import describe_base, export_adapter, permute_rows


def _inverse_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of llama.cpp's q/k row permutation, written independently of loratune's: llama.cpp's rows of a
    head are (r0, r_half, r1, r_half+1, ...); HF's are (r0, r1, ..., r_half, ...)."""
    rows = w.shape[0]
    d = rows // heads
    idx = np.concatenate([h * d + np.concatenate([np.arange(0, d // 2) * 2, np.arange(0, d // 2) * 2 + 1])
                          for h in range(heads)])
    return w[idx]  # llama.cpp row idx[j] holds HF row j


def test_metadata_names_and_shapes_follow_llama_cpp_loader(tiny_dir, tmp_path):
    ad = tiny_adapter(tiny_dir, tmp_path / "ad")
    res = export_adapter(ad, tmp_path / "ad.gguf")
    reader = gguf.GGUFReader(tmp_path / "ad.gguf")
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama"
    assert meta["adapter.lora.alpha"] == 8.0
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    names = {t.name for t in reader.tensors}
    hf_to_cpp = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    want = {f"blk.{i}.{hf_to_cpp[m]}.weight.lora_{x}" for i in range(2) for m in TINY_TARGETS for x in "ab"}
    assert names == want and len(res.tensors) == 14 and res.max_rank == 4 and res.folded == {}
    # llama.cpp's checks, with ne = GGUF dimension order (the reversed torch shape): base.ne[0] == a.ne[0],
    # base.ne[1] == b.ne[1], a.ne[1] == b.ne[0] (the rank); the base's ne from its HF weights (out, in) -> [in, out]
    from safetensors.torch import load_file

    hf = load_file(tiny_dir / "model.safetensors")
    info = describe_base(tiny_dir)
    by_name = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    for i in range(2):
        for m, cpp in hf_to_cpp.items():
            part = "self_attn" if "attn" in cpp else "mlp"
            base_ne = list(reversed(hf[f"model.layers.{i}.{part}.{m}.weight"].shape))
            a, b = by_name[f"blk.{i}.{cpp}.weight.lora_a"], by_name[f"blk.{i}.{cpp}.weight.lora_b"]
            assert base_ne[0] == a[0] and base_ne[1] == b[1] and a[1] == b[0] == 4
            assert info.shapes[f"blk.{i}.{cpp}.weight"] == tuple(reversed(base_ne))


def test_factors_carry_each_modules_exact_delta_with_q_k_permuted(tiny_dir, tmp_path):
    """ΔW llama.cpp computes from the file (B'·A·alpha/rank, rank read from B), un-permuted independently, equals
    loratune's ΔW (float64) for a plain adapter, rsLoRA, rank_pattern and alpha_pattern."""
    configs = {"plain": {},
               "rslora": {"use_rslora": True, "r": 8, "lora_alpha": 4},
               "patterns": {"r": 4, "lora_alpha": 8, "rank_pattern": {"k_proj": 2, "down_proj": 6},
                            "alpha_pattern": {"v_proj": 32, "down_proj": 3}}}
    for label, cfg in configs.items():
        ad = tiny_adapter(tiny_dir, tmp_path / label, **cfg)
        res = export_adapter(ad, tmp_path / f"{label}.gguf")
        alpha, pairs = gguf_pairs(tmp_path / f"{label}.gguf")
        expect = peft_deltas(ad, describe_base(tiny_dir))
        assert set(pairs) == set(expect)
        for name, (a, b) in pairs.items():
            delta = b @ a * (alpha / b.shape[1])  # llama.cpp: scale = alpha / rank, rank = b.ne[0]
            heads = {"attn_q": 4, "attn_k": 2}.get(name.split(".")[2])
            if heads:
                delta = _inverse_permute(delta, heads)
            ref = expect[name]
            assert np.abs(delta - ref).max() <= 1e-6 * np.abs(ref).max(), (label, name)
        if label == "plain":
            assert res.folded == {}
        else:
            assert len(res.folded) > 0
    # the fold is what makes the patterns right: k_proj's rank 2 and v_proj's alpha 32 in the patterned file
    _, pairs = gguf_pairs(tmp_path / "patterns.gguf")
    assert pairs["blk.0.attn_k.weight"][0].shape[0] == 2 and pairs["blk.0.ffn_down.weight"][0].shape[0] == 6


@pytest.mark.slow
@pytest.mark.bundled
def test_permutation_matches_llama_cpps_own_conversion_of_the_bundled_model():
    """The bundled GGUF was written by llama.cpp's converter: its q and k weights are loratune's HF weights (which
    loratune converted back from that file) in the order permute_rows gives."""
    from loratune import load_base_model
    from loratune.formats.gguf import base_gguf_file

    model, _ = load_base_model("smollm2-135m-instruct")
    reader = gguf.GGUFReader(base_gguf_file("smollm2-135m-instruct"))
    tensors = {t.name: t for t in reader.tensors}
    info = describe_base("smollm2-135m-instruct")
    sd = model.state_dict()
    for layer in (0, 29):
        for hf, cpp, kv in (("q_proj", "attn_q", None), ("k_proj", "attn_k", info.n_head_kv)):
            t = tensors[f"blk.{layer}.{cpp}.weight"]
            cpp_w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(t.data.shape[0], -1))
            hf_w = sd[f"model.layers.{layer}.self_attn.{hf}.weight"].float()
            assert torch.allclose(permute_rows(hf_w, info.n_head, kv), cpp_w, atol=1e-6)
            assert not torch.allclose(hf_w, cpp_w, atol=1e-3)  # the permutation is not the identity here


@pytest.mark.parametrize("outtype,tol", [("f16", 1e-3), ("bf16", 8e-3), ("q8_0", 1e-2)])
def test_outtypes(tiny_dir, tmp_path, outtype, tol):
    ad = tiny_adapter(tiny_dir, tmp_path / "ad", r=4)
    export_adapter(ad, tmp_path / "f32.gguf")
    export_adapter(ad, tmp_path / "x.gguf", outtype=outtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "x.gguf").tensors}
    # A's rows are 32 or 64 wide (whole q8_0 blocks); B's are the rank, 4, which q8_0 cannot block: f16 there,
    # as llama.cpp's own converter does
    if outtype == "q8_0":
        assert {types[n] for n in types if n.endswith("lora_a")} == {"Q8_0"}
        assert {types[n] for n in types if n.endswith("lora_b")} == {"F16"}
    else:
        assert set(types.values()) == {outtype.upper()}
    _, ref = gguf_pairs(tmp_path / "f32.gguf")
    _, got = gguf_pairs(tmp_path / "x.gguf")
    for name, (a, b) in ref.items():
        for x, y in ((a, got[name][0]), (b, got[name][1])):
            assert np.abs(x - y).max() <= tol * np.abs(x).max()


@pytest.mark.parametrize("config, says", [
    ({"use_dora": True}, "is DoRA (its magnitude vector)"),
    ({"use_adalora": True, "init_r": 4, "target_r": 2, "total_step": 10}, "is AdaLoRA (its singular values"),
    ({"init_lora_weights": "pissa"}, "was initialized with pissa and applies to the residual base"),
    ({"init_lora_weights": "olora"}, "was initialized with olora"),
])
def test_what_a_llama_cpp_adapter_cannot_carry_is_one_line_and_nothing_written(tiny_dir, tmp_path, config, says):
    from loratune.formats.gguf import ExportError

    ad = tiny_adapter(tiny_dir, tmp_path / "ad", **config)
    with pytest.raises(ExportError, match=re.escape(says)) as e:
        export_adapter(ad, tmp_path / "ad.gguf")
    assert "\n" not in str(e.value) and "--format gguf" in str(e.value)
    assert not (tmp_path / "ad.gguf").exists()
