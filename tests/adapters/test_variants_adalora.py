"""AdaLoRA (adapters/variants/adalora.py): the layer against its formula in float64, only A/B/E train, merging,
PEFT's ADALORA files both ways, the rank allocator against a hand-computed cubic budget and against PEFT's own
allocator on the same gradients, the orthogonality penalty, resuming, one-line errors, and a short training run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from loratune import LoraConfig, LoraModel, get_lora_model
from loratune.adapters import state, variants
from loratune.adapters.config import AdaLoraConfig
from loratune.adapters.files import load_adapter_weights
from loratune.errors import ConfigError, LoraTuneError

from conftest import TinyConvNet, ids, rel_err, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "v_proj"]  # 2 layers × 2 = 4 AdaLoRA layers on tiny_llama


def _cfg(**kw) -> LoraConfig:
    base = dict(use_adalora=True, init_r=6, target_r=2, tinit=2, tfinal=3, total_step=10, lora_alpha=16,
                target_modules=TARGETS)
    return LoraConfig(**{**base, **kw})


def _randomize(lm: LoraModel, seed: int = 0) -> None:
    """Non-trivial triplets (E is zero at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for f in variants.adalora_factors(lm, "default").values():
            for p in (f.lora_A, f.lora_B, f.lora_E):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.3)


def _train(lm: LoraModel, steps: int, lr: float = 1e-2, seed: int = 3) -> list[int | None]:
    """A plain loop calling the hooks as training/loop.py does; the kept-triplet count after each step."""
    hooks = variants.training_hooks(lm)
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=lr)
    x = ids(2, 8, seed=seed)
    kept = []
    for step in range(1, steps + 1):
        lm(input_ids=x, labels=x).loss.backward()
        hooks.penalty().backward()
        opt.step()
        hooks.after_step(step, steps)
        opt.zero_grad()
        pattern = lm.peft_config["default"].rank_pattern
        kept.append(sum(map(sum, pattern.values())) if pattern else None)
    return kept


def _peft_adalora(model, **kw):
    from peft import AdaLoraConfig as PeftAdaLoraConfig
    from peft import get_peft_model

    base = dict(init_r=6, target_r=2, tinit=2, tfinal=3, total_step=10, lora_alpha=16, target_modules=TARGETS)
    return get_peft_model(model, PeftAdaLoraConfig(**{**base, **kw}))


# --- the layer ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forward_and_gradients_match_the_formula_in_float64(arch):
    model = (tiny_llama() if arch == "llama" else tiny_gpt2()).double()
    targets = TARGETS if arch == "llama" else ["c_attn", "c_proj"]
    lm = get_lora_model(model, _cfg(target_modules=targets))
    path, layer = next(iter(lm.lora_layers()))
    _randomize(lm)
    ad = layer.adapters["default"]
    layer.train()
    x = torch.randn(3, 5, ad.lora_A.shape[1], dtype=torch.float64, requires_grad=True)
    out = layer(x)
    # the formula, written from scratch: W0·x + b + α·B·(A ⊙ E)·x / (init_r + 1e-5), W0 as (out, in)
    w = layer.base_layer.weight.t() if arch == "gpt2" else layer.base_layer.weight
    A, B, E = (t.detach().clone().requires_grad_() for t in (ad.lora_A, ad.lora_B, ad.lora_E))
    xr = x.detach().clone().requires_grad_()
    bias = layer.base_layer.bias if layer.base_layer.bias is not None else 0
    ref = xr @ w.t() + bias + 16 / (6 + 1e-5) * (xr @ (A * E).t() @ B.t())
    assert rel_err(out, ref) < 1e-12
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    for got, want in ((ad.lora_A.grad, A.grad), (ad.lora_B.grad, B.grad), (ad.lora_E.grad, E.grad), (x.grad, xr.grad)):
        assert rel_err(got, want) < 1e-12
    assert ad.lora_E.grad.abs().sum() > 0


