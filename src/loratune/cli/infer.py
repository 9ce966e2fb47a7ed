"""``loratune eval``, ``generate`` and ``chat``: a base model, or a base with an adapter, on held-out data or
prompts."""

from __future__ import annotations

import json
from pathlib import Path

from .. import devices
from ..adapters import LoraModel
from ..adapters.files import read_quantization, recorded_base
from ..data import DataConfig, prepare_eval
from ..errors import AdapterFileError, LoraTuneError
from ..models import load_base_model
from ..training.evaluate import eval_loss, exact_match, generate_batch, merged_for_generation
from ..training.loop import PROMPT_FILE, require_causal_lm
from .output import finite_or_none, is_classifier, print_table


def load_for_inference(adapter: str | None, model_name: str | None, system_prompt: str | None = None,
                       device: str = "auto", dtype: str = "float32"):
    """(model, tokenizer, system prompt): base or base + adapter, with the tokenizer (chat template) and the
    system prompt the adapter was trained with, unless given; on ``device`` in ``dtype`` (``loratune.devices``:
    names or auto). The adapter file holds no device: it loads wherever the base is, in float32 on a half base."""
    from transformers import AutoTokenizer

    where = devices.resolve_device(device, key="--device")
    precision = devices.resolve_dtype(dtype, where, key="--dtype")
    saved = recorded_base(adapter) if adapter else None
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


def prompt_ids(tok, messages: list[dict], system_prompt: str | None) -> list[int]:
    """Token ids of a chat prompt; a tokenizer without a chat template gets the plain text (a base LM)."""
    if system_prompt:
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if not getattr(tok, "chat_template", None):
        return list(tok("\n".join(m["content"] for m in messages))["input_ids"])
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def _load(args):
    if args.adapter and is_classifier(args.adapter):  # a label head: it labels texts (cli/classify.py)
        raise LoraTuneError(f"{args.adapter} is a classification adapter (task_type SEQ_CLS), which labels texts "
                            f"and does not generate; use: loratune predict --adapter {args.adapter} \"TEXT\"")
    return load_for_inference(args.adapter, args.model, args.system_prompt, args.device, args.dtype)


def cmd_eval(args) -> int:
    if getattr(args, "no_base", False) and not args.adapter:
        raise LoraTuneError("--no-base leaves nothing to evaluate without --adapter; give --adapter DIR, or drop "
                            "--no-base to evaluate the base model")
    if args.adapter and is_classifier(args.adapter):  # accuracy, macro-F1, confusion matrix (cli/classify.py)
        from .classify import cmd_eval_classifier

        return cmd_eval_classifier(args)
    model, tok, system_prompt = _load(args)
    examples, _ = prepare_eval(DataConfig(train=args.data, format=args.format, system_prompt=system_prompt), tok)
    progress = not getattr(args, "no_progress", False)
    rows: dict[str, dict] = {}
    shown: dict[str, list] = {}

    def measure(label: str) -> None:
        ev = eval_loss(model, examples, tok.pad_token_id, args.batch_size)
        em = exact_match(model, tok, examples, args.batch_size, args.max_new_tokens, progress=progress,
                         desc=f"{label} exact match")
        rows[label] = {**ev, "exact_match": em["exact_match"], "n": len(examples)}
        shown[label] = em["examples"][:getattr(args, "show", 0) or 0]

    if args.adapter and not getattr(args, "no_base", False):
        with model.disable_adapter():
            measure("base")
    if args.adapter and not getattr(args, "base_only", False):
        measure("adapter")
    if not args.adapter:
        measure("base")
    if args.json:
        out = {label: {**r, **({"examples": shown[label]} if getattr(args, "show", 0) else {})}
               for label, r in rows.items()}
        print(json.dumps(finite_or_none(out), indent=2, allow_nan=False))
        return 0
    print_table(rows)
    for label, some in shown.items():
        if some:
            print(f"\n{label}: {len(some)} example(s), misses first")
            for e in some:
                mark = "hit " if e["match"] else "MISS"
                print(f"  {mark} {_one_line(e['prompt'])!r}\n       got {e['prediction']!r}, expected "
                      f"{e['reference']!r}")
    return 0


