"""Examples to batches: packing several into one row, right-padded collation, and a readable rendering."""

from __future__ import annotations

import torch

from .schema import IGNORE, Example


def pack(examples: list[Example], max_seq_len: int) -> list[Example]:
    """Greedily concatenate examples into rows of at most ``max_seq_len`` tokens, in order.

    ``position_ids`` restart at each example and each example's first label is masked, so no token is
    trained to predict across a boundary (attention still crosses it unless the attention kernel uses
    the position resets, as flash-attention varlen does).
    """
    rows: list[Example] = []
    cur = Example([], [], position_ids=[])
    for e in examples:
        if cur.input_ids and len(cur.input_ids) + len(e.input_ids) > max_seq_len:
            rows.append(cur)
            cur = Example([], [], position_ids=[])
        cur.input_ids += e.input_ids
        cur.labels += [IGNORE] + e.labels[1:]
        cur.position_ids += list(range(len(e.input_ids)))
    if cur.input_ids:
        rows.append(cur)
    return rows


def collate(examples: list[Example], pad_id: int | None) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids (pad_id), attention_mask (0 on padding), labels (-100 on padding),
    and position_ids when any example is packed."""
    pad = 0 if pad_id is None else pad_id
    width = max(len(e.input_ids) for e in examples)
    batch = {
        "input_ids": torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in examples]),
        "attention_mask": torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids))
                                        for e in examples]),
        "labels": torch.tensor([e.labels + [IGNORE] * (width - len(e.labels)) for e in examples]),
    }
    if any(e.position_ids is not None for e in examples):
        batch["position_ids"] = torch.tensor([
            (e.position_ids if e.position_ids is not None else list(range(len(e.input_ids))))
            + [0] * (width - len(e.input_ids)) for e in examples])
    return batch


def format_example(tokenizer, example: Example) -> str:
    """The example's text with trained tokens wrapped in ``[[ ]]`` (for ``--dry-run``)."""
    parts, run, trained = [], [], None
    for tok, lab in zip(example.input_ids, example.labels):
        if run and (lab != IGNORE) != trained:
            text = tokenizer.decode(run, skip_special_tokens=False)
            parts.append(f"[[{text}]]" if trained else text)
            run = []
        run.append(tok)
        trained = lab != IGNORE
    if run:
        text = tokenizer.decode(run, skip_special_tokens=False)
        parts.append(f"[[{text}]]" if trained else text)
    return "".join(parts)
