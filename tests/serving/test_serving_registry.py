"""The adapter registry: stacked slots (null slot 0, zero padding, scaling folded in), LRU limits, refusals."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from serving_fixtures import ADAPTERS, load_base, make_adapters

from loratune import LoraModel
from loratune.adapters.batch import mixed_batch
from loratune.serving import AdapterRegistry, NoFreeSlot, ServingError

from conftest import rel_err


@pytest.fixture(scope="module")
def root(tiny_dir, tmp_path_factory):
    return make_adapters(tiny_dir, tmp_path_factory.mktemp("adapters"))


def test_rows_equal_single_adapter_models_and_base_rows_are_exact(tiny_dir, root):
    model, tok = load_base(tiny_dir)
    reg = AdapterRegistry(model, root, max_loras=3)
    assert reg.names() == sorted(ADAPTERS)
    slots = {n: reg.acquire(n) for n in ADAPTERS}
    rows = ["beta", None, "alpha", "gamma", "alpha", None, "beta", "gamma"]
    x = tok(["The quick brown fox jumps over the lazy dog again"] * len(rows), return_tensors="pt").input_ids
    x = x + torch.arange(len(rows))[:, None]  # different rows
    singles = {n: LoraModel.from_pretrained(load_base(tiny_dir)[0], root / n) for n in ADAPTERS}
    with torch.no_grad():
        base = model(input_ids=x).logits  # the wrapped model, no batch: the base
        for seq in (x, x[:, -1:]):  # prefill shapes (gathered bmm) and decode shapes (segments)
            with mixed_batch(reg.batch([slots.get(n) for n in rows])):
                mixed = model(input_ids=seq).logits
            want = {n: lm(input_ids=seq).logits for n, lm in singles.items()}
            for i, name in enumerate(rows):
                if name is None:
                    assert torch.equal(mixed[i], model(input_ids=seq).logits[i])
                else:
                    assert rel_err(mixed[i], want[name][i]) <= 1e-5, (name, rel_err(mixed[i], want[name][i]))
                    assert rel_err(mixed[i], base[i, -seq.shape[1]:]) > 1e-3 or seq.shape[1] == 1
    plain, _ = load_base(tiny_dir)
    with torch.no_grad():
        assert rel_err(base, plain(input_ids=x).logits) <= 1e-6  # wrapping alone changes nothing


def test_mixed_rows_are_exact_in_float64(tiny_dir, root):
    """In float64 the stacked path (zero padding to the largest rank, scaling folded into B, gathered bmm at prefill
    shapes, segments at decode shapes) equals each single-adapter model to rounding: the fp32 differences are fp32
    rounding, amplified by how strongly an adapter bends the model, not an error of the method."""
    model, tok = load_base(tiny_dir)
    reg = AdapterRegistry(model.double(), root, max_loras=3)
    assert reg.dtype == torch.float64
    slots = {n: reg.acquire(n) for n in ADAPTERS}
    rows = ["gamma", "alpha", None, "beta", "gamma", "beta"]
    torch.manual_seed(5)
    x = torch.randint(0, len(tok), (len(rows), 13))
    singles = {n: LoraModel.from_pretrained(load_base(tiny_dir)[0], root / n).double() for n in ADAPTERS}
    with torch.no_grad():
        for seq in (x, x[:, -1:]):
            with mixed_batch(reg.batch([slots.get(n) for n in rows])):
                mixed = model(input_ids=seq).logits
            for i, name in enumerate(rows):
                if name is not None:
                    assert rel_err(mixed[i], singles[name](input_ids=seq[i:i + 1]).logits[0]) <= 1e-12, name


def test_slot_lru_pins_and_host_lru(tiny_dir, root):
    model, _ = load_base(tiny_dir)
    reg = AdapterRegistry(model, root, max_loras=2, max_cpu_loras=2)
    a, b = reg.acquire("alpha"), reg.acquire("beta")
    assert {a, b} == {1, 2}
    with pytest.raises(NoFreeSlot):
        reg.acquire("gamma")  # both slots pinned by running sequences
    reg.release("alpha")
    assert reg.acquire("gamma") == a  # alpha (unpinned, least recent) evicted
    assert set(reg.slots) == {"beta", "gamma"} and reg.stats.evictions == 1
    assert len(reg.host) <= 2 and "alpha" not in reg.host  # host LRU too
    # the evicted slot was zeroed and refilled: gamma's factors, not alpha's
    path = next(p for p in reg.layers if p.endswith("layers.0.self_attn.o_proj"))
    A, _ = reg.stacks[path]
    assert reg.ranks[a][path] == 1 and A[a, 1:].abs().sum() == 0 and A[a, :1].abs().sum() > 0
    assert A[0].abs().sum() == 0  # the null slot stays zero
    reg.release("beta")
    reg.release("gamma")
    assert reg.stats.loads == 3 and all(ms > 0 for ms in reg.stats.swap_ms)


def test_limits_and_refusals(tiny_dir, root, tmp_path):
    model, _ = load_base(tiny_dir)
    with pytest.raises(Exception, match="max-cpu-loras"):
        AdapterRegistry(copy.deepcopy(model), root, max_loras=4, max_cpu_loras=2)
    reg = AdapterRegistry(model, root, max_loras=2, max_lora_rank=4)
    with pytest.raises(ServingError, match="max-lora-rank 8"):
        reg.host_adapter("beta")
    with pytest.raises(ServingError, match="does not exist") as e:
        reg.acquire("nope")
    assert e.value.status == 404
    bad = tmp_path / "root"
    (bad / "pickled").mkdir(parents=True)
    (bad / "pickled" / "adapter_config.json").write_text((root / "alpha" / "adapter_config.json").read_text())
    (bad / "pickled" / "adapter_model.bin").write_bytes(b"not read")
    reg2 = AdapterRegistry(load_base(tiny_dir)[0], bad)
    with pytest.raises(ServingError, match="only safetensors"):
        reg2.register("p2", reg2.resolve("pickled"))


def test_path_traversal_is_refused_before_reading(tiny_dir, root, tmp_path):
    model, _ = load_base(tiny_dir)
    outside = make_adapters(tiny_dir, tmp_path / "outside", names=("alpha",))
    os.symlink(outside / "alpha", root / "link-out")
    (root / "halflink").mkdir()
    os.symlink(outside / "alpha" / "adapter_model.safetensors", root / "halflink" / "adapter_model.safetensors")
    (root / "halflink" / "adapter_config.json").write_text((root / "alpha" / "adapter_config.json").read_text())
    try:
        reg = AdapterRegistry(model, root)
        for path, status in [("../outside/alpha", 400), ("alpha/../../outside/alpha", 400),
                             (str(outside / "alpha"), 403), ("link-out", 403), ("halflink", 403), ("missing", 404),
                             ("", 400)]:
            with pytest.raises(ServingError) as e:
                reg.resolve(path)
            assert e.value.status == status, path
        assert reg.resolve("alpha") == (root / "alpha").resolve()
        for name in ("../x", "a/b", "..", "", "x" * 200):
            with pytest.raises(ServingError):
                reg.register(name, root / "alpha")
        with pytest.raises(ServingError, match="already loaded"):
            reg.register("alpha", root / "alpha")
    finally:
        os.unlink(root / "link-out")
        for p in (root / "halflink").iterdir():
            os.unlink(p)
        (root / "halflink").rmdir()


@pytest.mark.parametrize("config, says", [
    ({"use_dora": True}, "is a DoRA adapter"),
    ({"use_adalora": True, "init_r": 4, "target_r": 2, "total_step": 10}, "is an AdaLoRA adapter"),
    ({"init_lora_weights": "pissa"}, "is an adapter initialized with init_lora_weights=pissa"),
])
def test_variant_adapters_are_refused_by_name(tiny_dir, tmp_path, config, says):
    """DoRA, AdaLoRA and unconverted PiSSA-style adapters are not ΔW = s·B·A on the served base: one line naming
    the variant and the way out, and the adapter is not kept."""
    from loratune import LoraConfig, get_lora_model

    lm = get_lora_model(load_base(tiny_dir)[0], LoraConfig(r=2, target_modules=["q_proj", "v_proj"], **config))
    lm.save_pretrained(tmp_path / "root" / "v")
    reg = AdapterRegistry(load_base(tiny_dir)[0], tmp_path / "root")  # (registers the root's subfolders)
    with pytest.raises(ServingError, match=says) as e:
        reg.host_adapter("v")
    assert "\n" not in str(e.value) and "loratune merge" in str(e.value) and e.value.status == 400
