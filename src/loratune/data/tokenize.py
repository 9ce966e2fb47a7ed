"""Chat messages to token ids and loss masks through the tokenizer's chat template; the over-length policy."""

from __future__ import annotations

from ..errors import DataError
from .schema import END_TOKENS, IGNORE, DataConfig, Example, Row, Step


def _render(tokenizer, messages: list[dict], template: str | None, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         chat_template=template)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _ends_turn(tokenizer, text: str) -> bool:
    return any(text.rstrip().endswith(t) for t in (*END_TOKENS, tokenizer.eos_token) if t)


def tokenize_messages(tokenizer, messages: list[dict], cfg: DataConfig, fmt: str) -> Example:
    """Token ids and labels of one conversation: loss on every assistant turn (through its end-of-turn
    token, appending EOS where the template writes none), or on everything with ``train_on_prompt``."""
    if fmt == "text":
        ids = list(tokenizer(messages[-1]["content"], add_special_tokens=True)["input_ids"])
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        return Example(ids, list(ids))
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
    t = cfg.chat_template
    full = _render(tokenizer, messages, t, False)
    spans, cursor = [], 0  # (start, end) character spans of the assistant turns in `full`
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], t, True)
        upto = _render(tokenizer, messages[:i + 1], t, False)
        if upto.startswith(before) and full.startswith(upto) and len(before) >= cursor:
            start, end = len(before), len(upto.rstrip())
        else:  # template is not prefix-stable (e.g. rewrites earlier turns): find the content instead
            start = full.find(m["content"], cursor)
            if start < 0:
                continue
            end = start + len(m["content"])
            for tok in (*END_TOKENS, tokenizer.eos_token):
                at = full.find(tok, end) if tok else -1
                if at >= 0 and not full[end:at].strip():
                    end = at + len(tok)
                    break
        if end > start:
            spans.append((start, end))
            cursor = end
    ids, labels, pos = [], [], 0
    for start, end in spans:
        head, body = _ids(tokenizer, full[pos:start]), _ids(tokenizer, full[start:end])
        if not _ends_turn(tokenizer, full[start:end]) and tokenizer.eos_token_id is not None:
            body.append(tokenizer.eos_token_id)
        ids += head + body
        labels += (head if cfg.train_on_prompt else [IGNORE] * len(head)) + body
        pos = end
    tail = _ids(tokenizer, full[pos:])
    ids += tail
    labels += tail if cfg.train_on_prompt else [IGNORE] * len(tail)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = _ids(tokenizer, _render(tokenizer, messages[:last], t, True))
    return Example(ids, labels, prompt, messages[last]["content"])


def tokenize_all(tokenizer, convs: list[Row], cfg: DataConfig, fmt: str, label: str,
                  report: list[Step]) -> list[Example]:
    """Tokenize, apply the over-length policy and check that something is trained."""
    if fmt != "text" and cfg.chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; set data.chat_template to a Jinja template "
                        "string, or use data.format=text for plain text")
    from jinja2 import TemplateError

    examples, rejected = [], []
    for n, messages in convs:
        try:
            examples.append(tokenize_messages(tokenizer, messages, cfg, fmt))
        except TemplateError as e:  # a template may refuse a row, e.g. roles that do not alternate
            rejected.append(f"row {n}: {(str(e).splitlines() or [type(e).__name__])[0]}")
    if rejected:
        report.append(Step(f"{label}: rows the chat template rejected", len(rejected),
                           "; ".join(rejected[:5])))
    long = [e for e in examples if len(e.input_ids) > cfg.max_seq_len]
    if cfg.overlength == "drop":
        examples = [e for e in examples if len(e.input_ids) <= cfg.max_seq_len]
        report.append(Step(f"{label}: rows over max_seq_len={cfg.max_seq_len} tokens dropped", len(long)))
    else:
        for e in long:
            e.input_ids, e.labels = e.input_ids[:cfg.max_seq_len], e.labels[:cfg.max_seq_len]
        report.append(Step(f"{label}: rows over max_seq_len={cfg.max_seq_len} tokens truncated", len(long)))
    if examples and all(v == IGNORE for e in examples for v in e.labels[1:]):
        raise DataError(f"{label}: every label is masked, so there is nothing to train on: raise "
                        f"data.max_seq_len (now {cfg.max_seq_len}), use overlength=drop, or check that the "
                        "chat template writes the assistant turns")
    empty = [e for e in examples if all(v == IGNORE for v in e.labels[1:])]
    if empty:
        examples = [e for e in examples if any(v != IGNORE for v in e.labels[1:])]
        report.append(Step(f"{label}: rows with no trained tokens left dropped", len(empty)))
    return examples
