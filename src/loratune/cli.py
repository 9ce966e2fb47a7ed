"""``loratune`` command line: train, eval, generate, chat, merge, quickstart.

Every failure that a user can fix ends as one line on stderr and exit code 2; ``LORATUNE_DEBUG=1``
shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import LoraTuneError

EXAMPLE = "examples/dates.yaml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loratune", description="LoRA fine-tuning: train, evaluate, merge, serve.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune a LoRA adapter from a YAML config",
                       description="Fine-tune a LoRA adapter. Resumes from the latest checkpoint in output_dir.")
    t.add_argument("config", help=f"YAML config (see {EXAMPLE})")
    t.add_argument("overrides", nargs="*", help="dotted overrides such as lora.r=32 train.lr=1e-4")
    t.add_argument("--dry-run", action="store_true", help="validate, show data and parameters, then exit")
    t.add_argument("--overwrite", action="store_true", help="replace a different run in output_dir")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="held-out loss, perplexity and exact match",
                       description="Evaluate the base model, or base vs base+adapter, on a data file.")
    e.add_argument("--adapter", help="adapter directory (without it, the base model alone)")
    e.add_argument("--data", required=True, help="jsonl/json/csv/parquet file")
    e.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    e.add_argument("--format", default="auto", help="data format (default: detect)")
    e.add_argument("--system-prompt", help="system prompt (default: the one the adapter was trained with)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")

    g = sub.add_parser("generate", help="complete one prompt with an adapter")
    g.add_argument("prompt")
    g.add_argument("--adapter", help="adapter directory")
    g.add_argument("--model", help="base model (default: the adapter's)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--system-prompt", help="system prompt (default: the one the adapter was trained with)")

    c = sub.add_parser("chat", help="interactive chat with an adapter (empty line or Ctrl-D quits)")
    c.add_argument("--adapter", help="adapter directory")
    c.add_argument("--model", help="base model (default: the adapter's)")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--system-prompt", help="system prompt (default: the one the adapter was trained with)")

    m = sub.add_parser("merge", help="merge an adapter into its base and save an HF model",
                       description="Write base + adapter as one HF-format model (safetensors, tokenizer).")
    m.add_argument("--adapter", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--model", help="base model (default: the adapter's)")

    q = sub.add_parser("quickstart", help="the main job: fine-tune the bundled model on ISO dates",
                       description="Generate the dates task, measure the base model, fine-tune, measure again, "
                                   "merge. Writes adapter, merged model and loss curve.")
    q.add_argument("--out", default="runs/quickstart")
    q.add_argument("overrides", nargs="*", help="dotted overrides such as train.max_steps=40")
    q.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Flags may stand before or after the key=value overrides: argparse leaves overrides that follow a flag
    # unparsed, so they are collected here (parse_intermixed_args does not support subcommands).
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        args.overrides += [a for a in extra if "=" in a and not a.startswith("-")]
        extra = [a for a in extra if a not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)} (see loratune {args.command} --help)")
    import warnings

    from transformers.utils import logging as hf_logging

    from .errors import ConfigWarning

    def note(message, category, *rest, **kw):  # loratune's own warnings as one plain line, not file:line source
        if issubclass(category, ConfigWarning):
            print(f"loratune {args.command}: note: {message}", file=sys.stderr)
        else:
            show(message, category, *rest, **kw)

    hf_logging.disable_progress_bar()  # "Loading weights" bars would bury the one line that matters
    with warnings.catch_warnings():  # restores showwarning when the command ends (main may run in-process)
        show = warnings.showwarning
        warnings.showwarning = note
        try:
            return COMMANDS[args.command](args) or 0
        except LoraTuneError as e:
            if os.environ.get("LORATUNE_DEBUG"):
                raise
            print(f"loratune {args.command}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130


# --- commands -----------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from .runconfig import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    if args.dry_run:
        return dry_run(cfg)
    from .train import train

    result = train(cfg, overwrite=args.overwrite, progress=not args.no_progress)
    print_summary(result.history, result.seconds, result.adapter_dir)
    return 0


def dry_run(cfg) -> int:
    from .base_models import load_base_model
    from .data import format_example, prepare
    from .model import get_lora_model
    from .runconfig import dump_run_config
    from .train import total_steps

    print("# resolved config\n" + dump_run_config(cfg))
    model, tok = load_base_model(cfg.model)
    data = prepare(cfg.data, tok, seed=cfg.train.seed)
    print("# data")
    for line in data.report_lines():
        print("  " + line)
    print("# one tokenized example ([[...]] = trained tokens)")
    print(format_example(tok, data.train[0]))
    lm = get_lora_model(model, cfg.lora_config())
    lm.print_trainable_parameters()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    _, steps = total_steps(len(data.train), cfg.train, world)
    seconds = _time_one_batch(lm, data.train[:cfg.train.batch_size], tok.pad_token_id)
    est = steps * cfg.train.grad_accum * seconds
    print(f"estimated training time on this machine: ~{est / 60:.1f} min ({steps} steps × {cfg.train.grad_accum} "
          f"batch(es) of {cfg.train.batch_size} rows × {seconds:.2f} s measured for one batch"
          f"{'' if world == 1 else ' per process'}; evaluation not included)")
    return 0


def _time_one_batch(lm, rows, pad_id: int) -> float:
    """Seconds for one forward + backward on ``rows`` (the second of two runs: the first warms up)."""
    import time

    from .data import collate
    from .evaluate import response_loss_sum

    lm.train()
    batch = collate(rows, pad_id)
    for _ in range(2):
        start = time.perf_counter()
        response_loss_sum(lm, batch)[0].backward()
        seconds = time.perf_counter() - start
    lm.zero_grad(set_to_none=True)
    return seconds


def _load_for_inference(adapter: str | None, model_name: str | None, system_prompt: str | None = None):
    """(model, tokenizer, system prompt): base or base + adapter, with the tokenizer (chat template) and the
    system prompt the adapter was trained with, unless given."""
    from transformers import AutoTokenizer

    from .base_models import load_base_model
    from .io import read_adapter_config
    from .model import LoraModel
    from .train import PROMPT_FILE, require_causal_lm

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


def _prompt_ids(tok, messages: list[dict], system_prompt: str | None) -> list[int]:
    """Token ids of a chat prompt; a tokenizer without a chat template gets the plain text (a base LM)."""
    if system_prompt:
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if not getattr(tok, "chat_template", None):
        return list(tok("\n".join(m["content"] for m in messages))["input_ids"])
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def cmd_eval(args) -> int:
    from .data import DataConfig, prepare_eval
    from .evaluate import eval_loss, exact_match

    model, tok, system_prompt = _load_for_inference(args.adapter, args.model, args.system_prompt)
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
    from .evaluate import generate_batch

    model, tok, system_prompt = _load_for_inference(args.adapter, args.model, args.system_prompt)
    ids = _prompt_ids(tok, [{"role": "user", "content": args.prompt}], system_prompt)
    print(generate_batch(model, tok, [ids], args.max_new_tokens)[0].strip())
    return 0


def cmd_chat(args) -> int:
    from .evaluate import generate_batch

    model, tok, system_prompt = _load_for_inference(args.adapter, args.model, args.system_prompt)
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
        reply = generate_batch(model, tok, [_prompt_ids(tok, messages, system_prompt)], args.max_new_tokens)[0].strip()
        messages.append({"role": "assistant", "content": reply})
        print(reply)
    return 0


def cmd_merge(args) -> int:
    model, tok, _ = _load_for_inference(args.adapter, args.model)
    save_merged(model, tok, Path(args.out))
    print(f"merged model written to {args.out}")
    return 0


def save_merged(lora_model, tok, out: Path) -> None:
    """base + adapter as one HF model, written to a temp dir then renamed into place."""
    import shutil
    import tempfile

    from .io import public_modes

    merged = lora_model.merge_and_unload(safe_merge=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    merged.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    public_modes(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def cmd_quickstart(args) -> int:
    from .quickstart import run_quickstart

    run_quickstart(Path(args.out), args.overrides, progress=not args.no_progress)
    return 0


# --- printing -----------------------------------------------------------------------------------------
def print_table(rows: dict[str, dict]) -> None:
    cols = ["loss", "perplexity", "exact_match", "n"]
    print(f"{'':10s}" + "".join(f"{c:>14s}" for c in cols))
    for label, r in rows.items():
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{'-':>14s}" if v is None else f"{v:>14.1%}" if c == "exact_match"
                         else f"{v:>14d}" if isinstance(v, int) else f"{v:>14.4f}")
        print(f"{label:10s}" + "".join(cells))


def print_summary(history: list[dict], seconds: float, adapter_dir: Path) -> None:
    """The end-of-run table: train and eval loss at the start, the end and their best."""
    if not history:
        return
    ev = [h["eval_loss"] for h in history if "eval_loss" in h]
    tr = [h["loss"] for h in history]
    print(f"\n{'':12s}{'first':>10s}{'last':>10s}{'best':>10s}")
    print(f"{'train loss':12s}{tr[0]:>10.4f}{tr[-1]:>10.4f}{min(tr):>10.4f}")
    if ev:
        print(f"{'eval loss':12s}{ev[0]:>10.4f}{ev[-1]:>10.4f}{min(ev):>10.4f}")
    print(f"steps {history[-1]['step']} · {seconds:.0f} s · {history[-1]['tokens_per_s']:.0f} tokens/s · "
          f"adapter {adapter_dir}")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "chat": cmd_chat,
            "merge": cmd_merge, "quickstart": cmd_quickstart}

if __name__ == "__main__":
    sys.exit(main())
