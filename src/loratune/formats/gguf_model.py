"""A merged model (base + adapter) as one full GGUF file for llama.cpp, Ollama and LM Studio.

The base's metadata (architecture hyper-parameters, the tokenizer: vocabulary, merges, special tokens) is copied
from the GGUF file the base came from, so llama.cpp tokenizes exactly as it does for the base; the chat template is
the adapter's (the one it was trained with) where the adapter directory carries one, else the base's. The weights
are the merged state dict (``adapters.state.merged_state_dict``: W + s·B·A in float64), renamed with the ``gguf``
package's tensor name map, q/k rows permuted as llama.cpp's converter does, and written as:

- ``f32``, ``f16``, ``bf16``, ``q8_0`` (and ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``): every matrix in that type
  (one whose rows are not whole blocks in f16), norms and other vectors in f32, as llama.cpp's converter does;
- ``base``: each tensor in the type the base file holds it in (the bundled SmolLM2: Q4_1 matrices and a Q8_0
  embedding), where the ``gguf`` package can write that type.

A base given as an HF directory has no GGUF tokenizer to copy: pass the base's .gguf file as ``base`` instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..adapters.files import read_adapter_config, read_adapter_tensors
from ..adapters.state import merged_state_dict
from ..fsutil import atomic_write
from .gguf import (
    DEFAULT_BASE,
    BaseInfo,
    ExportError,
    check_out_file,
    describe_base,
    encode,
    field_value,
    gguf_tensor_name,
    permuted,
    read_gguf,
)

MODEL_OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "base")
# metadata the writer sets itself, or that this export sets anew
_NOT_COPIED = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version", "general.name")


def _file_type(outtype: str, base_reader) -> int:
    import gguf

    if outtype == "base":
        return int(field_value(base_reader, "general.file_type", gguf.LlamaFileType.GUESSED))
    return int({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                "bf16": gguf.LlamaFileType.MOSTLY_BF16}.get(outtype)
               or gguf.LlamaFileType[f"MOSTLY_{outtype.upper()}"])


def gguf_tensors(state: dict[str, torch.Tensor], info: BaseInfo) -> dict[str, torch.Tensor]:
    """GGUF name -> tensor for an HF (Llama-family) state dict: renamed, q/k permuted; a tied output head that
    equals the embedding is left out (llama.cpp then uses ``token_embd``), rotary caches are dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        stem, dot, suffix = key.rpartition(".")
        name = gguf_tensor_name(stem, info)
        if name is None:
            raise ExportError(f"the merged model has a tensor {key!r} that llama.cpp's {info.arch!r} architecture has "
                              "no name for; this base model cannot be exported as GGUF")
        out[name[: -len(".weight")] + dot + suffix] = permuted(name, t, info)
    head, embd = out.get("output.weight"), out.get("token_embd.weight")
    if head is not None and embd is not None and (head is embd or torch.equal(head, embd)):
        del out["output.weight"]
    return out


def _tensor_type(name: str, t: torch.Tensor, outtype: str, base_types: dict[str, str]) -> str:
    if t.dim() == 1:
        return "f32"
    if outtype != "base":
        return outtype
    kind = base_types.get(name) or base_types.get("token_embd.weight", "F16")  # an untied head: as the embedding
    return kind.lower()


def export_merged(adapter_dir: str | Path, out: str | Path, base: str | Path | None = None, outtype: str = "q8_0",
                  overwrite: bool = False, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write base + the adapter in ``adapter_dir`` merged as one GGUF model file ``out`` (atomically).

    ``base``: a bundled GGUF model's name or a .gguf file (default: the adapter's base). ``state`` may give the
    merged HF state dict already computed (else the base is loaded and the adapter merged here)."""
    import gguf

    if outtype not in MODEL_OUTTYPES:
        raise ExportError(f"--outtype {outtype!r} is not a GGUF model type; use one of {', '.join(MODEL_OUTTYPES)}")
    out = check_out_file(out, overwrite)
    cfg = read_adapter_config(adapter_dir)
    base = base or cfg.base_model_name_or_path or DEFAULT_BASE
    info = describe_base(base)
    if info.gguf is None:
        raise ExportError(f"the base {base} is an HF directory, so there is no GGUF tokenizer to copy; pass the base's "
                          ".gguf file as --model, or export with --format gguf-adapter")
    reader = read_gguf(info.gguf)
    if state is None:
        from ..models import load_base_model

        model, _ = load_base_model(base)
        state = merged_state_dict(model.state_dict(), read_adapter_tensors(adapter_dir), cfg)
    tensors = gguf_tensors(state, info)
    base_types = {t.name: t.tensor_type.name for t in reader.tensors}
    missing = [n for n in base_types if n not in tensors]
    if missing:
        raise ExportError(f"the merged model lacks {len(missing)} tensor(s) of the base GGUF, e.g. {missing[0]!r}; "
                          "the adapter's base model is not this GGUF file (pass the right one as --model)")
    template = _adapter_chat_template(Path(adapter_dir))
    name = f"{field_value(reader, 'general.name', 'model')} + {Path(adapter_dir).resolve().name}"

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, info.arch)
        for key, f in reader.fields.items():
            if key.startswith(_NOT_COPIED) or (key == "tokenizer.chat_template" and template is not None):
                continue
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, f.contents(), vtype, sub)
        w.add_name(name)
        w.add_file_type(_file_type(outtype, reader))
        if template is not None:
            w.add_chat_template(template)
        order = [t.name for t in reader.tensors] + [n for n in tensors if n not in base_types]
        quantized = False
        for tname in order:
            t = tensors[tname]
            kind = _tensor_type(tname, t, outtype, base_types)
            if t.dim() == 1 or kind == "f32":
                data, raw = np.ascontiguousarray(t.detach().to(torch.float32).numpy()), None
            else:
                data, raw = encode(t, kind)
            quantized = quantized or raw not in (None, gguf.GGMLQuantizationType.BF16)
            w.add_tensor(tname, data, raw_dtype=raw)
        if quantized:
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(out, write)
    return out


def _adapter_chat_template(adapter_dir: Path) -> str | None:
    """The chat template saved beside the adapter (tokenizer_config.json or chat_template.jinja), or None."""
    import json

    jinja = adapter_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tc = adapter_dir / "tokenizer_config.json"
    if tc.is_file():
        try:
            value = json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError):
            return None
        return value if isinstance(value, str) else None
    return None
