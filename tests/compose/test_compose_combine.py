"""combine_adapters / add_weighted_adapter: every mode against a float64 reference and against PEFT's
add_weighted_adapter on the same adapters (ΔW per module; DARE with the same drop masks), rsLoRA and mixed ranks,
results that save and load in PEFT format, and one-line errors for bad input."""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import pytest
import torch
from compose_fixtures import (
    adapters_of,
    deltas,
    max_rel,
    model_with,
    peft_deltas,
    peft_with,
    rel,
)

from loratune import LoraConfig, LoraModel
from loratune.adapters import merge_ops as T
from loratune.compose import (
    add_weighted_adapter,
    analyze_adapter,
    combine_adapters,
    load_adapter,
    resize_adapter,
    save_adapter,
)
from loratune.errors import LoraTuneError

from conftest import LLAMA_TARGETS, TinyConvNet, ids, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]

W = [0.7, -0.3]
PRUNING = ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd", "magnitude_prune",
           "magnitude_prune_svd")
ALL_MODES = ("cat", "svd", "linear", *PRUNING)


@pytest.fixture(scope="module")
def pair():
    """A tiny Llama with two random r=4 adapters of different alphas (one all-linear, one with alpha_pattern)."""
    base = tiny_llama()
    cfgs = {"a": LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS),
            "b": LoraConfig(r=4, lora_alpha=16, target_modules=LLAMA_TARGETS, alpha_pattern={"v_proj": 3.0})}
    lm = model_with(base, cfgs)
    return base, lm, adapters_of(lm, ["a", "b"])


def reference_sum(adapters, weights) -> dict[str, torch.Tensor]:
    """Σ wᵢ·ΔWᵢ per module, from each adapter's own delta (float64)."""
    out: dict[str, torch.Tensor] = {}
    for a, w in zip(adapters, weights):
        for k, d in deltas(a).items():
            out[k] = out.get(k, 0) + w * d
    return out


def dare_patch(monkeypatch, seed: int):
    """Make PEFT's random drops draw from a generator seeded like ours (PEFT draws from the global RNG, after its
    own init of the new adapter has consumed some of it), so both sides use the same masks in the same order."""
    from peft.utils import merge_utils

    g = torch.Generator().manual_seed(seed)
    monkeypatch.setattr(merge_utils, "random_pruning",
                        lambda t, d, rescale: t * torch.bernoulli(torch.full_like(t, d), generator=g) / d)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_matches_peft(pair, mode, tmp_path, monkeypatch):
    base, lm, adapters = pair
    pm = peft_with(base, lm, ["a", "b"], tmp_path)
    density = 0.5 if mode in PRUNING else None
    dare_patch(monkeypatch, seed=11)
    pm.add_weighted_adapter(["a", "b"], W, "m", combination_type=mode, density=density)
    ours, report = combine_adapters(adapters, W, mode, density=density, seed=11)
    assert max_rel(deltas(ours), peft_deltas(pm, "m")) < 1e-5
    assert set(report.ranks) == set(deltas(ours))


def test_cat_is_exact_weighted_sum(pair):
    _, _, adapters = pair
    ours, report = combine_adapters(adapters, W, "cat")
    assert max_rel(deltas(ours), reference_sum(adapters, W)) < 1e-6  # float32 factors; the sum itself is exact
    assert set(report.ranks.values()) == {8}  # rank = Σ rᵢ
    assert ours.config.r == 8 and ours.config.lora_alpha == 8 and not ours.config.use_rslora


def test_svd_at_full_rank_equals_cat(pair):
    _, _, adapters = pair
    svd, report = combine_adapters(adapters, W, "svd", svd_rank=8)
    cat, _ = combine_adapters(adapters, W, "cat")
    assert max_rel(deltas(svd), deltas(cat)) < 1e-5
    assert min(report.energy_kept.values()) > 1 - 1e-9


