"""GGUF for llama.cpp (and Ollama, LM Studio): a LoRA adapter file that llama.cpp loads beside its base GGUF.

Written with the ``gguf`` package's writer alone (no llama.cpp checkout, no compiler). The rules followed are
llama.cpp's own, from ``src/llama-adapter.cpp`` and ``convert_lora_to_gguf.py``:

- metadata ``general.type = adapter``, ``general.architecture`` = the base's, ``adapter.type = lora`` and
  ``adapter.lora.alpha`` (float32);
- tensors ``<base tensor>.lora_a`` / ``.lora_b``, e.g. ``blk.0.attn_q.weight.lora_a``, named by the ``gguf``
  package's tensor name map, which is the one llama.cpp's converters use;
- torch's A (r, in) and B (out, r) stored as they are, so that in GGUF order ``a.ne = [in, r]`` and
  ``b.ne = [r, out]``: the loader checks ``base.ne[0] == a.ne[0]``, ``base.ne[1] == b.ne[1]``, ``a.ne[1] == b.ne[0]``;
- llama.cpp's converter permutes the rows of Llama's q and k weights (``LlamaModel.permute``, for its rotary
  layout), so B of those modules gets the same row permutation (ΔW' = P·B·A);
- llama.cpp scales every pair by ``alpha / rank`` with one alpha for the file and the rank read from B. Each
  module's exact PEFT scale (rsLoRA's alpha/√r, ``rank_pattern``, ``alpha_pattern``) is therefore folded into B:
  B' = B · s_m · r_m / alpha, which llama.cpp then multiplies by alpha / r_m, giving s_m. For a plain adapter the
  factor is 1 and B is written unchanged.

The adapter carries LoRA pairs only: modules_to_save, trained biases and embedding adapters are refused with a
pointer to ``--format gguf`` (the merged model, ``gguf_model.py``), which carries everything.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import settings
from ..adapters import functional as LF
from ..adapters.files import read_adapter_config, read_adapter_tensors
from ..adapters.state import PREFIX
from ..adapters.targets import pattern_value
from ..adapters.variants import init_kind
from ..errors import LoraTuneError
from ..fsutil import atomic_write
from ..models import BUNDLED, package_dir

# HF model_type -> llama.cpp architecture, for those whose names and q/k permutation this module knows.
ARCHS = {"llama": "llama", "mistral": "llama"}
PERMUTED = {"llama"}  # llama.cpp architectures whose converter permutes q/k rows (LlamaModel.undo_permute)
ADAPTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_BASE = "smollm2-135m-instruct"


class ExportError(LoraTuneError, ValueError):
    """An adapter or base model that an export format cannot carry, or an output that cannot be written."""


@dataclass(frozen=True)
class BaseInfo:
    """What an export needs to know of the base model: its llama.cpp architecture, head counts (for the q/k
    permutation), layers (for the name map), whether the output head is tied to the embeddings, the GGUF file it
    came from (None for an HF directory) and its tensors' torch shapes (out, in) by GGUF name, where known."""

    arch: str
    n_layers: int
    n_head: int
    n_head_kv: int
    tied: bool
    gguf: Path | None = None
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def base_gguf_file(name_or_path: str | Path) -> Path | None:
    """The GGUF file a base model comes from: a bundled GGUF model's file, a ``.gguf`` path, or the bundled file
    behind loratune's cached HF copy of it (what an adapter trained from Python records as its base); else None."""
    key = str(name_or_path)
    if key in BUNDLED:
        b = BUNDLED[key]
        return package_dir(b) / b.subpath if b.subpath.endswith(".gguf") else None
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path.resolve()
    if path.parent == settings.cache_dir():  # models._cached_gguf names its copies <bundled name>-<file size>
        for name, b in BUNDLED.items():
            if path.name.startswith(name + "-") and b.subpath.endswith(".gguf"):
                src = package_dir(b) / b.subpath
                if src.is_file() and path.name == f"{name}-{src.stat().st_size}":
                    return src
    return None


def _supported() -> str:
    return ", ".join(f"{hf} (llama.cpp '{cpp}')" for hf, cpp in ARCHS.items())