def test_starts_at_the_base_model_and_only_a_b_e_train():
    x = ids()
    lm = get_lora_model(tiny_llama(), _cfg())
    with lm.disable_adapter():
        base = lm(input_ids=x).logits
    assert torch.equal(lm(input_ids=x).logits, base)  # E = 0 at init
    f = variants.adalora_factors(lm, "default")
    assert len(f) == 4 and all(a.lora_A.shape[0] == 6 and a.lora_E.shape == (6, 1) for a in f.values())
    trainable = {n.rsplit(".", 1)[-1] for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_E"}
    stds = [a.lora_A.std().item() for a in f.values()]
    assert all(0.015 < s < 0.025 for s in stds)  # normal(0, 0.02), as PEFT
    lm(input_ids=x, labels=x).loss.backward()  # at E = 0 only E's gradient is non-zero: it is what starts training
    assert all(a.lora_E.grad.abs().sum() > 0 for a in f.values())
    assert all(p.grad is None for n, p in lm.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_merge_equals_unmerged_and_unmerge_restores(make):
    lm = get_lora_model(make(), _cfg(target_modules=TARGETS if make is tiny_llama else ["c_attn", "c_proj"]))
    _randomize(lm)
    x = ids()
    lm.eval()
    before = {k: v.clone() for k, v in lm.model.state_dict().items() if "lora_" not in k}
    ref = lm(input_ids=x).logits
    lm.merge_adapter()
    assert rel_err(lm(input_ids=x).logits, ref) < 1e-5
    lm.unmerge_adapter()
    after = {k: v for k, v in lm.model.state_dict().items() if "lora_" not in k}
    assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-6


# --- files ----------------------------------------------------------------------------------------------------------
def test_save_cuts_to_kept_triplets_and_loads_back(tmp_path):
    lm = get_lora_model(tiny_llama(), _cfg())
    kept = _train(lm, 10)
    pattern = lm.peft_config["default"].rank_pattern
    assert kept[-1] == 8 and len(pattern) == 4
    lm.eval()
    x = ids()
    ref = lm(input_ids=x).logits
    lm.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    assert d["peft_type"] == "ADALORA" and "use_adalora" not in d and d["init_r"] == 6 and d["total_step"] == 10
    assert d["rank_pattern"] == {f"{p}.lora_E": m for p, m in [(k[:-7], v) for k, v in pattern.items()]}
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for key, mask in pattern.items():
        path = "base_model.model." + key[: -len(".lora_E")]
        n = sum(mask)
        assert tensors[path + ".lora_A"].shape == (n, 64) and tensors[path + ".lora_E"].shape == (n, 1)
        assert tensors[path + ".lora_B"].shape[1] == n
        assert not any(k.endswith(("ranknum", ".weight")) for k in tensors)
    loaded = LoraModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(loaded(input_ids=x).logits, ref)
    assert loaded.peft_config["default"].rank_pattern == pattern
    # merging from the files alone (state.merged_state_dict) = merge_and_unload
    merged = state.merged_state_dict(tiny_llama().state_dict(), tensors, loaded.peft_config["default"])
    want = loaded.merge_and_unload().state_dict()
    assert max(rel_err(merged[k], want[k]) for k in want) < 1e-6


def test_peft_loads_ours_with_the_same_logits(tmp_path):
    from peft import PeftModel

    lm = get_lora_model(tiny_llama(), _cfg())
    _train(lm, 10)
    lm.eval()
    x = ids()
    lm.save_pretrained(tmp_path)
    pm = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    want = lm(input_ids=x).logits
    assert rel_err(pm(input_ids=x).logits, want) < 1e-5
    assert rel_err(want, tiny_llama()(input_ids=x).logits) > 1e-3  # (not the base model)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_we_load_peft_trained_adalora_with_the_same_logits(make, tmp_path):
    from peft import PeftModel

    targets = TARGETS if make is tiny_llama else ["c_attn", "c_proj"]
    pm = _peft_adalora(make(), target_modules=targets)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    x = ids()
    for step in range(1, 11):
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.save_pretrained(tmp_path)
    assert any(t.shape[0] < 6 for k, t in load_file(tmp_path / "adapter_model.safetensors").items()
               if k.endswith("lora_A"))  # the file is cut
    want = PeftModel.from_pretrained(make(), tmp_path)(input_ids=x).logits
    ours = LoraModel.from_pretrained(make(), tmp_path)
    assert rel_err(ours(input_ids=x).logits, want) < 1e-5
    assert rel_err(want, make()(input_ids=x).logits) > 1e-4


# --- the allocator --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("delta_t, expected", [
    # 4 layers: budget 4·6 = 24 up to tinit = 2, then ⌊16·(1 − (t − 2)/5)³ + 8⌋: t=3: 16·0.512 + 8 = 16.19 -> 16,
    # t=4: 16·0.216 + 8 = 11.46 -> 11, t=5: 16·0.064 + 8 = 9.02 -> 9, t=6: 16·0.008 + 8 = 8.13 -> 8; t=7 = 10 − 3:
    # the final mask at 4·2 = 8, kept to the end. No mask before step 3 (None).
    (1, [None, None, 16, 11, 9, 8, 8, 8, 8, 8]),
    (2, [None, None, None, 11, 11, 8, 8, 8, 8, 8]),  # masks only at even steps (and at the final step 7)
])
def test_budget_follows_the_hand_computed_cubic_schedule(delta_t, expected):
    lm = get_lora_model(tiny_llama(), _cfg(deltaT=delta_t))
    kept = _train(lm, 10)
    assert kept == expected
    for mask, f in zip(lm.peft_config["default"].rank_pattern.values(), variants.adalora_factors(lm, "default")
                       .values(), strict=True):
        dropped = ~torch.tensor(mask)
        assert (f.lora_E[dropped] == 0).all()  # dropped triplets stay masked through the final phase


