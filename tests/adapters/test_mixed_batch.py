"""Mixed-adapter batches: per-call metadata (no module state), rows equal their single-adapter model, base rows exact.

The reference for every row is the same model run on the same batch with only that row's adapter active (or with
adapters disabled, for base rows), so any difference is the mixed path's.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from loratune import BASE, LoraConfig, get_lora_model
from loratune.adapters.batch import Factors, MixedBatch, current_batch, mixed_batch
from loratune.adapters.layers import LoraLayer, ModulesToSave

from conftest import ids, rel_err, tiny_gpt2, tiny_llama

TOL = 1e-5


def _add(lm_or_model, name, seed, **cfg):
    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, **cfg)
    if hasattr(lm_or_model, "peft_config"):
        lm_or_model.add_adapter(name, config)
        return lm_or_model
    return get_lora_model(lm_or_model, config, name)


def _three_adapters(model):
    """Adapters of different ranks, rsLoRA, per-module rank/alpha patterns and different targets."""
    lm = _add(model, "a", 1, r=2, lora_alpha=4, target_modules="all-linear")
    _add(lm, "b", 2, r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear",
         rank_pattern={"v_proj": 4}, alpha_pattern={"down_proj": 3.0})
    _add(lm, "c", 3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return lm


def _singles(lm, x, names):
    with torch.no_grad():
        with lm.disable_adapter():
            out = {BASE: lm(input_ids=x).logits}
        for name in names:
            lm.set_adapter(name)
            out[name] = lm(input_ids=x).logits
    return out


def test_rows_equal_single_adapter_outputs_mixed_ranks_rslora():
    lm = _three_adapters(tiny_llama())
    rows = ["b", BASE, "a", "c", "b", BASE, "a", "c"]
    x = ids(batch=len(rows), seq=7)
    with torch.no_grad():
        mixed = lm(input_ids=x, adapter_names=rows).logits
    singles = _singles(lm, x, ["a", "b", "c"])
    for i, name in enumerate(rows):
        if name == BASE:
            assert torch.equal(mixed[i], singles[BASE][i])  # exactly: base rows are never touched
        else:
            assert rel_err(mixed[i], singles[name][i]) <= TOL, (i, name)
            assert rel_err(mixed[i], singles[BASE][i]) > 1e-3  # the adapter did change the row
    # no state left on any module
    assert all(m.row_adapters is None for m in lm.modules() if isinstance(m, (LoraLayer, ModulesToSave)))


def test_gpt2_conv1d_rows_and_all_base_batch():
    lm = _add(tiny_gpt2(), "one", 1, r=4, target_modules=["c_attn", "c_proj"])
    _add(lm, "two", 2, r=2, target_modules=["c_fc"])
    rows = ["two", "one", BASE]
    x = ids(batch=3, seq=6)
    with torch.no_grad():
        mixed = lm(input_ids=x, adapter_names=rows).logits
        all_base = lm(input_ids=x, adapter_names=[BASE] * 3).logits
    singles = _singles(lm, x, ["one", "two"])
    assert torch.equal(all_base, singles[BASE])
    assert torch.equal(mixed[2], singles[BASE][2])
    for i in (0, 1):
        assert rel_err(mixed[i], singles[rows[i]][i]) <= TOL


def test_generate_rows_equal_single_adapter_generate():
    lm = _three_adapters(tiny_llama())
    rows = ["c", BASE, "b", "a"]
    x = ids(batch=4, seq=5)
    mixed = lm.generate(input_ids=x, adapter_names=rows, max_new_tokens=6, do_sample=False)
    for i, name in enumerate(rows):
        if name == BASE:
            with lm.disable_adapter():
                want = lm.generate(input_ids=x[i:i + 1], max_new_tokens=6, do_sample=False)
        else:
            lm.set_adapter(name)
            want = lm.generate(input_ids=x[i:i + 1], max_new_tokens=6, do_sample=False)
        assert torch.equal(mixed[i], want[0]), name


def test_modules_to_save_rows():
    torch.manual_seed(0)
    lm = get_lora_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                 init_lora_weights=False), "a")
    with torch.no_grad():
        lm.model.lm_head.copies["a"].weight.add_(0.5)  # the trained copy differs from the original
    x = ids(batch=2, seq=4)
    with torch.no_grad():
        mixed = lm(input_ids=x, adapter_names=[BASE, "a"]).logits
    singles = _singles(lm, x, ["a"])
    assert torch.equal(mixed[0], singles[BASE][0])
    assert rel_err(mixed[1], singles["a"][1]) <= TOL


def test_concurrent_threads_each_get_their_own_rows():
    lm = _three_adapters(tiny_llama())
    x = ids(batch=3, seq=6)
    plans = [["a", "b", "c"], ["c", BASE, "a"], [BASE, "b", "b"], ["b", "a", BASE]]
    singles = _singles(lm, x, ["a", "b", "c"])
    errors: list[str] = []
    barrier = threading.Barrier(len(plans))

    def worker(rows):
        barrier.wait()
        for _ in range(4):
            with torch.no_grad():
                out = lm(input_ids=x, adapter_names=rows).logits
            for i, name in enumerate(rows):
                if rel_err(out[i], singles[name][i]) > TOL:
                    errors.append(f"{rows} row {i}")

    threads = [threading.Thread(target=worker, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_batch_is_per_call_and_per_model():
    lm = _add(tiny_llama(), "a", 1, r=2, target_modules=["q_proj"])
    other = _add(tiny_llama(seed=3), "a", 2, r=2, target_modules=["q_proj"])
    layer = next(m for _, m in lm.lora_layers())
    other_layer = next(m for _, m in other.lora_layers())
    batch = MixedBatch(["a"], lambda m, k: m.adapters[k], [layer])
    assert current_batch(layer) is None
    with mixed_batch(batch):
        assert current_batch(layer) is batch
        assert current_batch(other_layer) is None  # another model's layer ignores it
        seen = []
        t = threading.Thread(target=lambda: seen.append(current_batch(layer)))
        t.start()
        t.join()
        assert seen == [None]  # another thread does not see it
    assert current_batch(layer) is None


def _stacks_from(lm, names):
    """Stacked, zero-padded factors (slot 0 = zeros, scaling folded into B), as the serving registry builds them."""
    stacks, ranks = {}, {}
    for _, layer in lm.lora_layers():
        out_f, in_f = layer.weight.shape
        rmax = max(layer.adapters[n].r for n in names if n in layer.adapters)
        A = torch.zeros(len(names) + 1, rmax, in_f)
        B = torch.zeros(len(names) + 1, out_f, rmax)
        for slot, n in enumerate(names, 1):
            if n in layer.adapters:
                ad = layer.adapters[n]
                A[slot, :ad.r] = ad.lora_A.detach()
                B[slot, :, :ad.r] = ad.lora_B.detach() * ad.scaling
                ranks[id(layer), slot] = ad.r
        stacks[id(layer)] = (A, B)
    return stacks, ranks


@pytest.mark.parametrize("seq", [1, 9])  # 1: decode shapes; 9: prefill shapes (the gathered path)
def test_stacked_slots_gathered_and_segmented_paths(seq):
    lm = _three_adapters(tiny_llama())
    names = ["a", "b", "c"]
    stacks, ranks = _stacks_from(lm, names)

    def factors(layer, slot):
        r = ranks.get((id(layer), slot))
        if r is None:
            return None
        A, B = stacks[id(layer)]
        return Factors(A[slot, :r], B[slot, :, :r])

    slots = [2, None, 1, 3, 3, 2, None, 1, 2]
    x = ids(batch=len(slots), seq=seq)
    singles = _singles(lm, x, names)
    layers = [m for _, m in lm.lora_layers()]
    for use_stacks in (True, False):
        batch = MixedBatch(slots, factors, layers, stacks=(lambda m: stacks[id(m)]) if use_stacks else None)
        with torch.no_grad(), mixed_batch(batch):
            out = lm.model(input_ids=x).logits
        for i, slot in enumerate(slots):
            want = singles[BASE if slot is None else names[slot - 1]][i]
            if slot is None:
                assert torch.equal(out[i], want)
            else:
                assert rel_err(out[i], want) <= TOL, (use_stacks, i)


def test_mixed_batch_of_wrong_row_count_is_an_error():
    lm = _add(tiny_llama(), "a", 1, r=2, target_modules=["q_proj"])
    batch = MixedBatch(["a", None], lambda m, k: m.adapters[k], [m for _, m in lm.lora_layers()])
    with mixed_batch(batch), pytest.raises(Exception, match="rows"):
        lm.model(input_ids=ids(batch=3, seq=4))


def test_deepcopy_and_training_still_work():
    lm = _add(tiny_llama(), "a", 1, r=2, target_modules=["q_proj", "v_proj"])
    _add(lm, "b", 2, r=2, target_modules=["q_proj", "v_proj"])
    lm.set_adapter("a")
    lm2 = copy.deepcopy(lm)
    x = ids(batch=2, seq=5)
    loss = lm2(input_ids=x, labels=x, adapter_names=["a", "b"]).loss
    loss.backward()
    grads = [p.grad for n, p in lm2.named_parameters() if ".adapters.a." in n and p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def _stacked_batch(lm, names, slots, **kw):
    stacks, ranks = _stacks_from(lm, names)

    def factors(layer, slot):
        r = ranks.get((id(layer), slot))
        if r is None:
            return None
        A, B = stacks[id(layer)]
        return Factors(A[slot, :r], B[slot, :, :r])

    return MixedBatch(slots, factors, [m for _, m in lm.lora_layers()], stacks=lambda m: stacks[id(m)], **kw)


@pytest.mark.parametrize("slots, onehot_max, path", [
    ([2, 2, 2, 2], 8, "single"),                # one adapter on every row: no gather, no scatter
    ([3, None, 1, 3, 2, None, 1], 8, "onehot"),  # a few adapters and base rows at decode shapes
    ([3, 1, 2, 1, 3, 2], 2, "grouped"),         # more adapters than ONEHOT_MAX: one-hot per group of adapters
    ([3, None, 1, 2, None, 3, 1, 2], 1, "grouped"),  # the same with base rows
    ([3, 1, None, 2], 2, "general"),            # more adapters, a row each: the general path's gathered bmms
])
def test_fast_paths_equal_the_first_design_and_single_models(slots, onehot_max, path, monkeypatch):
    import loratune.adapters.batch as batch_mod

    monkeypatch.setattr(batch_mod, "ONEHOT_MAX", onehot_max)
    lm = _three_adapters(tiny_llama())
    names = ["a", "b", "c"]
    x = ids(batch=len(slots), seq=1)
    singles = _singles(lm, x, names)
    outs = {}
    for fast in (True, False):
        batch = _stacked_batch(lm, names, slots, fast=fast, cache_bytes=2**30)
        with torch.no_grad(), mixed_batch(batch):
            outs[fast] = lm.model(input_ids=x).logits
            again = lm.model(input_ids=x).logits  # a second call reuses the batch's cached concatenations
        assert torch.equal(again, outs[fast])
        assert set(batch.paths) == ({path} if fast else {"general"})
    assert rel_err(outs[True], outs[False]) <= TOL
    for i, slot in enumerate(slots):
        want = singles[BASE if slot is None else names[slot - 1]][i]
        if slot is None:
            assert torch.equal(outs[True][i], want)  # base rows stay exact on every path
        else:
            assert rel_err(outs[True][i], want) <= TOL, i


def test_concatenated_factors_are_cached_within_the_memory_bound():
    A, B = torch.randn(4, 2, 6), torch.randn(4, 5, 2)
    layer = torch.nn.Linear(6, 5)
    keys = [3, 1, None, 3]
    roomy = MixedBatch(keys, lambda m, k: None, [layer], stacks=lambda m: (A, B), cache_bytes=2**20)
    Ac, Bc = roomy.concatenated(layer, A, B)
    assert roomy.distinct == [3, 1]
    assert torch.equal(Ac, torch.cat([A[3], A[1]])) and torch.equal(Bc, torch.cat([B[3].t(), B[1].t()]))
    assert roomy.concatenated(layer, A, B)[0] is Ac  # kept
    tight = MixedBatch(keys, lambda m, k: None, [layer], stacks=lambda m: (A, B), cache_bytes=10)
    assert tight.concatenated(layer, A, B)[0] is not tight.concatenated(layer, A, B)[0]  # over the bound: not kept
    assert torch.equal(roomy.slot_mask(torch.device("cpu"), torch.float32)[:, :, 0],
                       torch.tensor([[1.0, 0], [0, 1], [0, 0], [1, 0]]))