def describe_base(name_or_path: str | Path) -> BaseInfo:
    """``BaseInfo`` of a bundled model, a ``.gguf`` file (read from its metadata, nothing converted) or an HF model
    directory (its config.json); an architecture this module cannot export is an ExportError naming those it can."""
    gguf_path = base_gguf_file(name_or_path)
    if gguf_path is not None:
        return _describe_gguf(gguf_path)
    from ..models import resolve_model_path

    cfg_path = resolve_model_path(name_or_path) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read {cfg_path} ({e}); pass a complete HF model directory as --model") from None
    model_type = cfg.get("model_type")
    if model_type not in ARCHS:
        raise ExportError(f"the base model {name_or_path} is a {model_type!r} model, which the GGUF export does not "
                          f"support; supported architectures: {_supported()}")
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    hidden, ffn = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    layers = int(cfg["num_hidden_layers"])
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (int(cfg["vocab_size"]), hidden)}
    tied = bool(cfg.get("tie_word_embeddings", False))
    if not tied:
        shapes["output.weight"] = (int(cfg["vocab_size"]), hidden)
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_q.weight": (heads * head_dim, hidden),
                       f"blk.{i}.attn_k.weight": (kv * head_dim, hidden),
                       f"blk.{i}.attn_v.weight": (kv * head_dim, hidden),
                       f"blk.{i}.attn_output.weight": (hidden, heads * head_dim),
                       f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                       f"blk.{i}.ffn_down.weight": (hidden, ffn)})
    return BaseInfo(ARCHS[model_type], layers, heads, kv, tied, None, shapes)


def _describe_gguf(path: Path) -> BaseInfo:
    reader = read_gguf(path)
    arch = field_value(reader, "general.architecture")
    if arch not in set(ARCHS.values()):
        raise ExportError(f"the base GGUF {path} has architecture {arch!r}, which the GGUF export does not support; "
                          f"supported architectures: {_supported()}")
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    heads = int(field_value(reader, f"{arch}.attention.head_count"))
    kv = int(field_value(reader, f"{arch}.attention.head_count_kv", heads))
    return BaseInfo(arch, int(field_value(reader, f"{arch}.block_count")), heads, kv, "output.weight" not in shapes,
                    path, shapes)