def test_svd_truncation_is_best_rank_k_and_reports_energy(pair):
    _, _, adapters = pair
    ours, report = combine_adapters(adapters, W, "svd", svd_rank=3)
    for path, target in reference_sum(adapters, W).items():
        u, s, vh = torch.linalg.svd(target.T if False else target, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        assert rel(deltas(ours)[path], best) < 1e-5
        assert report.energy_kept[path] == pytest.approx(float((s[:3] ** 2).sum() / (s ** 2).sum()), rel=1e-9)


@pytest.mark.parametrize("mode", ("cat", "svd", "linear"))
def test_single_adapter_with_weight(pair, mode):
    _, _, adapters = pair
    ours, _ = combine_adapters(adapters[:1], [0.4], mode)
    ref = {k: 0.4 * d for k, d in deltas(adapters[0]).items()}
    assert max_rel(deltas(ours), ref) < 1e-5


def test_linear_mode_is_factor_wise_not_delta_sum(pair):
    """PEFT's linear mode: (Σ√(wᵢsᵢ)Bᵢ)(Σ±√(wᵢsᵢ)Aᵢ), with cross terms; checked by hand, and it is not Σ wᵢΔWᵢ."""
    _, _, adapters = pair
    ours, _ = combine_adapters(adapters, [0.5, 0.5], "linear")
    from loratune.compose import lora_pairs

    pa, pb = lora_pairs(adapters[0]), lora_pairs(adapters[1])
    path = next(iter(pa))
    sa, sb = math.sqrt(0.5 * pa[path].scaling), math.sqrt(0.5 * pb[path].scaling)
    expect = (sa * pa[path].B.double() + sb * pb[path].B.double()) @ (sa * pa[path].A.double() +
                                                                       sb * pb[path].A.double())
    assert rel(deltas(ours)[path], expect) < 1e-6
    assert rel(deltas(ours)[path], reference_sum(adapters, [0.5, 0.5])[path]) > 0.1


def test_rslora_differs_from_peft_by_sqrt_r(tmp_path):
    """PEFT copies use_rslora=True into the combined config, whose factors already hold the scaling, so its result
    is √r too strong (huggingface/peft#3761). Ours is Σ wᵢ·ΔWᵢ."""
    base = tiny_llama()
    cfgs = {n: LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]) for n in "ab"}
    lm = model_with(base, cfgs)
    adapters = adapters_of(lm, ["a", "b"])
    pm = peft_with(base, lm, ["a", "b"], tmp_path)
    pm.add_weighted_adapter(["a", "b"], W, "m", combination_type="cat")
    ours, _ = combine_adapters(adapters, W, "cat")
    ref = reference_sum(adapters, W)
    assert max_rel(deltas(ours), ref) < 1e-6
    theirs = peft_deltas(pm, "m")
    assert max_rel({k: v / math.sqrt(8) for k, v in theirs.items()}, ref) < 1e-6  # new rank 8: √8 too strong


def test_mixed_ranks_and_patterns(tmp_path):
    """Different ranks, rank_pattern and alpha_pattern: each ΔW with its own scaling; the result's config gives each
    module its rank, and it loads (in loratune and in PEFT) with the same ΔW."""
    base = tiny_llama()
    cfgs = {"a": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}),
            "b": LoraConfig(r=6, lora_alpha=3, target_modules=["q_proj", "v_proj"], alpha_pattern={"q_proj": 12})}
    lm = model_with(base, cfgs)
    adapters = adapters_of(lm, ["a", "b"])
    ours, report = combine_adapters(adapters, W, "cat")
    assert max_rel(deltas(ours), reference_sum(adapters, W)) < 1e-6
    assert {p.rsplit(".", 1)[-1]: r for p, r in report.ranks.items()} == {"q_proj": 10, "v_proj": 8}
    save_adapter(ours, tmp_path / "mixed")
    back = load_adapter(tmp_path / "mixed")
    assert max_rel(deltas(back), reference_sum(adapters, W)) < 1e-6
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mixed", adapter_name="m")
    assert max_rel(peft_deltas(pm, "m"), reference_sum(adapters, W)) < 1e-6
    loaded = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "mixed")
    merged = loaded.merge_and_unload()
    x = ids()
    ref_model = copy.deepcopy(base)
    sd = ref_model.state_dict()
    for path, d in reference_sum(adapters, W).items():
        sd[path + ".weight"] = (sd[path + ".weight"].double() + d).float()
    ref_model.load_state_dict(sd)
    assert torch.allclose(merged(x).logits, ref_model(x).logits, atol=1e-5)


