"""Adapter directories in PEFT's exact format: adapter_config.json + adapter_model.safetensors.

Written atomically (``fsutil``) and read with safetensors only; a pickle (``adapter_model.bin``) is refused with a
hint. The tensors' keys are ``state.py``'s. These functions take the ``LoraModel`` they work on as an argument.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import AdapterFileError
from ..fsutil import read_tensors, save_json, save_tensors
from . import state
from .config import LoraConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def save_adapter(lora_model, directory: Path, name: str) -> None:
    """Write adapter ``name`` of ``lora_model`` (a LoraModel) to ``directory`` in PEFT's format."""
    cfg = lora_model.peft_config[name]
    base = getattr(getattr(lora_model.model, "config", None), "_name_or_path", None)
    d = cfg.to_dict()
    d["base_model_name_or_path"] = cfg.base_model_name_or_path or base or None
    try:
        save_tensors(state.adapter_tensors(lora_model.model, cfg, name), directory / WEIGHTS_NAME,
                     metadata={"format": "pt"})
        save_json(d, directory / CONFIG_NAME)
    except OSError as e:
        raise AdapterFileError(f"cannot write the adapter to {directory}: {e.strerror or e}; choose a writable "
                               "directory (not an existing file)") from None


def check_adapter_dir(directory: Path) -> None:
    """A one-line AdapterFileError unless ``directory`` holds both of PEFT's adapter files."""
    if directory.is_file():
        raise AdapterFileError(f"adapter path {directory} is a file; pass the folder that holds {CONFIG_NAME} and "
                               f"{WEIGHTS_NAME}" + (" (its parent)" if directory.name in (CONFIG_NAME, WEIGHTS_NAME)
                                                    else ""))
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
    """The LoraConfig of the adapter in ``directory``."""
    directory = Path(directory)
    check_adapter_dir(directory)
    return LoraConfig.from_json(directory / CONFIG_NAME)


def read_adapter_tensors(directory: str | Path) -> dict:
    """The adapter's tensors under PEFT's keys, as the file holds them."""
    directory = Path(directory)
    check_adapter_dir(directory)
    return read_tensors(directory / WEIGHTS_NAME)


def load_adapter_weights(lora_model, directory: str | Path, name: str) -> None:
    """Copy the file's tensors into adapter ``name`` of ``lora_model`` (already injected), checking every key and
    shape."""
    found = read_adapter_tensors(directory)
    state.load_adapter_state(lora_model.model, lora_model.peft_config[name], name, found, str(directory))
