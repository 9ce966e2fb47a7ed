"""Adapter directories in PEFT's exact format: adapter_config.json + adapter_model.safetensors.

Written atomically (``fsutil``) and read with safetensors only; a pickle (``adapter_model.bin``) is refused with a
hint. The tensors' keys are ``state.py``'s. These functions take the ``LoraModel`` they work on as an argument.

An adapter trained on a 4-bit base (QLoRA) also gets ``loratune_quantization.json``: how the base was quantized
(``quant.quantization_settings``), so that ``eval``/``generate``/``chat``/``merge`` rebuild the same base and a base
quantized otherwise is refused, naming what differs. PEFT ignores the extra file.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from .. import quant
from ..errors import AdapterFileError, ConfigWarning
from ..fsutil import read_tensors, save_json, save_tensors
from . import state
from .config import LoraConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
QUANT_NAME = "loratune_quantization.json"
PROMPT_NAME = "loratune_prompt.json"  # what `loratune train` adds: system prompt, and the base by loratune's name


def recorded_base(directory: str | Path) -> str | None:
    """The base an adapter directory names: its ``base_model_name_or_path``, unless that is a path that no longer
    exists (an adapter copied to another machine, a cleared cache) and ``loratune train`` recorded the base's own
    name (``"base_model"`` in loratune_prompt.json, e.g. a bundled name), which is then returned instead."""
    saved = read_adapter_config(directory).base_model_name_or_path
    if saved and (Path(saved).expanduser().exists() or not Path(saved).is_absolute()):
        return saved
    try:
        meta = json.loads((Path(directory) / PROMPT_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return saved
    name = meta.get("base_model") if isinstance(meta, dict) else None
    return name if isinstance(name, str) and name else saved


def save_adapter(lora_model, directory: Path, name: str) -> None:
    """Write adapter ``name`` of ``lora_model`` (a LoraModel) to ``directory`` in PEFT's format."""
    cfg = lora_model.peft_config[name]
    base = getattr(getattr(lora_model.model, "config", None), "_name_or_path", None)
    d = cfg.to_dict()
    d["base_model_name_or_path"] = cfg.base_model_name_or_path or base or None
    try:
        save_tensors(state.file_tensors(lora_model.model, cfg, name), directory / WEIGHTS_NAME,
                     metadata={"format": "pt"})
        settings = quant.quantization_settings(lora_model.model)
        if settings is not None:
            save_json(settings, directory / QUANT_NAME)
        elif (directory / QUANT_NAME).is_file():  # an earlier save's record, from a quantized base: no longer true
            (directory / QUANT_NAME).unlink()
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


def read_quantization(directory: str | Path) -> dict | None:
    """How the base of the adapter in ``directory`` was quantized (``quant.quantization_settings``), or None: not
    quantized, or not recorded (an adapter from PEFT)."""
    path = Path(directory) / QUANT_NAME
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterFileError(f"{path} is damaged ({(str(e).splitlines() or [''])[0]}); copy the adapter again, or "
                               "delete the file if the adapter was not trained on a quantized base") from None
    if not isinstance(found, dict) or "quantize" not in found:
        raise AdapterFileError(f"{path} does not describe a quantization (no 'quantize' key); copy the adapter again")
    quant.check_quantize(found["quantize"])
    return found


def check_base_quantization(lora_model, directory: str | Path) -> None:
    """Refuse an adapter trained on a 4-bit base loaded onto a base quantized with other settings (naming them);
    warn where only one of the two is quantized (outputs then differ by the base's 4-bit rounding)."""
    recorded, current = read_quantization(directory), quant.quantization_settings(lora_model.model)
    if recorded and current:
        quant.check_same_settings(recorded, current, str(directory))
    elif recorded:
        warnings.warn(f"the adapter in {directory} was trained on a 4-bit base ({QUANT_NAME}) and is loaded onto a "
                      "full-precision one: its outputs differ slightly from training's (load the base with "
                      "quantize='nf4' and the recorded settings to match them)", ConfigWarning, stacklevel=4)
    elif current:
        warnings.warn(f"the adapter in {directory} was trained on a full-precision base and is loaded onto a 4-bit "
                      "one: its outputs differ by the base's 4-bit rounding", ConfigWarning, stacklevel=4)


def load_adapter_weights(lora_model, directory: str | Path, name: str) -> None:
    """Copy the file's tensors into adapter ``name`` of ``lora_model`` (already injected), checking every key and
    shape, and that the base is quantized as the adapter's was (``check_base_quantization``)."""
    check_base_quantization(lora_model, directory)
    found = read_adapter_tensors(directory)
    state.load_adapter_state(lora_model.model, lora_model.peft_config[name], name, found, str(directory),
                             saved=read_adapter_config(directory))  # (AdaLoRA: its rank_pattern)