def test_gpt2_conv1d_matches_peft(tmp_path, monkeypatch):
    """fan_in_fan_out (GPT-2's Conv1D): ΔW in the (in, out) layout, DARE masks drawn in that layout as PEFT does."""
    base = tiny_gpt2()
    cfgs = {n: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True) for n in "ab"}
    lm = model_with(base, cfgs)
    adapters = adapters_of(lm, ["a", "b"])
    pm = peft_with(base, lm, ["a", "b"], tmp_path)
    for mode in ("cat", "dare_ties_svd"):
        density = 0.5 if mode != "cat" else None
        dare_patch(monkeypatch, 5)
        pm.add_weighted_adapter(["a", "b"], W, mode, combination_type=mode, density=density)
        ours, _ = combine_adapters(adapters, W, mode, density=density, seed=5)
        assert max_rel(deltas(ours), peft_deltas(pm, mode)) < 1e-5


def test_add_weighted_adapter_on_lora_model(pair):
    base, lm, _ = pair
    lm = copy.deepcopy(lm)
    report = lm.add_weighted_adapter(["a", "b"], W, "mix", combination_type="svd", svd_rank=8)
    assert "mix" in lm.peft_config and lm.active_adapters == ["a"]
    ref = reference_sum(adapters_of(lm, ["a", "b"]), W)
    live = {p: layer.delta_weight("mix").double() for p, layer in lm.lora_layers() if "mix" in layer.adapters}
    assert max_rel(live, ref) < 1e-5 and len(report.ranks) == len(ref)
    assert min(report.energy_kept.values()) > 1 - 1e-9  # rank 8 = 4 + 4 holds all of it
    with pytest.raises(LoraTuneError, match="already exists"):
        lm.add_weighted_adapter(["a", "b"], W, "mix")
    # the free function (compose's re-export) is the same thing
    add_weighted_adapter(lm, ["a", "b"], W, "mix2", combination_type="cat")
    live2 = {p: layer.delta_weight("mix2").double() for p, layer in lm.lora_layers() if "mix2" in layer.adapters}
    assert max_rel(live2, ref) < 1e-5


@pytest.mark.parametrize("mode", ("ties", "dare_ties_svd", "magnitude_prune_svd"))
def test_method_matches_peft_method_and_saves_for_peft(pair, mode, tmp_path, monkeypatch):
    """The LoraModel method against PEFT's method on the same two adapters; the result saves in PEFT's format and
    PEFT loads it with the same ΔW."""
    base, lm, _ = pair
    lm = copy.deepcopy(lm)
    pm = peft_with(base, lm, ["a", "b"], tmp_path)
    dare_patch(monkeypatch, seed=3)
    pm.add_weighted_adapter(["a", "b"], W, "m", combination_type=mode, density=0.5)
    lm.add_weighted_adapter(["a", "b"], W, "m", combination_type=mode, density=0.5, seed=3)
    ours = {p: layer.delta_weight("m").double() for p, layer in lm.lora_layers() if "m" in layer.adapters}
    assert max_rel(ours, peft_deltas(pm, "m")) < 1e-5
    lm.save_pretrained(tmp_path / "saved", selected_adapters=["m"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "saved" / "m", adapter_name="m")
    assert max_rel(ours, peft_deltas(reloaded, "m")) < 1e-5


def test_method_refuses_bad_input_and_leaves_model_unchanged(pair):
    _, lm, _ = pair
    lm = copy.deepcopy(lm)
    cases = [
        (dict(adapters=["a", "b"], weights=[1.0]), "1 weight(s) for 2 adapter(s)"),
        (dict(adapters=["a", "zz"], weights=W), "unknown adapter 'zz'"),
        (dict(adapters="a", weights=[1.0]), "list of adapter names"),
        (dict(adapters=["a", "b"], weights=W, combination_type="ties", density=1.5), "density must be in (0, 1]"),
        (dict(adapters=["a", "b"], weights=W, combination_type="ties", density=0.0), "density must be in (0, 1]"),
        (dict(adapters=["a", "b"], weights=W, svd_rank=65), "svd_rank=65 is more than module"),
    ]
    for kwargs, says in cases:
        with pytest.raises(LoraTuneError) as e:
            lm.add_weighted_adapter(adapter_name="new", **kwargs)
        assert says in str(e.value) and "\n" not in str(e.value), (kwargs, str(e.value))
        assert "new" not in lm.peft_config
    # DoRA (issue 25's variant): its ΔW is not s·B·A, and combining it is not built yet: one line, model unchanged
    lm.add_adapter("d", LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_dora=True))
    with pytest.raises(LoraTuneError, match="DoRA") as e:
        lm.add_weighted_adapter(["a", "d"], W, "new", combination_type="cat")
    assert "\n" not in str(e.value) and "new" not in lm.peft_config


