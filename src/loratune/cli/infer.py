"""``loratune eval``, ``generate`` and ``chat``: a base model, or a base with an adapter, on held-out data or
prompts."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .. import devices
from ..adapters import LoraModel
from ..adapters.files import read_adapter_config, read_quantization
from ..data import DataConfig, prepare_eval
from ..errors import AdapterFileError
from ..models import load_base_model
from ..training.evaluate import eval_loss, exact_match, generate_batch
from ..training.loop import PROMPT_FILE, require_causal_lm
from .output import print_table


def load_for_inference(adapter: str | None, model_name: str | None, system_prompt: str | None = None,
                       device: str = "auto", dtype: str = "float32"):
    """(model, tokenizer, system prompt): base or base + adapter, with the tokenizer (chat template) and the
    system prompt the adapter was trained with, unless given; on ``device`` in ``dtype`` (``loratune.devices``:
    names or auto). The adapter file holds no device: it loads wherever the base is, in float32 on a half base."""
    from transformers import AutoTokenizer

    where = devices.resolve_device(device, key="--device")
    precision = devices.resolve_dtype(dtype, where, key="--dtype")
    saved = read_adapter_config(adapter).base_model_name_or_path if adapter else None
    name = model_name or saved or "smollm2-135m-instruct"
    model, tok = load_base_model(name, dtype=precision, device=where, **_base_quantization(adapter))
    require_causal_lm(model, name)
    if adapter is None:
        return model, tok, system_prompt
    if (Path(adapter) / "tokenizer_config.json").is_file():  # saved by `loratune train`, with its template
        try:
            tok = AutoTokenizer.from_pretrained(adapter)
        except (OSError, ValueError) as e:  # not UTF-8, not JSON, a missing vocabulary file
            raise AdapterFileError(f"the tokenizer saved in {adapter} cannot be read ({_first_line(e)}); re-copy the "
                                   "adapter, or delete its tokenizer files to use the base model's") from None
        tok.pad_token = tok.pad_token or tok.eos_token
    if system_prompt is None:
        system_prompt = _saved_system_prompt(Path(adapter) / PROMPT_FILE)
    return LoraModel.from_pretrained(model, adapter), tok, system_prompt


def _base_quantization(adapter: str | None) -> dict:
    """``load_base_model`` arguments that rebuild the 4-bit base an adapter was trained on (QLoRA), or none."""
    q = read_quantization(adapter) if adapter else None
    if not q:
        return {}
    import torch

    dtype = getattr(torch, str(q.get("compute_dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise AdapterFileError(f"{Path(adapter) / 'loratune_quantization.json'}: compute_dtype "
                               f"{q.get('compute_dtype')!r} is not a dtype; copy the adapter again")
    return {"quantize": q["quantize"], "compute_dtype": dtype, "quantize_skip_modules": q.get("quantize_skip_modules")}


def _saved_system_prompt(path: Path) -> str | None:
    """The system prompt ``loratune train`` recorded beside the adapter (None where there is none)."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterFileError(f"{path} is damaged ({_first_line(e)}); delete it or pass --system-prompt") from None
    prompt = saved.get("system_prompt") if isinstance(saved, dict) else ""
    if prompt is not None and not isinstance(prompt, str):
        raise AdapterFileError(f"{path}: system_prompt must be text or null; fix it or pass --system-prompt")
    return prompt


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def finite_or_none(rows: dict) -> dict:
    """``rows`` with every NaN or infinite number replaced by None: JSON has no NaN."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return None if isinstance(v, float) and not math.isfinite(v) else v

    return clean(rows)


def prompt_ids(tok, messages: list[dict], system_prompt: str | None) -> list[int]:
    """Token ids of a chat prompt; a tokenizer without a chat template gets the plain text (a base LM)."""
    if system_prompt:
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if not getattr(tok, "chat_template", None):
        return list(tok("\n".join(m["content"] for m in messages))["input_ids"])
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def _load(args):
    return load_for_inference(args.adapter, args.model, args.system_prompt, args.device, args.dtype)


def cmd_eval(args) -> int:
    model, tok, system_prompt = _load(args)
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
        print(json.dumps(finite_or_none(rows), indent=2, allow_nan=False))
    else:
        print_table(rows)
    return 0


def cmd_generate(args) -> int:
    model, tok, system_prompt = _load(args)
    ids = prompt_ids(tok, [{"role": "user", "content": args.prompt}], system_prompt)
    print(generate_batch(model, tok, [ids], args.max_new_tokens)[0].strip())
    return 0


def cmd_chat(args) -> int:
    model, tok, system_prompt = _load(args)
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


