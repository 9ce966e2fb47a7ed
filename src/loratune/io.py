"""Adapter files in PEFT's exact format: adapter_config.json + adapter_model.safetensors.

Keys are ``base_model.model.<module path>.lora_A.weight`` (adapter name stripped), A shaped (r, in) and
B (out, r); embeddings use ``lora_embedding_A``/``lora_embedding_B``; modules_to_save and trained biases
appear under their plain parameter names. Files are written atomically and read with safetensors only.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import LoraConfig
from .errors import AdapterFileError
from .layers import LoraLayer

if TYPE_CHECKING:
    from .model import LoraModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def adapter_tensors(model: LoraModel, name: str) -> dict[str, torch.Tensor]:
    """PEFT file key -> the live parameter that key holds, for adapter ``name``."""
    from .model import ModulesToSave

    out: dict[str, torch.Tensor] = {}
    # Parameters inside a ModulesToSave copy: PEFT's name for them ("<path>.modules_to_save.<param>", as its
    # bias="all" writes them), or None for another adapter's copy. loratune's ".copies.<name>." is internal.
    in_copies: dict[int, str | None] = {}
    for path, module in model.model.named_modules():
        if isinstance(module, LoraLayer) and name in module.adapters:
            ad = module.adapters[name]
            key_a, key_b = module.peft_keys
            out[f"{PREFIX}{path}.{key_a}"] = ad.lora_A
            out[f"{PREFIX}{path}.{key_b}"] = ad.lora_B
        elif isinstance(module, ModulesToSave):
            for copy_name, copy_module in module.copies.items():
                for pname, p in copy_module.named_parameters():
                    in_copies[id(p)] = f"{PREFIX}{path}.modules_to_save.{pname}" if copy_name == name else None
                    if copy_name == name:
                        out[f"{PREFIX}{path}.{pname}"] = p
    bias = model.peft_config[name].bias
    if bias != "none":
        # PEFT's bias="all" file holds every bias, trainable or not (a head's frozen original_module's too).
        params = model._bias_params(bias) if bias != "all" else \
            [m.bias for m in model.model.modules() if isinstance(getattr(m, "bias", None), torch.nn.Parameter)]
        ids = {id(p) for p in params}
        for pname, p in model.model.named_parameters():
            if id(p) in ids:
                key = in_copies.get(id(p), f"{PREFIX}{pname}")
                if key is not None:
                    out[key] = p
    return out


def atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` then rename over ``path``: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read the umask is to set it and put it back
    os.umask(mask)
    return mask


def public_modes(root: Path) -> None:
    """Give a tree written under ``tempfile.mkdtemp`` (0700; some writers make 0600 files) the modes ``mkdir`` and
    ``open`` would have given it, so another user or a serving process can read what loratune wrote."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for path in Path(root).rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def save_json(obj, path: Path) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(path, write)


def save_adapter(model: LoraModel, directory: Path, name: str) -> None:
    """Write adapter ``name`` of ``model`` to ``directory`` in PEFT's format."""
    cfg = model.peft_config[name]
    base = getattr(getattr(model.model, "config", None), "_name_or_path", None)
    d = cfg.to_dict()
    d["base_model_name_or_path"] = cfg.base_model_name_or_path or base or None
    save_tensors(adapter_tensors(model, name), directory / WEIGHTS_NAME, metadata={"format": "pt"})
    save_json(d, directory / CONFIG_NAME)


def _check_dir(directory: Path) -> None:
    if not directory.is_dir():
        raise AdapterFileError(f"adapter directory {directory} does not exist; pass the folder that holds "
                               f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / n).is_file()]
    if missing:
        hint = " (only safetensors is read: convert adapter_model.bin with PEFT first)" \
            if (directory / "adapter_model.bin").exists() else ""
        raise AdapterFileError(f"adapter directory {directory} lacks {', '.join(missing)}{hint}; "
                               "save it with save_pretrained()")


def read_adapter_config(directory: str | Path) -> LoraConfig:
    directory = Path(directory)
    _check_dir(directory)
    return LoraConfig.from_json(directory / CONFIG_NAME)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a damaged one is an AdapterFileError, never a crash deep in Rust."""
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{path} is not a valid safetensors file ({e}); re-save or re-copy it") from None


def load_adapter_weights(model: LoraModel, directory: str | Path, name: str) -> None:
    """Copy the file's tensors into adapter ``name`` (already injected), checking every key and shape."""
    directory = Path(directory)
    _check_dir(directory)
    found = read_tensors(directory / WEIGHTS_NAME)
    expected = adapter_tensors(model, name)
    # PEFT also saves a targeted embedding's full table as "<path>.base_layer.weight"; it loads it too.
    extra_base = {k: v for k, v in found.items() if k not in expected and k.endswith(".base_layer.weight")}
    unknown = [k for k in found if k not in expected and k not in extra_base]
    if unknown:
        raise AdapterFileError(f"adapter in {directory} does not fit this model ({type(model.model).__name__}): "
                               f"{len(unknown)} tensor(s) name modules it lacks, e.g. '{unknown[0]}'; "
                               "was it made for another architecture?")
    missing = [k for k in expected if k not in found]
    if missing:
        raise AdapterFileError(f"adapter in {directory} lacks {len(missing)} tensor(s) this config needs, "
                               f"e.g. '{missing[0]}'; re-save the adapter")
    pairs = [*((k, expected[k]) for k in expected),
             *((k, model.model.get_parameter(k[len(PREFIX):])) for k in extra_base)]
    for key, target in pairs:  # check everything before changing anything
        if found[key].shape != target.shape:
            module = _module_of(key)
            part = key[len(PREFIX) + len(module) + 1:]
            raise AdapterFileError(f"adapter in {directory}: module '{module}' needs "
                                   f"{tuple(target.shape)} for '{part}' but the file has "
                                   f"{tuple(found[key].shape)}; the adapter was made for a different base "
                                   "model or rank")
    with torch.no_grad():
        for key, target in pairs:
            target.copy_(found[key].to(target.dtype))


def _module_of(key: str) -> str:
    path = key[len(PREFIX):]
    for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B",
                   ".base_layer.weight"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path.rsplit(".", 1)[0]