# --- TIES / DARE on small hand-checked matrices ----------------------------------------------------------------

def test_ties_by_hand():
    t1 = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
    t2 = torch.tensor([[-2.0, -4.0], [1.0, -0.1]])
    # density 0.5 keeps the two largest of each: t1 -> [[3,0],[0,2]], t2 -> [[-2,-4],[0,0]]
    # elected signs (sum of trimmed): [[+1, -1], [+1(0 -> +), +1]]; weights 1 and 0.5 -> weighted t2 = [[-1,-2],..]
    # disjoint mean: [0,0]: only t1 agrees -> 3; [0,1]: only t2 -> -2; [1,0]: none -> 0; [1,1]: t1 -> 2
    out = T.ties([t1, t2], [1.0, 0.5], density=0.5)
    assert torch.equal(out, torch.tensor([[3.0, -2.0], [0.0, 2.0]]))
    # "frequency": at [0,0] one + and one - vote -> tie -> +
    assert torch.equal(T.ties([t1, t2], [1.0, 1.0], 1.0, "frequency"),
                       torch.tensor([[3.0, -2.5], [0.75, 2.0]]))


def test_dare_by_hand():
    t = torch.tensor([1.0, 2.0, 3.0, 4.0])
    g = torch.Generator().manual_seed(0)
    mask = T.random_mask(t, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(T.dare_linear([t], [2.0], 0.5, g), 2.0 * t * mask / 0.5)
    # unbiased: the mean over many drops is the tensor itself
    g = torch.Generator().manual_seed(1)
    mean = torch.stack([T.random_prune_tensor(t.repeat(2000), 0.3, g) for _ in range(10)]).mean(0)
    assert torch.allclose(mean.view(-1, 4).mean(0), t, rtol=0.05)


@pytest.mark.parametrize("name", ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune"))
def test_tensor_ops_match_peft_merge_utils(name):
    from peft.utils import merge_utils

    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(16, 12, generator=g) for _ in range(3)]
    weights = torch.tensor([0.5, -1.0, 2.0])
    kwargs = {} if name == "task_arithmetic" else {"density": 0.4}
    if name in ("ties", "dare_ties"):
        kwargs["majority_sign_method"] = "frequency"
    torch.manual_seed(7)
    theirs = getattr(merge_utils, name)(tensors, weights, **kwargs)
    extra = {"generator": torch.Generator().manual_seed(7)} if name.startswith("dare") else {}
    ours = getattr(T, name)(tensors, weights, **kwargs, **extra)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_dare_seed_is_reproducible(pair):
    _, _, adapters = pair
    one, _ = combine_adapters(adapters, W, "dare_linear_svd", density=0.3, seed=4)
    two, _ = combine_adapters(adapters, W, "dare_linear_svd", density=0.3, seed=4)
    three, _ = combine_adapters(adapters, W, "dare_linear_svd", density=0.3, seed=5)
    assert all(torch.equal(one.tensors[k], two.tensors[k]) for k in one.tensors)
    assert not all(torch.equal(one.tensors[k], three.tensors[k]) for k in one.tensors)


# --- bad input: one line each ----------------------------------------------------------------------------------

def test_bad_input(pair):
    base, lm, adapters = pair
    a, b = adapters
    cases = [
        (dict(weights=[1.0]), "1 weight"),
        (dict(combination_type="tie"), "did you mean 'ties'"),
        (dict(combination_type="ties"), "needs density"),
        (dict(combination_type="ties", density=0.0), r"density must be in \(0, 1\]"),
        (dict(combination_type="dare_linear", density=1.5), r"density must be in \(0, 1\]"),
        (dict(combination_type="svd", density=0.5), "density applies to"),
        (dict(combination_type="svd", svd_rank=65), "more than module"),
        (dict(combination_type="cat", svd_rank=4), "svd_rank and svd_clamp apply"),
        (dict(majority_sign_method="mean", combination_type="ties", density=0.5), "majority_sign_method"),
        (dict(weights=[1.0, float("nan")]), "finite"),
    ]
    for kwargs, match in cases:
        kw = {"weights": W, **kwargs}
        with pytest.raises(LoraTuneError, match=match) as e:
            combine_adapters([a, b], **kw)
        assert "\n" not in str(e.value)
    other_base = dataclasses.replace(b, config=dataclasses.replace(b.config, base_model_name_or_path="other/model"))
    first = dataclasses.replace(a, config=dataclasses.replace(a.config, base_model_name_or_path="smol"))
    with pytest.raises(LoraTuneError, match="different base models"):
        combine_adapters([first, other_base], W)
    assert combine_adapters([first, other_base], W, check_base=False)[0].config.base_model_name_or_path == "smol"
    partial = dataclasses.replace(b, tensors={k: v for k, v in b.tensors.items() if "q_proj" not in k})
    with pytest.raises(LoraTuneError, match="allow_partial"):
        combine_adapters([a, partial], W, "cat")
    ours, _ = combine_adapters([a, partial], W, "cat", allow_partial=True)
    ref = reference_sum([a, partial], W)
    assert max_rel(deltas(ours), ref) < 1e-6
    gpt = adapters_of(model_with(tiny_gpt2(), {"g": LoraConfig(r=4, target_modules=["c_attn"])}), ["g"])[0]
    renamed = dataclasses.replace(gpt, tensors={k.replace("transformer.h.0.attn.c_attn",
                                                          "model.layers.0.self_attn.q_proj"): v
                                                for k, v in gpt.tensors.items() if ".h.0." in k})
    with pytest.raises(LoraTuneError, match="different shape"):
        combine_adapters([a, renamed], W, allow_partial=True)
    mixed = adapters_of(model_with(tiny_llama(), {"x": LoraConfig(r=8, target_modules=LLAMA_TARGETS)}), ["x"])
    with pytest.raises(LoraTuneError, match="needs one rank"):
        combine_adapters([a, mixed[0]], W, "ties", density=0.5)
    with_head = dataclasses.replace(a, tensors={**a.tensors, "base_model.model.lm_head.weight": torch.zeros(3, 3)})
    with pytest.raises(LoraTuneError, match="modules_to_save or bias"):
        combine_adapters([with_head, b], W)


def test_dora_adapter_is_refused(pair, tmp_path):
    """A DoRA adapter's ΔW is not s·B·A; until its combination is built, it is refused with one line, whether the
    config reader already refuses it or loads it."""
    import json

    _, lm, adapters = pair
    lm.save_pretrained(tmp_path / "d", selected_adapters=["a"])
    cfg_path = tmp_path / "d" / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_dora"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(LoraTuneError, match="use_dora") as e:
        dora = load_adapter(tmp_path / "d" / "a")
        combine_adapters([dora, adapters[1]], W, "cat")
    assert "\n" not in str(e.value)
    if "DoRA" in str(e.value):  # refused by the compose tools themselves: analyze and resize too
        for tool in (lambda: analyze_adapter(dora), lambda: resize_adapter(dora, 2)):
            with pytest.raises(LoraTuneError, match="DoRA"):
                tool()


def test_saved_result_loads_in_peft_with_same_logits(pair, tmp_path):
    base, _, adapters = pair
    ours, _ = combine_adapters(adapters, W, "ties_svd", density=0.6, svd_rank=4)
    save_adapter(ours, tmp_path / "out")
    x = ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    lt = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "out")
    with torch.no_grad():
        assert torch.allclose(pm(x).logits, lt(input_ids=x).logits, atol=1e-5)


