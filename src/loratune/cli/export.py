"""``loratune export``: an adapter as a llama.cpp LoRA GGUF, a merged GGUF model, or an Ollama folder.

Wired into the parser by ``add_parser(sub)``; ``cmd_export(args)`` runs it. Every failure a user can fix is a
``LoraTuneError`` (one line naming the problem and the fix).
"""

from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = ("gguf-adapter", "gguf", "ollama")
OUTTYPE_DEFAULTS = {"gguf-adapter": "f32", "gguf": "q8_0", "ollama": "q8_0"}


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to ``sub`` (the object ``add_subparsers`` returned)."""
    x = sub.add_parser("export", help="export an adapter for llama.cpp, Ollama or LM Studio (GGUF)",
                       description="Write the adapter as a llama.cpp LoRA adapter (gguf-adapter), base + adapter as "
                                   "one GGUF model (gguf), or an Ollama folder with a Modelfile (ollama).")
    x.add_argument("--adapter", required=True, help="adapter directory (PEFT format)")
    x.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    x.add_argument("--out", required=True, help="a .gguf file (gguf-adapter, gguf) or a new folder (ollama)")
    x.add_argument("--outtype", help="gguf-adapter: f32 (default), f16, bf16, q8_0; gguf and ollama: q8_0 (default), "
                                     "f16, bf16, f32, q4_0, q4_1, q5_0, q5_1, or base (the base file's own types)")
    x.add_argument("--model", help="base model: bundled name or .gguf file (default: the adapter's)")
    x.add_argument("--ollama-adapter", action="store_true",
                   help="ollama: the base GGUF plus the adapter (FROM + ADAPTER) instead of the merged model")
    x.add_argument("--name", help="the model name in the printed ollama/vllm lines (default: the adapter's folder)")
    x.add_argument("--system-prompt", help="ollama SYSTEM (default: the one the adapter was trained with)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return x


def cmd_export(args) -> int:
    """Run ``loratune export`` as parsed by ``add_parser``'s subcommand; prints what it wrote and how to run it."""
    from ..adapters.files import read_adapter_config, recorded_base
    from ..formats import gguf as G
    from ..formats.gguf_model import MODEL_OUTTYPES, export_merged

    adapter = Path(args.adapter)
    cfg = read_adapter_config(adapter)
    base = args.model or recorded_base(adapter) or G.DEFAULT_BASE
    outtype = args.outtype or OUTTYPE_DEFAULTS[args.format]
    name = args.name or adapter.resolve().name
    out = Path(args.out)
    if args.format == "gguf-adapter":
        result = G.export_adapter(adapter, out, base, outtype, args.overwrite)
        folded = f"; per-module scales folded into B for {len(result.folded)} module(s)" if result.folded else ""
        print(f"llama.cpp LoRA adapter written to {out} ({len(result.tensors)} pairs, alpha {result.alpha:g}"
              f"{folded})")
        gguf_base = G.base_gguf_file(base)
        print(f"run it:  llama-cli -m {gguf_base or 'BASE.gguf'} --lora {out}")
    elif args.format == "gguf":
        if outtype not in MODEL_OUTTYPES:
            raise G.ExportError(f"--outtype {outtype!r} is not a GGUF model type; use one of "
                                f"{', '.join(MODEL_OUTTYPES)}")
        export_merged(adapter, out, base, outtype, args.overwrite)
        print(f"merged GGUF model ({outtype}) written to {out}\nrun it:  llama-cli -m {out}")
    else:
        _export_ollama(args, adapter, base, outtype, name, out)
    _print_vllm(adapter, base, name, cfg)
    return 0


def _export_ollama(args, adapter: Path, base: str, outtype: str, name: str, out: Path) -> None:
    from ..formats import gguf as G
    from ..formats.gguf_model import export_merged
    from ..formats.ollama import copy_file, ollama_create_line, translate_chat_template, write_ollama_dir

    tok = _tokenizer(adapter, base)
    template = translate_chat_template(
        lambda m, g: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g),
        tok.bos_token, tok.eos_token) if getattr(tok, "chat_template", None) else None
    system = args.system_prompt if args.system_prompt is not None else _saved_prompt(adapter)
    if args.ollama_adapter:
        gguf_base = G.base_gguf_file(base)
        if gguf_base is None:
            raise G.ExportError(f"--ollama-adapter needs the base as a GGUF file, and {base} is not one; pass the "
                                "base's .gguf file as --model, or leave out --ollama-adapter (merged model)")
        if args.outtype is None:
            outtype = OUTTYPE_DEFAULTS["gguf-adapter"]

        def write(tmp: Path):
            G.export_adapter(adapter, tmp / "adapter.gguf", base, outtype)
            copy_file(gguf_base, tmp / "base.gguf")
            return "base.gguf", "adapter.gguf"
    else:
        def write(tmp: Path):
            export_merged(adapter, tmp / "model.gguf", base, outtype)
            return "model.gguf", None

    write_ollama_dir(out, write, template, system, args.overwrite)
    if template is None:
        print("note: the chat template could not be translated to Ollama's form; the Modelfile has no TEMPLATE, so "
              "Ollama uses the template inside the GGUF file")
    print(f"Ollama folder written to {out}\nimport it:  {ollama_create_line(out, name)}")


def _tokenizer(adapter: Path, base: str):
    """The adapter's saved tokenizer (its chat template), else the base's."""
    from transformers import AutoTokenizer

    from ..errors import AdapterFileError
    from ..models import resolve_model_path

    source = adapter if (adapter / "tokenizer_config.json").is_file() else resolve_model_path(base)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise AdapterFileError(f"the tokenizer in {source} cannot be read ({e}); re-copy it") from None


def _saved_prompt(adapter: Path) -> str | None:
    from ..training.loop import PROMPT_FILE
    from .infer import _saved_system_prompt

    return _saved_system_prompt(adapter / PROMPT_FILE)


def _print_vllm(adapter: Path, base: str, name: str, cfg) -> None:
    from ..adapters.files import read_adapter_tensors
    from ..formats.ollama import vllm_serve_line
    from ..models import BUNDLED, resolve_model_path

    if getattr(cfg, "use_adalora", False):  # vLLM serves LoRA adapters; its AdaLoRA support is untested here
        print("vLLM: not suggested for an AdaLoRA adapter (serve the merged model, or train a plain LoRA)")
        return
    ranks = [t.shape[0] for k, t in read_adapter_tensors(adapter).items() if k.endswith("lora_A.weight")]
    hf = str(resolve_model_path(base)) if base in BUNDLED or Path(base).suffix == ".gguf" else base
    print(f"serve the PEFT folder with vLLM:  {vllm_serve_line(hf, adapter, name, max(ranks, default=cfg.r))}")
