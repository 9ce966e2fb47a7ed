"""``loratune eval``, ``generate`` and ``chat``: a base model, or a base with an adapter, on held-out data or
prompts."""

from __future__ import annotations

import json
from pathlib import Path

from ..adapters import LoraModel
from ..adapters.files import read_adapter_config
from ..data import DataConfig, prepare_eval
from ..models import load_base_model
from ..training.evaluate import eval_loss, exact_match, generate_batch
from ..training.loop import PROMPT_FILE, require_causal_lm
from .output import print_table


def load_for_inference(adapter: str | None, model_name: str | None, system_prompt: str | None = None):
    """(model, tokenizer, system prompt): base or base + adapter, with the tokenizer (chat template) and the
    system prompt the adapter was trained with, unless given."""
    from transformers import AutoTokenizer

    saved = read_adapter_config(adapter).base_model_name_or_path if adapter else None
    name = model_name or saved or "smollm2-135m-instruct"
    model, tok = load_base_model(name)
    require_causal_lm(model, name)
    if adapter is None:
        return model, tok, system_prompt
    if (Path(adapter) / "tokenizer_config.json").is_file():  # saved by `loratune train`, with its template
        tok = AutoTokenizer.from_pretrained(adapter)
        tok.pad_token = tok.pad_token or tok.eos_token
    prompt_file = Path(adapter) / PROMPT_FILE
    if system_prompt is None and prompt_file.is_file():
        system_prompt = json.loads(prompt_file.read_text()).get("system_prompt")
    return LoraModel.from_pretrained(model, adapter), tok, system_prompt


def prompt_ids(tok, messages: list[dict], system_prompt: str | None) -> list[int]:
    """Token ids of a chat prompt; a tokenizer without a chat template gets the plain text (a base LM)."""
    if system_prompt:
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if not getattr(tok, "chat_template", None):
        return list(tok("\n".join(m["content"] for m in messages))["input_ids"])
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def cmd_eval(args) -> int:
    model, tok, system_prompt = load_for_inference(args.adapter, args.model, args.system_prompt)
    examples, _ = prepare_eval(DataConfig(train=args.data, format=args.format, system_prompt=system_prompt), tok)
    rows = {}

    def measure(label: str) -> None:
        ev = eval_loss(model, examples, tok.pad_token_id, args.batch_size)
        em = exact_match(model, tok, examples, args.batch_size, args.max_new_tokens)
        rows[label] = {**ev, "exact_match": em["exact_match"], "n": len(examples)}

    if args.adapter:
        with model.disable_adapter():
            measure("base")
        measure("adapter")
    else:
        measure("base")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)
    return 0


def cmd_generate(args) -> int:
    model, tok, system_prompt = load_for_inference(args.adapter, args.model, args.system_prompt)
    ids = prompt_ids(tok, [{"role": "user", "content": args.prompt}], system_prompt)
    print(generate_batch(model, tok, [ids], args.max_new_tokens)[0].strip())
    return 0


def cmd_chat(args) -> int:
    model, tok, system_prompt = load_for_inference(args.adapter, args.model, args.system_prompt)
    messages: list[dict] = []
    print("chat with the model; an empty line or Ctrl-D quits")
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            break
        if not text:
            break
        messages.append({"role": "user", "content": text})
        reply = generate_batch(model, tok, [prompt_ids(tok, messages, system_prompt)], args.max_new_tokens)[0].strip()
        messages.append({"role": "assistant", "content": reply})
        print(reply)
    return 0


