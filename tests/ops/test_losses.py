"""The chunked causal-LM loss against transformers' loss and a plain reference, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loratune import LoraConfig, get_lora_model
from loratune.ops import losses
from loratune.ops.losses import causal_lm_loss, chunked_causal_lm_loss
from loratune.training.evaluate import response_loss_sum

from conftest import LLAMA_TARGETS, ids, rel_err, tiny_gpt2, tiny_llama

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


pytestmark = pytest.mark.usefixtures("gemm_route")  # every test on oneDNN and again on torch.mm


def _reference(h, W, labels, b=None):
    """transformers' ForCausalLMLoss written out: shift, (at least) fp32 logits, mean CE over labels != -100."""
    logits = F.linear(h, W, b)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, W.shape[0]), labels[:, 1:].reshape(-1), ignore_index=-100)


def _inputs(dtype, vocab=50, hidden=16, batch=3, seq=9, bias=False):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(batch, seq, hidden, generator=g, dtype=dtype).requires_grad_()
    W = torch.randn(vocab, hidden, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(vocab, generator=g, dtype=dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, 2:5] = -100
    labels[1, -1] = -100
    return h, W, b, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [1, 4, 7, 1024])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_loss_and_grads_match_reference(dtype, chunk, bias):
    h, W, b, labels = _inputs(dtype, bias=bias)
    params = [t for t in (h, W, b) if t is not None]
    loss = chunked_causal_lm_loss(h, W, labels, chunk, b)
    ref = _reference(h, W, labels, b)
    assert rel_err(loss, ref.to(loss.dtype)) <= TOL[dtype]
    for got, want in zip(torch.autograd.grad(loss * 1.7, params), torch.autograd.grad(ref * 1.7, params)):
        assert rel_err(got, want) <= TOL[dtype]


def test_only_hidden_grad_and_no_grad_forward():
    h, W, _, labels = _inputs(torch.float64)
    W = W.detach()
    loss = chunked_causal_lm_loss(h, W, labels, 5)
    (g,) = torch.autograd.grad(loss, [h])
    (want,) = torch.autograd.grad(_reference(h, W, labels), [h])
    assert rel_err(g, want) <= 1e-12
    with torch.no_grad():
        assert rel_err(chunked_causal_lm_loss(h, W, labels, 5), _reference(h, W, labels)) <= 1e-12


def test_num_items_in_batch_gives_the_sum_over_it():
    h, W, _, labels = _inputs(torch.float64)
    n = (labels[:, 1:] != -100).sum()
    total = _reference(h, W, labels) * n
    assert rel_err(chunked_causal_lm_loss(h, W, labels, 4, num_items_in_batch=100), total / 100) <= 1e-12


def test_all_ignored_gives_nan_like_torch():
    h, W, _, labels = _inputs(torch.float32)
    labels[:] = -100
    assert torch.isnan(chunked_causal_lm_loss(h, W, labels, 4))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_causal_lm_loss_equals_the_models_own_loss(make):
    model = make().eval()
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                     target_modules=LLAMA_TARGETS if make is tiny_llama else ["c_attn", "c_fc"])
    lm = get_lora_model(model, cfg).eval()
    x = ids(2, 8)
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    labels = x.clone()
    labels[1, :2] = -100
    params = [p for p in lm.parameters() if p.requires_grad]
    loss = causal_lm_loss(lm, x, mask, labels, chunk_size=3)
    ref = lm(input_ids=x, attention_mask=mask, labels=labels).loss
    assert rel_err(loss, ref) <= 1e-5
    for a, b in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref, params)):
        assert rel_err(a, b) <= 1e-5
    assert rel_err(causal_lm_loss(model, x, mask, labels), model(input_ids=x, attention_mask=mask,
                                                                     labels=labels).loss) <= 1e-5


def test_models_with_more_than_a_linear_head_use_their_own_loss(monkeypatch):
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0  # as Gemma 2: logits are not lm_head(hidden) there
    calls = []
    forward = type(model).forward

    def spy(self, *a, **k):
        calls.append(k.get("labels") is not None)
        return forward(self, *a, **k)

    monkeypatch.setattr(type(model), "forward", spy)
    x = ids(2, 8)
    causal_lm_loss(model, x, None, x)
    assert calls == [True]
    model.config.final_logit_softcapping = None
    causal_lm_loss(model, x, None, x)
    assert calls == [True]  # the backbone ran, not the *ForCausalLM forward


