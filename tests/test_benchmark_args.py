"""The train-step benchmark refuses bad arguments at once, with one line, before loading any model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "train_step", Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py")
train_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_step)


@pytest.mark.parametrize("argv, says", [
    (["--configs", "nope"], "invalid choice: 'nope'"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--json", "/nonexistent-dir/out.json"], "its directory does not exist"),
    (["--malloc", "fast"], "invalid choice: 'fast'"),
])
def test_bad_arguments_are_one_line_errors(argv, says, capsys, monkeypatch):
    monkeypatch.setattr(train_step, "bench_config", lambda *a: pytest.fail("ran a benchmark"))
    with pytest.raises(SystemExit) as e:
        train_step.main(argv)
    assert e.value.code == 2
    assert says in capsys.readouterr().err


@pytest.mark.bundled
def test_contestants_share_one_copy_of_the_weights():
    """The benchmark's models run on the same weight storage (placement alone moved timings by up to 15 %)."""
    floor, other = train_step.base_models(2)
    pairs = list(zip(floor.named_parameters(), other.named_parameters(), strict=True))
    assert pairs and all(p.data_ptr() == q.data_ptr() for (_, p), (_, q) in pairs)
    assert not any(p.requires_grad for p in floor.parameters())


def test_paired_ratio_and_its_quartiles():
    a, b = [2.0, 3.0, 4.0, 10.0, 6.0], [1.0, 1.0, 2.0, 5.0, 1.0]  # per-repeat ratios 2, 3, 2, 2, 6
    assert train_step.paired_ratio(a, b) == 2.0
    assert train_step.ratio_spread(a, b) == [2.0, 3.0]
    assert train_step.ratio_spread([3.0], [2.0]) == [1.5, 1.5]  # one repeat: no spread to show


def test_the_routed_floor_computes_what_the_floor_does():
    """floor_onednn (the frozen model on loratune's kernels) must be the same function with the same input
    gradient, or loratune/floor_onednn would compare different work."""
    import torch

    from conftest import rel_err, tiny_llama

    plain, routed = tiny_llama(), train_step.route_frozen_linears(tiny_llama())
    kinds = {name: type(m) for name, m in routed.named_modules()}
    assert kinds["model.layers.0.self_attn.q_proj"] is train_step._RoutedFrozenLinear
    assert kinds["lm_head"] is torch.nn.Linear  # loratune's loss makes the logits itself
    only = train_step.route_frozen_linears(tiny_llama(), {"model.layers.1.mlp.up_proj"})
    assert [n for n, m in only.named_modules() if type(m) is train_step._RoutedFrozenLinear] == [
        "model.layers.1.mlp.up_proj"]
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    grads = []
    for model in (plain, routed):
        model.requires_grad_(False)
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=embeds, labels=ids).loss
        loss.backward()
        grads.append((loss, embeds.grad))
    assert rel_err(grads[1][0], grads[0][0]) <= 1e-5 and rel_err(grads[1][1], grads[0][1]) <= 1e-5


def test_on_route_runs_on_the_named_library_and_restores_the_default():
    """loratune_onednn / loratune_mkl are loratune's step on one library each; the other contestants keep the
    CPU's default, so the switch must not outlive the call."""
    from loratune import gemm

    before = gemm.routing_on()
    seen = {r: train_step.on_route(gemm.routing_on, r)() for r in ("onednn", "mkl")}
    assert seen == {"onednn": gemm.onednn_available(), "mkl": False}
    assert gemm.routing_on() is before
    assert {train_step.default_route(), train_step.other_route()} == {"onednn", "mkl"}
