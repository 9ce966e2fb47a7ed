"""Held-out evaluation: loss and perplexity on response tokens, and exact match of greedy generations."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

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
def generate_batch(model: nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int = 32,
                   streamer=None, **sampling) -> list[str]:
    """Completions of tokenized prompts (left-padded into one batch, KV cache on, each row stopping at its own end
    token), decoded without specials. Greedy unless ``sampling`` holds ``do_sample=True`` and transformers'
    sampling options (temperature, top_p, top_k, repetition_penalty); ``streamer`` gets tokens as they come."""
    pad = tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    device = model_device(model)
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    sampling = {"do_sample": False, **sampling}
    if not sampling["do_sample"]:  # no sampling knobs on a greedy call (transformers warns about them)
        sampling = {k: v for k, v in sampling.items() if k in ("do_sample", "repetition_penalty")}
    out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                         pad_token_id=pad, eos_token_id=stop_ids(tokenizer), use_cache=True, streamer=streamer,
                         **sampling)
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def stop_ids(tokenizer) -> list[int]:
    """Token ids that end a generation: the tokenizer's EOS and the chat end tokens it knows."""
    ids = {tokenizer.eos_token_id}
    for tok in END_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


@contextlib.contextmanager
def merged_for_generation(model: nn.Module) -> Iterator[bool]:
    """Inside the block, a LoraModel's active adapters are folded into the base weights (generation then costs what
    the merged model's does: no LoRA products per token), and unfolded on exit (W0 + ΔW − ΔW: equal to W0 up to
    float rounding). Yields whether it merged: a plain model, adapters off or already merged, or a base that
    refuses merging (4-bit) is left as it is."""
    layers = list(model.lora_layers()) if hasattr(model, "lora_layers") else []
    usable = bool(layers) and all(not layer.merged and not layer.disabled and not hasattr(layer.base_layer,
                                                                                         "add_to_weight")
                                  for _, layer in layers)
    if usable:
        model.merge_adapter()
    try:
        yield usable
    finally:
        if usable:
            model.unmerge_adapter()


# rows × new tokens from which merging the adapters for an exact-match pass pays for its merge and unmerge
# (benchmarks/eval_speed.py, SmolLM2-135M r16 all-linear, CPU: at 60 × 16 merged was 1.15× transformers' generate on
# a merged model and unmerged 1.08×; at 200 × 16 merged 1.04× and unmerged 1.17×)
MERGE_AT = 1200


def exact_match(model: nn.Module, tokenizer, examples: Sequence, batch_size: int = 32, max_new_tokens: int = 32,
                progress: bool = False, desc: str = "exact match", merge: bool | None = None) -> dict:
    """Share of rows with a reference whose greedy answer equals it (surrounding whitespace stripped).

    Rows are generated ``batch_size`` at a time, sorted by prompt length (less padding), with the adapters merged
    for the duration (``merged_for_generation``) when the pass is long enough for that to pay (``merge=None``:
    rows × ``max_new_tokens`` ≥ ``MERGE_AT``), or as ``merge`` says. ``progress`` shows a tqdm
    bar with its ETA on stderr. Returns ``exact_match`` (None without references), ``n``, ``samples`` (the first
    5 rows) and ``examples`` (every row, misses first, each with its prompt, reference, prediction and match).
    """
    from tqdm.auto import tqdm

    rows = [e for e in examples if getattr(e, "reference", None) is not None]
    if not rows:
        return {"exact_match": None, "n": 0, "samples": [], "examples": []}
    if merge is None:
        merge = len(rows) * max_new_tokens >= MERGE_AT
    was_training = model.training
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt_ids))  # similar lengths, less padding
    answers: dict[int, str] = {}
    # mininterval=0, miniters=1: a refresh per batch (few, each a whole generate call): a quick eval shows its count
    bar = tqdm(total=len(rows), desc=desc, unit="row", disable=not progress, leave=False, dynamic_ncols=True,
               mininterval=0, miniters=1)
    try:
        with merged_for_generation(model) if merge else contextlib.nullcontext():
            for i in range(0, len(order), batch_size):
                chunk = order[i:i + batch_size]
                texts = generate_batch(model, tokenizer, [rows[j].prompt_ids for j in chunk], max_new_tokens)
                answers.update(zip(chunk, texts))
                bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    hits = [answers[i].strip() == rows[i].reference.strip() for i in range(len(rows))]
    every = [{"prompt": tokenizer.decode(rows[i].prompt_ids, skip_special_tokens=True), "reference": rows[i].reference,
              "prediction": answers[i].strip(), "match": hits[i]} for i in range(len(rows))]
    return {"exact_match": sum(hits) / len(rows), "n": len(rows), "samples": every[:5],
            "examples": sorted(every, key=lambda e: e["match"])}  # (stable: misses first, in file order)