def test_mixed_adapter_batches_use_the_models_loss():
    lm = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    x = ids(2, 8)
    got = causal_lm_loss(lm, x, None, x, adapter_names=["default", "__base__"])
    assert rel_err(got, lm(input_ids=x, labels=x, adapter_names=["default", "__base__"]).loss) <= 1e-6


def test_missing_labels_is_an_error():
    with pytest.raises(ValueError, match="labels"):
        causal_lm_loss(tiny_llama(), ids(2, 8))


def test_plain_module_without_output_embeddings_falls_back():
    class Toy(nn.Module):
        def forward(self, input_ids=None, attention_mask=None, labels=None):
            return type("Out", (), {"loss": torch.tensor(1.5)})()

    assert causal_lm_loss(Toy(), ids(2, 4), None, ids(2, 4)).item() == 1.5


def test_cpu_chunk_buffer_is_kept_between_calls_grown_and_released(gemm_route):
    """On torch.mm's path the chunk buffer outlives the call (no fresh mapping, and its page faults, per step);
    a larger call grows it, results stay exact either way, and release_workspace() lets it go. oneDNN writes its
    products into new tensors, so there nothing is kept."""
    losses.release_workspace()
    h, W, _, labels = _inputs(torch.float64, vocab=40)
    kept = losses.kept_workspace
    for chunk in (4, 4, 2, 7):  # 4 rows, again (reused), fewer (a slice of it), more (grown)
        before = kept()
        before_ptr = None if before is None else before.data_ptr()
        loss = chunked_causal_lm_loss(h, W, labels, chunk)
        assert rel_err(loss, _reference(h, W, labels)) <= 1e-12
        for got, want in zip(torch.autograd.grad(loss, [h, W]), torch.autograd.grad(_reference(h, W, labels),
                                                                                        [h, W])):
            assert rel_err(got, want) <= 1e-12
        if gemm_route == "onednn":
            continue
        buf = kept()
        assert buf is not None and buf.numel() >= chunk * 40 and buf.dtype == torch.float64
        if before is not None and before.numel() >= chunk * 40:
            assert buf.data_ptr() == before_ptr  # the same memory again
    if gemm_route == "torch":
        assert kept().numel() == 7 * 40
    losses.release_workspace()
    assert kept() is None


def test_no_grad_loss_makes_no_gradients(monkeypatch):
    """Under no_grad (evaluation) the loss is the forward alone: no hidden-state gradient product per chunk."""
    h, W, _, labels = _inputs(torch.float32)
    calls = []
    mm = torch.mm

    def spy(a, b, *args, **kw):
        calls.append(tuple(a.shape) + tuple(b.shape))
        return mm(a, b, *args, **kw)

    monkeypatch.setattr(torch, "mm", spy)
    with torch.no_grad():
        loss = chunked_causal_lm_loss(h, W, labels, 4)
    monkeypatch.setattr(torch, "mm", mm)
    assert rel_err(loss, _reference(h, W, labels)) <= 1e-5
    assert all(c[-1] == W.shape[0] for c in calls)  # only logits (… × vocab), never G·W (… × hidden)


def _chat_batch(vocab=128):
    x = ids(3, 10, vocab=vocab)
    labels = torch.full_like(x, -100)
    labels[0, 5:] = x[0, 5:]  # responses: a few labelled positions per row
    labels[1, 2:7] = x[1, 2:7]
    labels[2, 8:] = x[2, 8:]
    mask = torch.ones_like(x)
    mask[2, :3] = 0
    return {"input_ids": x, "attention_mask": mask, "labels": labels}


def _response_reference(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_response_loss_sum_matches_the_models_logits(softcap, monkeypatch):
    """The trainer's loss (chunked, response positions only) is the sum of CE over labelled positions of the
    model's own logits, with the same A/B gradients. A model whose logits are more than lm_head(hidden) (Gemma 2's
    soft-capping) takes its own logits: the *ForCausalLM forward runs, which it does not otherwise."""
    model = tiny_llama()
    model.config.final_logit_softcapping = softcap
    lm = get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                          init_lora_weights=False)).eval()
    batch = _chat_batch()
    params = [p for p in lm.parameters() if p.requires_grad]
    calls = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    got, n = response_loss_sum(lm, batch)
    assert len(calls) == (1 if softcap else 0)
    want = _response_reference(lm, batch)
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    assert rel_err(got, want) <= 1e-5
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        assert rel_err(a, b) <= 1e-5
