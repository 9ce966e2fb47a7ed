"""PiSSA, OLoRA and LoftQ initializations (adapters/variants/init.py): the split, the conversion to plain LoRA on
the original base, reloading, PEFT, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from loratune import LoraConfig, LoraModel, get_lora_model
from loratune.adapters import merged_state_dict, variants
from loratune.adapters.state import adapter_tensors
from loratune.errors import ConfigError
from loratune.quant import NF4Linear, quantize_nf4

from conftest import LLAMA_TARGETS, ids, rel_err, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def train_a_little(lm, seed=7):
    """Stand-in for training: move every trainable tensor (deterministically)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)


def test_pissa_factors_are_the_principal_singular_triplets_float64():
    torch.manual_seed(0)
    W = torch.randn(24, 16, dtype=torch.float64)
    A, B = variants.pissa_factors(W, 4, 0.5)
    U, S, Vh = torch.linalg.svd(W.float().double(), full_matrices=False)
    top = (U[:, :4] * S[:4]) @ Vh[:4]  # the best rank-4 approximation
    assert rel_err(0.5 * (B.double() @ A.double()), top) < 1e-5
    assert rel_err(B.double().T @ B.double(), torch.diag(S[:4] / 0.5)) < 1e-5  # B = U√(S/s): orthogonal columns


def test_pissa_niter_is_close_to_the_full_svd_and_repeatable():
    torch.manual_seed(0)
    W = torch.randn(60, 5) @ torch.randn(5, 40) + 0.01 * torch.randn(60, 40)  # rank 5 plus noise
    A, B = variants.pissa_factors(W, 5, 1.0, niter=4)
    A2, B2 = variants.pissa_factors(W, 5, 1.0, niter=4)
    assert torch.equal(A, A2) and torch.equal(B, B2)  # a fixed seed: loading re-derives the same split
    full_A, full_B = variants.pissa_factors(W, 5, 1.0)
    assert rel_err(B @ A, full_B @ full_A) < 1e-3


def test_olora_factors_are_qr():
    torch.manual_seed(0)
    W = torch.randn(20, 12)
    A, B = variants.olora_factors(W, 3)
    Q, R = torch.linalg.qr(W)
    assert torch.allclose(B, Q[:, :3]) and torch.allclose(A, R[:3])
    assert torch.allclose(B.T @ B, torch.eye(3), atol=1e-5)


def test_loftq_lowers_the_error_of_plain_nf4_and_leaves_a_base_on_the_nf4_grid():
    torch.manual_seed(0)
    W = torch.randn(64, 128) * 0.05
    q, A, B = variants.loftq_factors(W, 8, 2.0, iters=3)
    plain = quantize_nf4(W, 64).dequantize(torch.float32)
    assert (W - q - 2.0 * B @ A).norm() < 0.9 * (W - plain).norm()
    # the base left behind is an NF4 tensor's values: storing it in 4 bits again changes nothing
    assert torch.equal(quantize_nf4(q, 64, double_quant=False).dequantize(torch.float32), q)
    more = variants.loftq_factors(W, 8, 2.0, iters=1)
    assert (W - q - 2.0 * B @ A).norm() <= (W - more[0] - 2.0 * more[2] @ more[1]).norm() * 1.0001


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3", "olora"])
def test_init_keeps_the_output_and_moves_the_split_into_the_base(init):
    model = tiny_llama()
    x = ids()
    want = model(x).logits
    W = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lm = get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init))
    assert rel_err(lm(x).logits, want) < 1e-5
    q = lm.model.model.layers[0].self_attn.q_proj
    ad = q.adapters["default"]
    assert rel_err(q.weight + ad.scaling * ad.lora_B @ ad.lora_A, W) < 1e-6
    assert ad.lora_B.abs().sum() > 0 and not torch.equal(q.weight, W)
    assert q.plan(torch.randn(3, 64)).path == "fused"  # an init-only variant keeps plain LoRA's fast path


def test_conv1d_layers_split_in_their_own_layout():
    model = tiny_gpt2()
    x = ids()
    want = model(x).logits
    lm = get_lora_model(model, LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights="olora"))
    assert rel_err(lm(x).logits, want) < 1e-5


@pytest.mark.parametrize("init,rslora", [("pissa", False), ("olora", True)])
def test_converted_adapter_on_the_untouched_base_equals_the_trained_model(init, rslora, tmp_path):
    x = ids()
    lm = get_lora_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init,
                                                 use_rslora=rslora, rank_pattern={"v_proj": 2},
                                                 alpha_pattern={"down_proj": 4}))
    train_a_little(lm)
    trained = lm(x).logits
    lm.save_pretrained(tmp_path, convert_to_lora=True)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 8 and cfg["rank_pattern"] == {"v_proj": 4}
    assert cfg["lora_alpha"] == pytest.approx(8 * (2 ** 0.5 if rslora else 2))
    assert lm.peft_config["default"].r == 4 and lm.model.model.layers[0].self_attn.q_proj.adapters[
        "default"].lora_A.shape[0] == 4  # the live model is as it was
    ours = LoraModel.from_pretrained(tiny_llama(), tmp_path)
    assert rel_err(ours(x).logits, trained) < 1e-5
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()(x).logits
    assert rel_err(theirs, trained) < 1e-5