def test_allocator_matches_peft_on_the_same_gradients():
    pm = _peft_adalora(tiny_llama(), deltaT=2, total_step=12)
    lm = get_lora_model(tiny_llama(), _cfg(deltaT=2, total_step=12))
    factors = variants.adalora_factors(lm, "default")
    peft_params = dict(pm.base_model.model.named_parameters())
    pairs = []  # (ours, PEFT's) for every A, B, E
    for path, f in factors.items():
        for key in ("lora_A", "lora_B", "lora_E"):
            pairs.append((getattr(f, key), peft_params[f"{path}.{key}.default"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for ours, theirs in pairs:
            ours.copy_(torch.randn(ours.shape, generator=g))
            theirs.copy_(ours)
    hooks = variants.training_hooks(lm)
    for step in range(1, 13):
        with torch.no_grad():
            for ours, theirs in pairs:
                ours.add_(0.01 * torch.randn(ours.shape, generator=g))  # an "optimizer step", the same on both
                theirs.copy_(ours)
                ours.grad = torch.randn(ours.shape, generator=g)
                theirs.grad = ours.grad.clone()
        hooks.after_step(step, 12)
        pm.base_model.update_and_allocate(step)
        for ours, theirs in pairs:
            assert torch.equal(ours, theirs), step
        peft_pattern = pm.peft_config["default"].rank_pattern
        ours_pattern = lm.peft_config["default"].rank_pattern
        assert ours_pattern == ({k.removesuffix(".default"): v for k, v in peft_pattern.items()}
                                if peft_pattern else {}), step


def test_orth_penalty_matches_the_formula_and_peft():
    lm = get_lora_model(tiny_llama(), _cfg(orth_reg_weight=0.3))
    _randomize(lm)
    factors = variants.adalora_factors(lm, "default")
    got = variants.training_hooks(lm).penalty()
    terms = []
    for f in factors.values():
        A, B = f.lora_A.detach().double(), f.lora_B.detach().double()
        for cov in (A @ A.t(), B.t() @ B):
            terms.append(((cov - torch.eye(cov.shape[0], dtype=torch.float64)) ** 2).sum().sqrt())
    want = 0.3 * sum(terms) / len(terms)
    assert abs(got.item() - want.item()) / want.item() < 1e-6
    # PEFT adds the same term to the loss of a forward with labels
    pm = _peft_adalora(tiny_llama(), orth_reg_weight=0.3, task_type="CAUSAL_LM")  # (its forward adds the term)
    peft_params = dict(pm.base_model.model.named_parameters())
    with torch.no_grad():
        for path, f in factors.items():
            for key in ("lora_A", "lora_B", "lora_E"):
                peft_params[f"{path}.{key}.default"].copy_(getattr(f, key))
    x = ids()
    peft_loss = pm(input_ids=x, labels=x).loss
    our_loss = lm(input_ids=x, labels=x).loss
    assert abs((peft_loss - our_loss).item() - got.item()) < 1e-5
    assert variants.training_hooks(get_lora_model(tiny_llama(), _cfg(orth_reg_weight=0.0))).penalty() is None


def test_penalty_is_shared_between_processes(monkeypatch):
    lm = get_lora_model(tiny_llama(), _cfg())
    _randomize(lm)
    one = variants.training_hooks(lm).penalty()
    from loratune.adapters.variants import adalora

    monkeypatch.setattr(adalora.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(adalora.dist, "get_world_size", lambda: 4)
    assert abs(variants.training_hooks(lm).penalty().item() * 4 - one.item()) < 1e-6 * one.item()


def test_resume_from_a_cut_file_and_hook_state_is_exact(tmp_path):
    full = get_lora_model(tiny_llama(), _cfg(deltaT=2, total_step=12))
    _train(full, 12)
    part = get_lora_model(tiny_llama(), _cfg(deltaT=2, total_step=12))
    hooks = variants.training_hooks(part)
    opt = torch.optim.AdamW([p for p in part.parameters() if p.requires_grad], lr=1e-2)
    x = ids(2, 8, seed=3)

    def step(lm, hooks, opt, n):
        lm(input_ids=x, labels=x).loss.backward()
        hooks.penalty().backward()
        opt.step()
        hooks.after_step(n, 12)
        opt.zero_grad()

    for n in range(1, 6):
        step(part, hooks, opt, n)
    part.save_pretrained(tmp_path)  # a checkpoint: the file is cut (masks taken at step 4)
    saved_hooks, saved_opt = hooks.state_dict(), opt.state_dict()
    assert all(t.device.type == "cpu" for t in saved_hooks.values())
    # a fresh run: the run config's adapter (no rank_pattern), the checkpoint loaded into it, then the hooks' state
    resumed = get_lora_model(tiny_llama(), _cfg(deltaT=2, total_step=12))
    load_adapter_weights(resumed, tmp_path, "default")
    assert resumed.peft_config["default"].rank_pattern == part.peft_config["default"].rank_pattern
    hooks2 = variants.training_hooks(resumed)
    hooks2.load_state_dict(saved_hooks)
    opt2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    opt2.load_state_dict(saved_opt)
    for n in range(6, 13):
        step(resumed, hooks2, opt2, n)
    assert resumed.peft_config["default"].rank_pattern == full.peft_config["default"].rank_pattern
    a, b = (variants.adalora_factors(m, "default") for m in (full, resumed))
    for path in a:
        for key in ("lora_A", "lora_B", "lora_E"):
            torch.testing.assert_close(getattr(a[path], key), getattr(b[path], key), rtol=0, atol=1e-6)


# --- configuration and errors ---------------------------------------------------------------------------------------
def test_config_round_trip_and_adalora_config_class():
    c = AdaLoraConfig(init_r=6, target_r=2, total_step=10, target_modules=TARGETS, lora_alpha=16)
    assert c.use_adalora and isinstance(c, LoraConfig)
    d = json.loads(json.dumps(c.to_dict()))
    assert d["peft_type"] == "ADALORA" and d["rank_pattern"] is None and d["deltaT"] == 1
    assert LoraConfig.from_dict(d) == LoraConfig(**{**vars(c)})
    plain = LoraConfig(target_modules=TARGETS).to_dict()
    assert "target_r" not in plain and "use_adalora" not in plain  # a LoRA file stays PEFT's LoraConfig


@pytest.mark.parametrize("kw, message", [
    (dict(tinit=4, tfinal=6), r"tinit \+ tfinal \(4 \+ 6\) must be below total_step \(10\)"),
    (dict(use_dora=True), "use_adalora cannot be combined with use_dora"),
    (dict(target_r=8), r"target_r \(8\) must not exceed init_r \(6\)"),
    (dict(init_lora_weights="pissa"), "does not apply to AdaLoRA"),
    (dict(use_adalora=False), "only applies with use_adalora: true"),
    (dict(beta1=1.0), r"beta1 must be in \(0, 1\)"),
])
def test_bad_config_is_one_line(kw, message):
    with pytest.raises(ConfigError, match=message) as e:
        _cfg(**kw)
    assert "\n" not in str(e.value)


def test_bad_targets_and_missing_total_step_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="use_adalora supports Linear and Conv1D layers only, but "
                                          "'model.embed_tokens' is a Embedding") as e:
        get_lora_model(tiny_llama(), _cfg(target_modules=["embed_tokens"]))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="'conv1' is a Conv2d"):
        get_lora_model(TinyConvNet(), _cfg(target_modules=["conv1"]))
    lm = get_lora_model(tiny_llama(), _cfg(total_step=None))
    with pytest.raises(ConfigError, match="AdaLoRA without total_step") as e:
        lm.save_pretrained(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="rank allocator needs total_step"):
        variants.RankAllocator(lm.peft_config["default"], variants.adalora_factors(lm, "default")).step(1)
    with pytest.raises(ConfigError, match=r"tinit \+ tfinal \(2 \+ 3\) must be below the run's step count \(5\)"):
        variants.training_hooks(lm, total_steps=5)
    hooks = variants.training_hooks(lm, total_steps=10)  # the run's step count fills total_step
    assert lm.peft_config["default"].total_step == 10 and isinstance(hooks, variants.AdaLoraHooks)
    lm.add_adapter("plain", LoraConfig(target_modules=TARGETS))
    with pytest.raises(LoraTuneError, match="mixed-adapter batches do not support adalora adapters"):
        lm(input_ids=ids(), adapter_names=["default", "plain"])


# --- a short run of loratune's training loop ------------------------------------------------------------------------
def _run_cfg(tiny_dir, data_files, out, *extra):
    from loratune.training.config import load_run_config

    train_f, eval_f = data_files
    return load_run_config(None, [f"model={tiny_dir}", f"data.train={train_f}", f"data.eval={eval_f}",
                                  f"output_dir={out}", "train.max_steps=12", "train.batch_size=4",
                                  "train.lr=1e-2", "data.max_seq_len=64", "lora.use_adalora=true", "lora.init_r=4",
                                  "lora.target_r=2", "lora.tinit=2", "lora.tfinal=3", *extra])


@pytest.mark.slow
def test_training_loop_run_ends_at_the_budget_and_lowers_the_loss(tiny_dir, data_files, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loratune.training.loop import train

    res = train(_run_cfg(tiny_dir, data_files, tmp_path), progress=False)
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0]
    d = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    n_layers = len(variants.adalora_factors(res.model, "default"))  # all-linear: 7 per decoder layer
    assert d["peft_type"] == "ADALORA" and d["total_step"] == 12  # the run's step count
    assert sum(map(sum, d["rank_pattern"].values())) == 2 * n_layers == 14 * 2
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sum(t.shape[0] for k, t in tensors.items() if k.endswith(".lora_A")) == 2 * n_layers
    # and PEFT loads the run's adapter with the same logits as loratune's model
    x = ids(vocab=100)
    res.model.eval()
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "adapter")
    assert rel_err(pm(input_ids=x).logits, res.model(input_ids=x).logits) < 1e-5


@pytest.mark.slow
def test_training_loop_resumes_an_adalora_run_from_its_cut_checkpoint(tiny_dir, data_files, tmp_path):
    from loratune.training.loop import latest_checkpoint, train

    cfg = _run_cfg(tiny_dir, data_files, tmp_path, "train.save_every=2")
    train(cfg, progress=False, stop_after=5)  # "killed" after step 5: the checkpoint of step 4 holds a cut adapter
    ckpt = latest_checkpoint(tmp_path)
    saved = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] and sum(map(sum, saved["rank_pattern"].values())) < 4 * 14
    res = train(cfg, progress=False)  # resumes: the cut file spread into the run's init_r layers
    assert [h["step"] for h in res.history] == list(range(1, 13))
    pattern = res.model.peft_config["default"].rank_pattern
    assert sum(map(sum, pattern.values())) == 2 * 14


@pytest.mark.slow
def test_training_loop_resume_is_exact(tiny_dir, data_files, tmp_path):
    from loratune.training.loop import train

    full = train(_run_cfg(tiny_dir, data_files, tmp_path / "full", "train.save_every=2"), progress=False)
    cfg = _run_cfg(tiny_dir, data_files, tmp_path / "part", "train.save_every=2")
    train(cfg, progress=False, stop_after=5)
    part = train(cfg, progress=False)
    assert part.model.peft_config["default"].rank_pattern == full.model.peft_config["default"].rank_pattern
    a, b = (variants.adalora_factors(r.model, "default") for r in (full, part))
    for path in a:
        for key in ("lora_A", "lora_B", "lora_E"):
            torch.testing.assert_close(getattr(a[path], key), getattr(b[path], key), rtol=0, atol=1e-6)