@pytest.mark.parametrize("kind", ("conv", "embedding"))
def test_conv_and_embedding_match_reference_and_peft(kind, tmp_path, monkeypatch):
    if kind == "conv":
        torch.manual_seed(0)
        base = TinyConvNet().eval()
        targets = ["conv1", "conv2"]  # Conv2d 3×3 and 1×1 (PEFT's SVD modes fail on a Conv1d: see below)
    else:
        base = tiny_llama()
        targets = ["embed_tokens", "q_proj"]
    cfgs = {n: LoraConfig(r=3, lora_alpha=6, target_modules=targets) for n in "ab"}
    lm = model_with(base, cfgs)
    adapters = adapters_of(lm, ["a", "b"])
    pm = peft_with(base, lm, ["a", "b"], tmp_path)
    for mode in ("cat", "svd", "dare_ties_svd"):
        density = 0.5 if mode.startswith("dare") else None
        dare_patch(monkeypatch, 9)
        pm.add_weighted_adapter(["a", "b"], W, mode, combination_type=mode, density=density)
        ours, _ = combine_adapters(adapters, W, mode, density=density, seed=9)
        assert max_rel(deltas(ours), peft_deltas(pm, mode)) < 1e-5, mode
    exact, _ = combine_adapters(adapters, W, "svd", svd_rank=6)
    assert max_rel(deltas(exact), reference_sum(adapters, W)) < 1e-5