def test_dora_with_pissa_converts_and_keeps_its_magnitude(tmp_path):
    x = ids()
    lm = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa",
                                                 use_dora=True))
    q = lm.model.model.layers[0].self_attn.q_proj
    W = tiny_llama().model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(q.adapters["default"].lora_magnitude_vector, W.norm(dim=1), rtol=1e-5)
    train_a_little(lm)
    trained = lm(x).logits
    lm.save_pretrained(tmp_path, convert_to_lora=True)
    assert rel_err(LoraModel.from_pretrained(tiny_llama(), tmp_path)(x).logits, trained) < 1e-5
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()(x).logits
    assert rel_err(theirs, trained) < 1e-5


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_2"])
def test_unconverted_adapter_reloads_onto_the_original_base(init, tmp_path):
    """Saved as PEFT saves it (the config names the init): loading re-runs the split on the original base."""
    x = ids()
    lm = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=init))
    train_a_little(lm)
    trained = lm(x).logits
    lm.save_pretrained(tmp_path)
    assert rel_err(LoraModel.from_pretrained(tiny_llama(), tmp_path)(x).logits, trained) < 1e-5
    base = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    merged = merged_state_dict(base, {k: v.detach() for k, v in adapter_tensors(
        lm.model, lm.peft_config["default"], "default").items()}, lm.peft_config["default"])
    for k, v in lm.merge_and_unload().state_dict().items():
        assert torch.allclose(merged[k], v, atol=1e-5), k
    if init != "pissa_niter_2":  # PEFT re-runs the full SVD / QR too (its niter draw is not seeded)
        with torch.no_grad():
            theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()(x).logits
        assert rel_err(theirs, trained) < 1e-4


def test_loftq_on_a_model_quantizes_its_base_and_starts_near_it():
    model = tiny_llama()
    x = ids()
    want = model(x).logits
    plain = tiny_llama()
    for name in TARGETS:
        for layer in plain.model.layers:
            sub = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
            sub.weight.data = quantize_nf4(sub.weight.data, 64).dequantize(torch.float32)
    lm = get_lora_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights="loftq",
                                          loftq_config={"loftq_bits": 4, "loftq_iter": 2}))
    q = lm.model.model.layers[0].self_attn.q_proj
    assert torch.equal(quantize_nf4(q.weight, 64, double_quant=False).dequantize(torch.float32), q.weight)
    assert rel_err(lm(x).logits, want) < rel_err(plain(x).logits, want)  # closer than quantizing alone


def test_loftq_refusals_in_one_line():
    with pytest.raises(ConfigError, match="loftq_bits: 4") as e:
        LoraConfig(target_modules=["q_proj"], init_lora_weights="loftq")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="loftq_bits: 4"):
        LoraConfig(target_modules=["q_proj"], init_lora_weights="loftq", loftq_config={"loftq_bits": 8})
    with pytest.raises(ConfigError, match="only applies with"):
        LoraConfig(target_modules=["q_proj"], loftq_config={"loftq_bits": 4})
    model = tiny_llama()
    model.model.layers[0].self_attn.q_proj = NF4Linear.from_linear(model.model.layers[0].self_attn.q_proj)
    with pytest.raises(ConfigError, match="load the base without quantize") as e:
        get_lora_model(model, LoraConfig(target_modules=["q_proj"], init_lora_weights="loftq",
                                         loftq_config={"loftq_bits": 4}))
    assert "\n" not in str(e.value)
    assert isinstance(model.model.layers[1].self_attn.q_proj, nn.Linear)  # nothing was wrapped


@pytest.mark.parametrize("bad,match", [
    ("pissa_niter_x", "pissa_niter_4"), ("pissa_niter_0", "pissa_niter_4"), ("svd", "must be true, false"),
    ("corda", "must be true, false")])
def test_unknown_init_names_are_one_line_errors(bad, match):
    with pytest.raises(ConfigError, match=match) as e:
        LoraConfig(target_modules=["q"], init_lora_weights=bad)
    assert "\n" not in str(e.value)


def test_init_on_an_embedding_is_refused_and_loftq_conversion_too(tmp_path):
    with pytest.raises(ConfigError, match="Linear and Conv1D layers only"):
        get_lora_model(tiny_llama(), LoraConfig(target_modules=["embed_tokens"], init_lora_weights="pissa"))
    lm = get_lora_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="loftq",
                                                 loftq_config={"loftq_bits": 4}))
    with pytest.raises(ConfigError, match="only PiSSA and OLoRA adapters convert"):
        lm.save_pretrained(tmp_path, convert_to_lora=True)


def test_cli_config_takes_the_variant_keys(tmp_path, data_files):
    from loratune.training.config import dump_run_config, load_run_config

    train, _ = data_files
    path = tmp_path / "run.yaml"
    path.write_text(f"model: smollm2-135m-instruct\ndata: {{train: {train}}}\ntrain: {{max_steps: 1}}\n"
                    f"output_dir: {tmp_path / 'out'}\nlora: {{use_dora: true}}\n")
    cfg = load_run_config(path, ["lora.init_lora_weights=pissa_niter_4"])
    lc = cfg.lora_config()
    assert lc.use_dora is True and lc.init_lora_weights == "pissa_niter_4"
    dumped = dump_run_config(cfg)  # what --dry-run prints
    assert "use_dora: true" in dumped and "init_lora_weights: pissa_niter_4" in dumped
    with pytest.raises(ConfigError) as e:
        load_run_config(path, ["lora.init_lora_weights=pisa", "lora.use_dora=maybe"])
    msg = str(e.value)
    assert "lora.init_lora_weights" in msg and "pissa_niter_K" in msg and "lora.use_dora" in msg
    with pytest.raises(ConfigError, match="lora.loftq_config"):
        load_run_config(path, ["lora.init_lora_weights=loftq"])


def test_llama_targets_all_take_pissa_and_dora_together():
    lm = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS, init_lora_weights="olora",
                                                 use_dora=True))
    assert sum(1 for _ in lm.lora_layers()) == 14
