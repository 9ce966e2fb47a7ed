"""train.compile: torch.compile (inductor) on each decoder layer traces the fused LoRA path whole (no graph break,
its custom ops in the graphs, with and without dropout), and gives the eager losses and gradients within 1e-4 over a
few optimizer steps.

Dropout: compiled, each LoRA module draws its own mask (ops/traced.py), where eager siblings share one, so at
dropout > 0 the compiled losses are compared with the same graphs run without inductor (aot_eager) from the same
seeds (``fallback_random``: inductor then draws from torch's generator as eager does), and the masks' values and
rate are checked op by op in tests/ops/test_traced.py. Eager parity proper is checked at dropout 0.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch._functorch.aot_autograd import make_boxed_func

from loratune import LoraConfig, get_lora_model
from loratune.ops import causal_lm_loss
from loratune.training.compiled import compile_layers
from loratune.training.distributed import decoder_layers

from conftest import ids, rel_err, tiny_llama


def _model(p: float):
    torch.manual_seed(0)
    lm = get_lora_model(tiny_llama(layers=2), LoraConfig(r=4, target_modules="all-linear", lora_dropout=p,
                                                         init_lora_weights="gaussian"))
    return lm.train()


def _run(lm, steps: int = 3, vary: bool = True) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses over ``steps`` AdamW steps, and the adapters' gradients of the last step (at the first, B = 0 and so
    A's gradients are zero)."""
    torch.manual_seed(1)  # the dropout draws start from here in every run
    trainable = {n: p for n, p in lm.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    losses, last = [], {}
    for s in range(steps):
        x = ids(2, 10 + s * vary, seed=s)  # a new length each step, as batches padded to their longest row have
        loss = causal_lm_loss(lm.model, x, labels=x)
        loss.backward()
        if s == steps - 1:
            last = {n: p.grad.clone() for n, p in trainable.items()}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, last


def _losses_and_grads(p: float, backend: str | None, vary: bool = True) -> tuple[list[float], dict[str, torch.Tensor]]:
    lm = _model(p)
    if backend is not None:
        assert compile_layers(lm, backend=backend) == 2
    return _run(lm, vary=vary)


def test_decoder_layers_are_found():
    assert [type(m).__name__ for m in decoder_layers(tiny_llama(layers=3))] == ["LlamaDecoderLayer"] * 3


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_a_lora_decoder_layer_traces_whole_with_the_custom_ops(p):
    """No graph break anywhere in a compiled Llama decoder layer with LoRA on every linear; forward graphs hold the
    fused linear (7 per layer), the seeded dropout (one per module with dropout) and the fused blocks, backward
    graphs the fused linear's backward. (AOT autograd without inductor: what Dynamo traces is the same.)"""
    graphs = []  # (forward or backward, the loratune ops of one graph)

    def recorder(which):
        def compiler(gm, example_inputs):
            graphs.append((which, collections.Counter(str(n.target) for n in gm.graph.nodes
                                                      if "loratune" in str(n.target))))
            return make_boxed_func(gm.forward)
        return compiler

    torch._dynamo.reset()
    counters.clear()
    lm = _model(p)
    assert decoder_layers(lm)[0].self_attn.q_proj.plan(torch.randn(1, 2, 64)).path == "fused"
    compile_layers(lm, backend=aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward")))
    x = ids(2, 9)
    causal_lm_loss(lm.model, x, labels=x).backward()
    assert dict(counters["graph_break"]) == {}
    # two graphs: layer 0's input (the frozen embedding's output) needs no gradient, layer 1's does; no others
    assert counters["stats"]["unique_graphs"] == 2
    assert sorted(which for which, _ in graphs) == ["backward", "backward", "forward", "forward"]
    forward = [ops for which, ops in graphs if which == "forward"]
    backward = [ops for which, ops in graphs if which == "backward"]
    for ops in forward:
        assert ops["loratune.lora_linear.default"] == 7
        assert ops["loratune.rms_norm.default"] == 2 and ops["loratune.swiglu.default"] == 1
        assert ops["loratune.dropout_from_seed.default"] == (7 if p else 0)  # one mask per module
    for ops in backward:
        assert ops["loratune.lora_linear_backward.default"] == 7
        assert ops["loratune.swiglu_backward.default"] == 1
    # Layer 0's input (the frozen embedding's output) needs no gradient, so neither does its input norm nor the
    # normed input of q/k/v: layer 0's backward has 1 norm backward and masks for 4 modules' input gradients, layer
    # 1's 2 and 7.
    assert sorted(ops["loratune.rms_norm_backward.default"] for ops in backward) == [1, 2]
    assert sorted(ops["loratune.dropout_from_seed.default"] for ops in backward) == ([4, 7] if p else [0, 0])


def _assert_close(a: tuple[list[float], dict], b: tuple[list[float], dict]) -> None:
    (losses_a, grads_a), (losses_b, grads_b) = a, b
    assert losses_a == pytest.approx(losses_b, rel=1e-4)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * 7 * 2  # A and B of 7 modules in 2 layers
    assert max(rel_err(grads_a[n], grads_b[n]) for n in grads_a) < 1e-4


@pytest.mark.slow
def test_compiled_layers_match_eager_within_1e_4():
    torch._dynamo.reset()
    counters.clear()
    eager = _losses_and_grads(0.0, None)
    compiled = _losses_and_grads(0.0, "inductor")
    assert counters["stats"]["unique_graphs"] > 0  # the compiler did run
    assert dict(counters["graph_break"]) == {}
    _assert_close(compiled, eager)
    assert eager[0][-1] < eager[0][0]


@pytest.mark.slow
def test_compiled_dropout_matches_the_uncompiled_graph_from_the_same_seeds(monkeypatch):
    """At dropout 0.1: inductor against the same traced graphs run op by op (aot_eager), both drawing their seeds
    from torch's generator in the same order; and the draws do drop (the losses differ from dropout 0's). One batch
    length throughout: the varying lengths' recompiles are the other test's business, and cost a minute here."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)
    torch._dynamo.reset()
    counters.clear()
    reference = _losses_and_grads(0.1, "aot_eager", vary=False)
    torch._dynamo.reset()
    compiled = _losses_and_grads(0.1, "inductor", vary=False)
    assert dict(counters["graph_break"]) == {}
    _assert_close(compiled, reference)
    without = _losses_and_grads(0.0, "aot_eager", vary=False)
    assert abs(without[0][-1] - reference[0][-1]) > 1e-4  # (not the first: B = 0 there, dropout changes nothing)


@pytest.mark.slow
def test_train_with_compile_matches_eager_end_to_end(tiny_dir, data_files, tmp_path):
    """``loratune train`` with ``train.compile=true`` (the loop calls compile_layers): the logged losses equal an
    eager run's within 1e-4 at dropout 0, with no graph break (dropout through the loop: the tests above)."""
    from loratune.training.config import load_run_config
    from loratune.training.loop import train

    train_f, eval_f = data_files

    def run(out, *extra):
        cfg = load_run_config(None, [f"model={tiny_dir}", f"data.train={train_f}", f"output_dir={out}",
                                     "train.max_steps=4", "train.batch_size=4", "lora.r=4", "train.lr=1e-2",
                                     "data.max_seq_len=64", *extra])
        return [h["loss"] for h in train(cfg, progress=False).history]

    torch._dynamo.reset()
    counters.clear()
    eager = run(tmp_path / "eager", "lora.dropout=0")
    compiled = run(tmp_path / "compiled", "lora.dropout=0", "train.compile=true")
    assert counters["stats"]["unique_graphs"] > 0 and dict(counters["graph_break"]) == {}
    assert compiled == pytest.approx(eager, rel=1e-4)
