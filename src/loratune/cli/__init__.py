"""``loratune`` command line: train, eval, predict, generate, chat, merge, quickstart, serve, export, combine,
analyze, extract, resize.

Every failure that a user can fix ends as one line on stderr and exit code 2; ``LORATUNE_DEBUG=1``
shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from .. import settings
from ..errors import ConfigWarning, LoraTuneError
from .args import positive_int

EXAMPLE = "examples/dates.yaml"


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (the usage itself is what --help is for)."""

    def error(self, message: str):
        hint = "" if "--help" in message else f" (see {self.prog} --help)"
        self.exit(2, f"{self.prog}: error: {message}{hint}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="loratune", description="LoRA fine-tuning: train, evaluate, merge, serve.")
    p.add_argument("--version", action="version", version=_version())
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
    e.add_argument("--batch-size", type=positive_int, default=32)
    e.add_argument("--max-new-tokens", type=positive_int, default=32)
    e.add_argument("--json", action="store_true", help="print JSON instead of a table (always valid: no NaN)")
    which = e.add_mutually_exclusive_group()
    which.add_argument("--no-base", action="store_true", help="evaluate only base+adapter (the base is not run)")
    which.add_argument("--base-only", action="store_true", help="evaluate only the base model")
    e.add_argument("--show", type=_count, default=0, metavar="N", help="print N examples, misses first")
    e.add_argument("--plot", help="a classifier's confusion-matrix PNG (default: beside the adapter directory)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    _device_args(e)

    g = sub.add_parser("generate", help="complete one prompt with an adapter")
    g.add_argument("prompt")
    g.add_argument("--adapter", help="adapter directory")
    g.add_argument("--model", help="base model (default: the adapter's)")
    g.add_argument("--max-new-tokens", type=positive_int, default=128)
    g.add_argument("--system-prompt", help="system prompt (default: the one the adapter was trained with)")
    _generation_args(g)
    _device_args(g)

    c = sub.add_parser("chat", help="interactive chat with an adapter (/reset, /system TEXT, /exit)")
    c.add_argument("--adapter", help="adapter directory")
    c.add_argument("--model", help="base model (default: the adapter's)")
    c.add_argument("--max-new-tokens", type=positive_int, default=256)
    c.add_argument("--system-prompt", help="system prompt (default: the one the adapter was trained with)")
    _generation_args(c)
    _device_args(c)

    m = sub.add_parser("merge", help="merge an adapter into its base and save an HF model",
                       description="Write base + adapter as one HF-format model (safetensors, tokenizer).")
    m.add_argument("--adapter", required=True)
    m.add_argument("--out", required=True, help="a new or empty directory, or one an earlier merge wrote")
    m.add_argument("--model", help="base model (default: the adapter's)")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty --out that loratune did not write")
    m.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the merged weights (default: the base's; a 4-bit base is merged in float32); "
                        "ΔW is always added in float32 and the sum rounded once")
    m.add_argument("--device", default="auto", help="where to merge: auto, cpu, cuda, cuda:N, mps (default: auto)")

    q = sub.add_parser("quickstart", help="the main job: fine-tune the bundled model on ISO dates",
                       description="Generate the dates task, measure the base model, fine-tune, measure again, "
                                   "merge. Writes adapter, merged model and loss curve.")
    q.add_argument("--out", default="runs/quickstart", help="a new or empty directory, or an earlier quickstart's "
                   "(default: runs/quickstart)")
    q.add_argument("overrides", nargs="*", help="dotted overrides such as train.max_steps=40")
    q.add_argument("--no-progress", action="store_true")
    _device_args(q, dtype_default=None)

    i = sub.add_parser("info", help="what an adapter directory holds: base, rank, size, training run",
                       description="Describe an adapter (loratune's or PEFT's): base model, rank/alpha/targets, "
                                   "variant, parameters, file size, the run that made it, its system prompt.")
    i.add_argument("adapter", metavar="DIR")
    i.add_argument("--model", help="also check that the adapter loads on this base model")
    i.add_argument("--json", action="store_true", help="print JSON")

    from . import classify, compose, export, serve  # their parsers only: each command's work is imported when it runs

    classify.add_parser(sub)
    serve.add_parser(sub)
    export.add_parser(sub)
    compose.add_parsers(sub)
    return p


def _device_args(p: argparse.ArgumentParser, dtype_default: str | None = "float32") -> None:
    """--device and --dtype (checked against this machine when the command runs: loratune.devices)."""
    p.add_argument("--device", default=None if dtype_default is None else "auto",
                   help="auto (the first GPU, else the CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default=dtype_default, choices=("auto", "float32", "bfloat16", "float16"),
                   help="the base model's precision (auto: bfloat16 where the device does it fast); adapters stay "
                        f"float32 (default: {dtype_default or 'the config: model.dtype'})")


def _version() -> str:
    """``loratune X (torch Y, transformers Z)`` from the installed packages' metadata (nothing imported)."""
    from importlib import metadata

    def of(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return f"loratune {of('loratune')} (torch {of('torch')}, transformers {of('transformers')}, peft {of('peft')})"


def _generation_args(p: argparse.ArgumentParser) -> None:
    """Sampling and output flags of generate and chat (greedy unless a temperature, top-p or top-k is given)."""
    p.add_argument("--temperature", type=_number(0.0, None), help="sample at this temperature (0: greedy)")
    p.add_argument("--top-p", type=_number(0.0, 1.0, low_open=True), help="nucleus sampling: 0 < p ≤ 1")
    p.add_argument("--top-k", type=positive_int, help="sample from the k likeliest tokens")
    p.add_argument("--repetition-penalty", type=_number(0.0, None, low_open=True), help="> 1 discourages repeats")
    p.add_argument("--seed", type=int, help="seed for sampling (same seed, same output)")
    p.add_argument("--no-stream", action="store_true", help="print the answer when done, not token by token")


def _number(low: float, high: float | None, low_open: bool = False):
    """argparse type: a finite number in [low, high] (low excluded when ``low_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        ok = value == value and value not in (float("inf"), float("-inf")) and (value > low if low_open
                                                                                 else value >= low)
        if not ok or (high is not None and value > high):
            span = f"{'>' if low_open else '≥'} {low:g}" + ("" if high is None else f" and ≤ {high:g}")
            raise argparse.ArgumentTypeError(f"must be a number {span}, got {text!r}")
        return value

    return parse


def _count(text: str) -> int:
    """argparse type: a whole number ≥ 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number ≥ 0, got {text!r}")
    return int(text)


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
            return _command(args.command)(args) or 0
        except LoraTuneError as e:
            if settings.get().debug:
                raise
            print(f"loratune {args.command}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted" + (" (the same command resumes from the last checkpoint, if train.save_every "
                                   "wrote one; otherwise it starts over)" if args.command == "train" else ""),
                  file=sys.stderr)
            return 130


def _command(name: str):
    """The function that runs command ``name``, imported only when it runs (``loratune --help`` stays quick)."""
    if name == "train":
        from .train import cmd_train as command
    elif name in ("eval", "generate", "chat"):
        from . import infer

        command = {"eval": infer.cmd_eval, "generate": infer.cmd_generate, "chat": infer.cmd_chat}[name]
    elif name == "info":
        from .info import cmd_info as command
    elif name == "merge":
        from .merge import cmd_merge as command
    elif name == "predict":
        from .classify import cmd_predict as command
    elif name == "serve":
        from .serve import cmd_serve as command
    elif name == "export":
        from .export import cmd_export as command
    elif name in ("combine", "analyze", "extract", "resize"):
        from . import compose

        command = getattr(compose, f"cmd_{name}")
    else:
        from .quickstart import cmd_quickstart as command
    return command

if __name__ == "__main__":
    sys.exit(main())
