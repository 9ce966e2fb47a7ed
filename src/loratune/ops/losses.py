"""A causal-LM loss that never holds the full (tokens × vocab) logits.

At 8×512 tokens and SmolLM2's 49,152-word vocabulary, fp32 logits are 805 MB, and transformers' loss keeps three
tensors that size (logits, log-softmax, their gradient). Here the logits are made ``chunk_size`` tokens at a time;
each chunk's gradient (softmax - onehot) is turned into the hidden-state gradient right away (``grad_h = G·W``,
tokens × hidden) and the chunk is dropped. The backward then only scales what the forward stored — the same two
big matmuls as the plain loss (logits, and their gradient times W), without the vocab-sized activations.

On CPU the chunk buffer is kept between calls (``_workspace``): a fresh chunk × vocab buffer every step is a fresh
mapping from the kernel, whose page faults (24,000 for 508 × 49,152 fp32, a 4 KiB page each) cost about 4 % of a
SmolLM2 training step on 2 cores. The buffer is needed during every step anyway, so this changes no step's peak;
between steps it holds chunk × vocab floats (100 MB at 508 × 49,152) until ``release_workspace()``, which
``train()`` calls when training ends.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from . import gemm

IGNORE_INDEX = -100
_local = threading.local()  # this thread's chunk buffer (see the module doc): one flat tensor or None

# Config attributes with which a model's logits are not simply ``lm_head(hidden)``: those models use their own loss.
_LOGIT_CHANGERS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier", "scale_width",
                   "output_multiplier_scale", "mup_width_multiplier")


def _workspace(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """A rows × vocab buffer for the chunks' logits: on CPU this thread's kept buffer, grown when too small; None
    elsewhere (a GPU's caching allocator already reuses memory)."""
    if device.type != "cpu":
        return None
    flat = getattr(_local, "buf", None)
    n = rows * vocab
    if flat is None or flat.dtype != dtype or flat.numel() < n:
        _local.buf = flat = None  # (the old one goes first: the two need not be held together)
        _local.buf = flat = torch.empty(n, dtype=dtype)
    return flat[:n].view(rows, vocab)


def kept_workspace() -> torch.Tensor | None:
    """This thread's kept chunk buffer (flat), or None where none is kept."""
    return getattr(_local, "buf", None)


def release_workspace() -> None:
    """Free this thread's kept chunk buffer (the next chunked loss allocates one again)."""
    _local.buf = None


def _chunk_logits(hc, weight, bias, acc, buf):
    """hc·Wᵀ + b in ``acc`` precision, written into ``buf`` (sliced to the chunk's rows) where possible."""
    if weight.dtype != acc:
        return F.linear(hc, weight, bias).to(acc)
    if gemm.routed(hc, weight):  # oneDNN: about 1.3× MKL's speed on this shape, into a new tensor
        return gemm.linear(hc, weight, bias)
    out = None if buf is None else buf[:len(hc)]
    if bias is None:
        return torch.mm(hc, weight.t(), out=out) if out is not None else torch.mm(hc, weight.t())
    return torch.addmm(bias, hc, weight.t(), out=out) if out is not None else torch.addmm(bias, hc, weight.t())


class _ChunkedCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(h·Wᵀ + b, t) / denom for rows with a target; gradients computed chunk by chunk."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, denom, chunk_size):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        grads = need_h or need_w or need_b
        acc = torch.promote_types(h.dtype, torch.float32)  # half precision is upcast, float64 stays float64
        total = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None
        buf = None  # one chunk × vocab buffer for all chunks (and on CPU for all calls): fresh ones cost page faults
        logits = probs = g = None
        for i in range(0, h.shape[0], chunk_size):
            hc, tc = h[i:i + chunk_size], targets[i:i + chunk_size]
            logits = probs = g = None  # free the last chunk's logits (unless they are buf) before making these
            routed = gemm.routed(hc, weight)  # (oneDNN writes its product into a new tensor: no buffer there)
            if buf is None and weight.dtype == acc and not routed:
                buf = _workspace(min(chunk_size, h.shape[0]), weight.shape[0], acc, h.device)  # None off CPU
            logits = _chunk_logits(hc, weight, bias, acc, buf)  # at least fp32, as transformers does
            buf = logits if buf is None and not routed else buf
            rows = torch.arange(len(tc), device=h.device)
            target_logit = logits[rows, tc]
            # log-sum-exp and softmax in place: max, x - max, exp, sum (torch.logsumexp would allocate a copy)
            mx = logits.amax(dim=1, keepdim=True)
            sumexp = logits.sub_(mx).exp_().sum(dim=1)
            total += (mx.squeeze(1) + sumexp.log() - target_logit).sum()
            if not grads:
                continue
            probs = logits.div_(sumexp[:, None])
            probs[rows, tc] -= 1  # ∂CE/∂logits = softmax - onehot
            g = probs.to(weight.dtype)
            if need_h:
                torch.mm(g, weight, out=grad_h[i:i + chunk_size])
            if need_w:
                grad_w.addmm_(g.t().to(acc), hc.to(acc))
            if need_b:
                grad_b += probs.sum(0)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.denom, ctx.dtypes = denom, (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        scale = grad_out / ctx.denom
        grad_h, grad_w, grad_b = (None if g is None else (g * scale).to(dt) for g, dt in zip(ctx.grads, ctx.dtypes))
        return grad_h, grad_w, grad_b, None, None, None


def chunked_causal_lm_loss(hidden_states: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                           chunk_size: int = 1024, lm_head_bias: torch.Tensor | None = None,
                           num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """transformers' causal-LM loss for ``logits = hidden_states·Wᵀ (+ b)``, without materializing the logits.

    Position t predicts ``labels[:, t+1]``; labels equal to -100 are ignored; the result is the mean over the
    predicted tokens (or the sum over ``num_items_in_batch``, as transformers does when given it).
    hidden_states (..., seq, hidden), lm_head_weight (vocab, hidden), labels (..., seq).
    """
    hidden = hidden_states.shape[-1]
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden_states.device)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    # Only rows with a target cost a vocab-sized matmul (the last position of each row never has one).
    h = hidden_states.reshape(-1, hidden).index_select(0, rows)
    denom = num_items_in_batch if num_items_in_batch is not None else len(rows)
    denom = denom.to(torch.float32) if torch.is_tensor(denom) else float(denom)  # 0 rows: 0/0 = nan, as torch
    if not torch.is_grad_enabled():  # no backward can come: detached, the forward makes no gradients (evaluation)
        h, lm_head_weight = h.detach(), lm_head_weight.detach()
        lm_head_bias = None if lm_head_bias is None else lm_head_bias.detach()
    return _ChunkedCrossEntropy.apply(h, lm_head_weight, lm_head_bias, targets[rows], denom, max(1, chunk_size))


def split_lm(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(backbone, lm_head) when the model's logits are exactly ``lm_head(backbone(...)[0])``, else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    prefix = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, prefix, None) if prefix else None
    if type(head) is not nn.Linear or not isinstance(backbone, nn.Module) or backbone is model:
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_CHANGERS):
        return None
    return backbone, head


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
                   chunk_size: int = 1024, **kwargs) -> torch.Tensor:
    """The causal-LM loss of ``model`` (a LoraModel or any *ForCausalLM) on a batch, computed memory-light.

    Runs the backbone for hidden states and ``chunked_causal_lm_loss`` on the output embedding. Models whose
    logits are more than ``lm_head(hidden)`` (soft-capping, scaled logits, a LoRA'd or wrapped head), mixed-adapter
    batches and models without an output embedding use the model's own ``labels=`` loss instead. Extra keyword
    arguments (``inputs_embeds``, ``position_ids``, ``num_items_in_batch``, ...) are passed on.
    """
    if labels is None:
        raise ValueError("causal_lm_loss needs labels")
    hf = getattr(model, "model", model) if hasattr(model, "peft_config") else model  # a LoraModel's base model
    split = split_lm(hf) if "adapter_names" not in kwargs else None
    if split is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs).loss
    backbone, head = split
    n_items = kwargs.pop("num_items_in_batch", None)
    kwargs.setdefault("use_cache", False)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    return chunked_causal_lm_loss(hidden, head.weight, labels, chunk_size, head.bias, n_items)