def read_gguf(path: Path):
    """A ``gguf.GGUFReader`` over ``path`` (memory-mapped, read-only); a file that is not GGUF is an ExportError.
    Parsing a tokenizer's 100k metadata strings takes seconds, so the last few readers are kept (by path, size and
    modification time)."""
    path = Path(path).resolve()
    try:
        st = path.stat()
    except OSError as e:
        raise ExportError(f"cannot read {path} ({e.strerror or e}); pass the base model's .gguf file") from None
    return _reader(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _reader(path: str, size: int, mtime_ns: int):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read {path} as GGUF ({e}); pass the base model's .gguf file") from None


def field_value(reader, key: str, default=None):
    """The value of metadata ``key`` of a GGUFReader (``default`` where absent)."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def permute_rows(w: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's row order for a Llama q (``n_head_kv=None``) or k weight, or a B factor: within each head, the
    interleaved rotary halves; the same reshape and swap as its converter's ``LlamaModel.permute``."""
    heads = n_head_kv if n_head_kv is not None and n_head_kv != n_head else n_head
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@functools.lru_cache(maxsize=8)
def _name_map(arch_name: str, n_layers: int):
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    return gguf.get_tensor_name_map(arch, n_layers)


def gguf_tensor_name(module: str, info: BaseInfo) -> str | None:
    """llama.cpp's name (``blk.0.attn_q.weight``) for HF module path ``module`` (``model.layers.0.self_attn.q_proj``),
    from the ``gguf`` package's tensor name map; None where llama.cpp has none."""
    name = _name_map(info.arch, info.n_layers).get_name(module)
    return None if name is None else name + ".weight"


def permuted(name: str, t: torch.Tensor, info: BaseInfo) -> torch.Tensor:
    """``t`` (a weight, bias or B factor of GGUF tensor ``name``) with llama.cpp's q/k row order applied."""
    if info.arch not in PERMUTED:
        return t
    if ".attn_q." in name:
        return permute_rows(t, info.n_head)
    if ".attn_k." in name:
        return permute_rows(t, info.n_head, info.n_head_kv)
    return t


@dataclass
class AdapterExport:
    """What ``export_adapter`` wrote: the file, the alpha it records, the pairs (GGUF base-tensor names), the
    largest rank, and the modules whose B carries a folded scale factor other than 1 (name -> factor)."""

    path: Path
    alpha: float
    tensors: list[str]
    max_rank: int
    folded: dict[str, float]


def adapter_pairs(adapter_dir: str | Path, info: BaseInfo) -> tuple[float, list[tuple[str, torch.Tensor, torch.Tensor]],
                                                                      dict[str, float]]:
    """(alpha, [(GGUF tensor name, A (r, in), B' (out, r)) ...], folded factors) for the adapter in
    ``adapter_dir`` on ``info``'s base: names mapped, B permuted and carrying each module's exact scale. Anything
    llama.cpp's adapter format cannot carry is an ExportError naming it and the way out."""
    cfg = read_adapter_config(adapter_dir)
    tensors = read_adapter_tensors(adapter_dir)
    merged_hint = "use --format gguf (the merged model carries everything)"
    if getattr(cfg, "use_adalora", False) or getattr(cfg, "use_dora", False):
        kind = "AdaLoRA (its singular values lora_E)" if getattr(cfg, "use_adalora", False) else \
            "DoRA (its magnitude vector)"
        raise ExportError(f"the adapter in {adapter_dir} is {kind}, which a llama.cpp LoRA adapter cannot carry "
                          f"(only pairs A, B); {merged_hint}")
    if init_kind(cfg.init_lora_weights):
        raise ExportError(f"the adapter in {adapter_dir} was initialized with {cfg.init_lora_weights} and applies to "
                          "the residual base its init left, not to the original model llama.cpp loads; save it with "
                          f"save_pretrained(dir, convert_to_lora=True) first, or {merged_hint}")
    if cfg.modules_to_save:
        raise ExportError(f"the adapter in {adapter_dir} trains modules_to_save ({', '.join(cfg.modules_to_save)}), "
                          f"which a llama.cpp LoRA adapter cannot carry (only LoRA pairs); {merged_hint}")
    alpha = float(np.float32(cfg.lora_alpha))  # what llama.cpp reads back (a float32)
    pairs, folded = [], {}
    for key in sorted(tensors):
        if not key.startswith(PREFIX):
            raise ExportError(f"adapter tensor {key!r} in {adapter_dir} does not start with {PREFIX!r}; re-save the "
                              "adapter with loratune or PEFT")
        if key.endswith(".lora_B.weight") or key.endswith(".lora_embedding_B"):
            continue
        if key.endswith(".lora_embedding_A"):
            module = key[len(PREFIX):-len(".lora_embedding_A")]
            raise ExportError(f"the adapter in {adapter_dir} adapts the embedding {module!r}, which this GGUF adapter "
                              f"export does not carry; {merged_hint}")
        if not key.endswith(".lora_A.weight"):
            what = "a trained bias" if key.endswith(".bias") else "a tensor that is not a LoRA factor"
            raise ExportError(f"the adapter in {adapter_dir} holds {what} ({key[len(PREFIX):]}), which a llama.cpp "
                              "LoRA "
                              f"adapter cannot carry; {merged_hint}")
        module = key[len(PREFIX):-len(".lora_A.weight")]
        a, b = tensors[key], tensors.get(f"{PREFIX}{module}.lora_B.weight")
        if b is None:
            raise ExportError(f"the adapter in {adapter_dir} has lora_A but no lora_B for {module!r}; re-save it")
        if a.dim() != 2 or cfg.fan_in_fan_out:
            raise ExportError(f"module {module!r} is not a Linear layer (a convolution or GPT-2 Conv1D), which "
                              f"llama.cpp adapters do not cover; supported architectures: {_supported()}")
        name = gguf_tensor_name(module, info)
        if name is None:
            raise ExportError(f"module {module!r} has no llama.cpp tensor name in the {info.arch!r} architecture; "
                              "target only its attention and MLP projections (q_proj, k_proj, v_proj, o_proj, "
                              f"gate_proj, up_proj, down_proj), or {merged_hint}")
        if name == "output.weight" and info.tied:
            raise ExportError(f"the adapter adapts {module!r}, but this base ties its output head to the embeddings, "
                              f"so llama.cpp's base has no 'output' tensor to adapt; {merged_hint}")
        want = info.shapes.get(name)
        if want is not None and (a.shape[1] != want[1] or b.shape[0] != want[0]):
            raise ExportError(f"module {module!r} has A {tuple(a.shape)} and B {tuple(b.shape)}, but the base's "
                              f"{name} is {want} (out, in); the adapter was made for another base model (pass it "
                              "as --model)")
        r = a.shape[0]
        scale = LF.lora_scaling(pattern_value(cfg.alpha_pattern, module, cfg.lora_alpha), r, cfg.use_rslora)
        factor = scale * r / alpha if alpha else scale  # llama.cpp: alpha 0 means scale 1, not alpha / r
        b64 = b.to(torch.float64)
        if abs(factor - 1.0) > 1e-12:
            b64 = b64 * factor
            folded[name] = factor
        pairs.append((name, a.to(torch.float64), permuted(name, b64, info)))
    if not pairs:
        raise ExportError(f"the adapter in {adapter_dir} holds no LoRA pairs; there is nothing to export")
    return alpha, pairs, folded


def check_out_file(out: str | Path, overwrite: bool = False) -> Path:
    """``out`` as a Path, or an ExportError: its folder must exist, and it must not be a directory or (without
    ``overwrite``) an existing file."""
    out = Path(out)
    if not out.parent.is_dir():
        raise ExportError(f"--out {out}: the folder {out.parent} does not exist; create it first or give a path "
                          "in an existing folder")
    if out.is_dir():
        raise ExportError(f"--out {out} is a directory; give a file name such as {out / 'adapter.gguf'}")
    if out.exists() and not overwrite:
        raise ExportError(f"--out {out} exists; pass --overwrite to replace it, or choose another name")
    return out


def encode(t: torch.Tensor, outtype: str):
    """(numpy data, raw GGML type or None) of a 2-D float tensor in ``outtype`` (f32 | f16 | bf16 | q8_0 and the
    other types the ``gguf`` package can quantize). A quantized type needs rows that are whole blocks; a tensor
    whose rows are not gets f16, as llama.cpp's converters do."""
    import gguf

    arr = t.detach().to(torch.float32).cpu().numpy()
    if outtype == "f32":
        return np.ascontiguousarray(arr), None
    if outtype == "f16":
        return arr.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType[outtype.upper()]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if arr.shape[-1] % block != 0:
        return arr.astype(np.float16), None
    try:
        return gguf.quants.quantize(arr, qtype), qtype
    except NotImplementedError:
        raise ExportError(f"the gguf package cannot write {outtype} tensors; use --outtype q8_0, f16, bf16 or "
                          "f32") from None


def export_adapter(adapter_dir: str | Path, out: str | Path, base: str | Path | None = None,
                   outtype: str = "f32", overwrite: bool = False) -> AdapterExport:
    """Write the PEFT-format adapter in ``adapter_dir`` as a llama.cpp LoRA adapter GGUF ``out`` (atomically).

    ``base`` is the base model (bundled name, .gguf file or HF directory; default: the adapter's
    ``base_model_name_or_path``), used for the architecture, names, q/k permutation and shape checks. llama.cpp
    applies the file to the base GGUF with ``--lora FILE`` (llama-cpp-python: ``Llama(base, lora_path=FILE)``)."""
    import gguf

    if outtype not in ADAPTER_OUTTYPES:
        raise ExportError(f"--outtype {outtype!r} is not a GGUF adapter type; use one of {', '.join(ADAPTER_OUTTYPES)}")
    out = check_out_file(out, overwrite)
    cfg = read_adapter_config(adapter_dir)
    info = describe_base(base or cfg.base_model_name_or_path or DEFAULT_BASE)
    alpha, pairs, folded = adapter_pairs(adapter_dir, info)

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, info.arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_name(Path(adapter_dir).resolve().name)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, a, b in pairs:
            for suffix, t in ((".lora_a", a), (".lora_b", b)):
                data, raw = encode(t, outtype)
                w.add_tensor(name + suffix, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(out, write)
    return AdapterExport(out, alpha, [n for n, _, _ in pairs], max(a.shape[0] for _, a, _ in pairs), folded)
