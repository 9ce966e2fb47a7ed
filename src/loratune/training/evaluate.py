"""Held-out evaluation: loss and perplexity on response tokens, and exact match of greedy generations."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import collate
from ..data.schema import END_TOKENS
from ..devices import model_device, to_device
from ..ops import IGNORE_INDEX, causal_lm_loss, split_lm


def response_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over labelled positions, number of such positions).

    Logits are computed only where a label exists (for chat data that is the response, a small part of each row,
    so the tokens × vocab output head, a fifth of a small model's FLOPs, mostly never runs), a chunk at a time
    (``losses.causal_lm_loss``: never all of them at once). Models whose logits are more than
    ``lm_head(hidden)`` (soft-capping, scaled logits, a LoRA'd head) use their own logits instead.
    """
    hf = getattr(model, "model", model) if hasattr(model, "peft_config") else model
    labels = batch["labels"]
    mask = labels[:, 1:] != IGNORE_INDEX
    n = int(mask.sum())
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    if split_lm(hf) is None:
        logits = model(input_ids=batch["input_ids"], **kwargs).logits[:, :-1]
        return F.cross_entropy(logits[mask].float(), labels[:, 1:][mask], reduction="sum"), n
    return causal_lm_loss(hf, batch["input_ids"], labels=labels, num_items_in_batch=1, **kwargs), n  # the sum


@torch.no_grad()
def eval_loss(model: nn.Module, examples: Sequence, pad_id: int, batch_size: int = 16) -> dict[str, float]:
    """Mean loss over every labelled token of ``examples`` and its perplexity."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        loss, n = response_loss_sum(model, to_device(collate(examples[i:i + batch_size], pad_id), device))
        total, count = total + loss.item(), count + n
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


@torch.no_grad()
def generate_batch(model: nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int = 32) -> list[str]:
    """Greedy completions of tokenized prompts (left-padded into one batch), decoded without specials."""
    pad = tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    device = model_device(model)
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad, eos_token_id=_stop_ids(tokenizer))
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def _stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for tok in END_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def exact_match(model: nn.Module, tokenizer, examples: Sequence, batch_size: int = 32,
                max_new_tokens: int = 32) -> dict:
    """Share of rows with a reference whose greedy answer equals it (surrounding whitespace stripped)."""
    rows = [e for e in examples if getattr(e, "reference", None) is not None]
    if not rows:
        return {"exact_match": None, "n": 0, "samples": []}
    was_training = model.training
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt_ids))  # similar lengths, less padding
    answers: dict[int, str] = {}
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        for j, text in zip(chunk, generate_batch(model, tokenizer, [rows[j].prompt_ids for j in chunk],
                                                 max_new_tokens)):
            answers[j] = text
    model.train(was_training)
    hits = [answers[i].strip() == rows[i].reference.strip() for i in range(len(rows))]
    samples = [{"reference": rows[i].reference, "prediction": answers[i].strip(), "match": hits[i]}
               for i in range(min(5, len(rows)))]
    return {"exact_match": sum(hits) / len(rows), "n": len(rows), "samples": samples}