def _one_line(text: str, width: int = 100) -> str:
    """The last ``width`` characters of ``text`` on one line (a chat prompt's end is the user's question)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else "…" + flat[-width:]


def sampling_options(args) -> dict:
    """``generate`` keyword arguments from the CLI's --temperature/--top-p/--top-k/--repetition-penalty flags:
    greedy unless a temperature above 0, a top-p or a top-k is given (temperature then defaults to 1)."""
    temperature, top_p, top_k = (getattr(args, k, None) for k in ("temperature", "top_p", "top_k"))
    penalty = getattr(args, "repetition_penalty", None)
    out: dict = {} if penalty is None else {"repetition_penalty": penalty}
    if temperature == 0:
        if top_p is not None or top_k is not None:
            raise LoraTuneError("--temperature 0 is greedy decoding, which ignores --top-p/--top-k; give a "
                                "temperature above 0 to sample, or drop --top-p/--top-k")
        return out
    if temperature is None and top_p is None and top_k is None:
        return out
    out.update(do_sample=True, temperature=1.0 if temperature is None else temperature)
    out.update({k: v for k, v in (("top_p", top_p), ("top_k", top_k)) if v is not None})
    return out


def _generate(model, tok, ids: list[int], args) -> str:
    """One completion: seeded (--seed) and streamed to stdout token by token unless --no-stream."""
    from transformers import TextStreamer, set_seed

    if getattr(args, "seed", None) is not None:
        set_seed(args.seed)
    stream = not getattr(args, "no_stream", False)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if stream else None
    text = generate_batch(model, tok, [ids], args.max_new_tokens, streamer=streamer, **sampling_options(args))[0]
    if not stream:
        print(text.strip(), flush=True)
    return text.strip()


def cmd_generate(args) -> int:
    model, tok, system_prompt = _load(args)
    sampling_options(args)  # bad flag combinations are refused before any work
    with merged_for_generation(model):
        _generate(model, tok, prompt_ids(tok, [{"role": "user", "content": args.prompt}], system_prompt), args)
    return 0


CHAT_HELP = "/reset clears the history, /system TEXT sets the system prompt, /exit, Ctrl-D or an empty line quits"


def cmd_chat(args) -> int:
    model, tok, system_prompt = _load(args)
    sampling_options(args)
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    messages: list[dict] = []
    print(f"chat with the model; {CHAT_HELP}", flush=True)
    with merged_for_generation(model):
        while True:
            try:
                text = input("> ").strip()
            except EOFError:
                break
            if not text or text in ("/exit", "/quit"):
                break
            if text == "/reset":
                messages = []
                print("(history cleared)", flush=True)
                continue
            if text == "/system" or text.startswith("/system "):
                system_prompt = text[len("/system"):].strip() or None
                print(f"(system prompt {'set' if system_prompt else 'removed'}; history cleared)", flush=True)
                messages = []
                continue
            if text.startswith("/"):
                print(f"(unknown command {text.split()[0]}; {CHAT_HELP})", flush=True)
                continue
            messages.append({"role": "user", "content": text})
            ids = fit_history(tok, messages, system_prompt, context - args.max_new_tokens if context else None)
            if ids is None:
                messages.pop()
                print(f"(that message alone is longer than the model's context of {context} tokens less "
                      f"--max-new-tokens {args.max_new_tokens}; send a shorter one)", flush=True)
                continue
            messages.append({"role": "assistant", "content": _generate(model, tok, ids, args)})
    return 0


def fit_history(tok, messages: list[dict], system_prompt: str | None, limit: int | None) -> list[int] | None:
    """Prompt ids of ``messages`` within ``limit`` tokens: the oldest exchanges are dropped from ``messages`` (in
    place) with a note until it fits; None when the last message alone does not fit."""
    ids = prompt_ids(tok, messages, system_prompt)
    dropped = 0
    while limit is not None and len(ids) > limit:
        if len(messages) <= 1:
            return None
        del messages[:2 if len(messages) > 2 else 1]  # one user turn and its answer
        dropped += 1
        ids = prompt_ids(tok, messages, system_prompt)
    if dropped:
        print(f"(dropped the {dropped} oldest exchange(s) to stay within the model's context of {limit} tokens)",
              flush=True)
    return ids
