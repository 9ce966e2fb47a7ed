"""``loratune serve``: an OpenAI-compatible server for one base model and many LoRA adapters (FastAPI + uvicorn).

FastAPI, uvicorn and the model are imported only when the command runs, so ``loratune --help`` stays quick.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..errors import LoraTuneError
from .args import positive_int

_SPEC = re.compile(r"([^=]+)=(.+)")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0..65535, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number 0 or more, got {text!r}")
    return value


def _adapter_spec(text: str) -> tuple[str, str]:
    m = _SPEC.fullmatch(text)
    if not m:
        raise argparse.ArgumentTypeError(f"must be NAME=PATH, got {text!r}")
    return m.group(1), m.group(2)


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to ``sub`` (the object ``add_subparsers`` returned)."""
    s = sub.add_parser("serve", help="serve the base model and many adapters over an OpenAI-compatible HTTP API",
                       description="Serve one base model and many LoRA adapters (vLLM's OpenAI-compatible API): "
                                   "a request's 'model' picks the adapter, the base's id none.")
    s.add_argument("--model", default="smollm2-135m-instruct", help="bundled name or HF model directory")
    s.add_argument("--adapters", metavar="DIR", help="adapter root: each subfolder is one PEFT adapter, named by "
                                                     "the folder; runtime loads must lie inside it")
    s.add_argument("--adapter", action="append", type=_adapter_spec, default=[], metavar="NAME=PATH",
                   help="one more adapter (repeatable)")
    s.add_argument("--max-loras", type=positive_int, default=8, help="adapters resident in the stacked slots")
    s.add_argument("--max-cpu-loras", type=positive_int, help="adapters kept in host memory (default: --max-loras)")
    s.add_argument("--max-lora-rank", type=positive_int, default=16, help="largest adapter rank a slot holds")
    s.add_argument("--adapter-loaders", type=_count, default=1,
                   help="threads that read cold adapters while decoding goes on (0: read on the scheduler's "
                        "thread, which stops decoding meanwhile)")
    s.add_argument("--max-batch", type=positive_int, default=32, help="sequences decoded together")
    s.add_argument("--max-batch-tokens", type=positive_int, default=16384,
                   help="bound on prompt + max_tokens over the running batch")
    s.add_argument("--policy", choices=["continuous", "static", "sequential"], default="continuous")
    s.add_argument("--served-model-name", help="the base model's id in the API (default: --model)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=_port, default=8000)
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return s


def build_server(args):
    """The ``Server`` the arguments describe (model loaded, adapters registered)."""
    import torch

    from ..models import load_base_model
    from ..serving import Server
    from ..serving.server import DTYPES

    if args.adapters and not Path(args.adapters).is_dir():
        raise LoraTuneError(f"--adapters {args.adapters} is not a directory; pass the folder whose subfolders are "
                            "PEFT adapters")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise LoraTuneError(f"--device {args.device!r} is not a device ({e}); use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoraTuneError("--device cuda, but no CUDA device is available; use --device cpu")
    model, tok = load_base_model(args.model, dtype=DTYPES[args.dtype])
    model.to(device)
    names = [n for n, _ in args.adapter]
    if len(set(names)) < len(names):
        raise LoraTuneError(f"--adapter names must be distinct, got {names}")
    for name, path in args.adapter:
        if not Path(path).is_dir():
            raise LoraTuneError(f"--adapter {name}={path}: not a directory")
    return Server(model, tok, args.served_model_name or str(args.model), root=args.adapters,
                  adapters=dict(args.adapter), max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras,
                  max_lora_rank=args.max_lora_rank, max_batch=args.max_batch, max_batch_tokens=args.max_batch_tokens,
                  policy=args.policy, adapter_loaders=args.adapter_loaders)


def cmd_serve(args) -> int:
    import uvicorn

    from ..serving import create_app

    server = build_server(args)
    print(f"loratune serve: {server.base_id} with {len(server.registry.names())} adapter(s) on "
          f"http://{args.host}:{args.port}/v1")
    if args.adapters and not server.registry.names():  # (said, not refused: adapters may be loaded at run time)
        print(f"note: no adapter under {args.adapters} (an adapter is a subfolder with adapter_config.json and "
              "adapter_model.safetensors); requests can name the base, or load one with POST "
              "/v1/load_lora_adapter", file=sys.stderr)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")
    return 0