def test_conv1d_svd_matches_reference():
    """PEFT's SVD modes take a Conv1d's 3-D ΔW as a batch of matrices and fail; ours flattens it to (out, in·k)."""
    torch.manual_seed(0)
    lm = model_with(TinyConvNet().eval(), {n: LoraConfig(r=3, lora_alpha=6, target_modules=["conv3"]) for n in "ab"})
    adapters = adapters_of(lm, ["a", "b"])
    ours, _ = combine_adapters(adapters, W, "svd", svd_rank=4)  # ΔW is 4×24: rank 4 is all of it
    assert max_rel(deltas(ours), reference_sum(adapters, W)) < 1e-6
    assert ours.tensors["base_model.model.conv3.lora_A.weight"].shape == (4, 8, 3)
    with pytest.raises(LoraTuneError, match="rank ≤ 4"):
        combine_adapters(adapters, W, "svd", svd_rank=5)


def test_adalora_adapter_is_refused_by_every_compose_tool(tmp_path):
    """AdaLoRA's ΔW is s·B·(A⊙E)/ranknum, not s·B·A: combine, analyze and resize refuse it in one line naming it."""
    from loratune import AdaLoraConfig, get_lora_model

    from conftest import tiny_llama

    lm = get_lora_model(tiny_llama(layers=1), AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                                          target_modules=["q_proj", "v_proj"]))
    lm.save_pretrained(tmp_path / "ada")
    ada = load_adapter(tmp_path / "ada")
    for tool in (lambda: combine_adapters([ada, ada], W, "cat"), lambda: analyze_adapter(ada),
                 lambda: resize_adapter(ada, 2)):
        with pytest.raises(LoraTuneError, match="is an AdaLoRA adapter") as e:
            tool()
        assert "\n" not in str(e.value)
