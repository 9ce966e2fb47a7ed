"""loratune: LoRA fine-tuning for transformers models, with adapter files in PEFT's format."""

from .adapters import BASE, AdaLoraConfig, LoraConfig, LoraLayer, LoraModel, get_lora_model
from .errors import AdapterFileError, ConfigError, DataError, LoraTuneError
from .quant import NF4Linear, NF4Tensor, quantize_nf4

__version__ = "0.1.0"


def load_base_model(name_or_path: str = "smollm2-135m-instruct", **kwargs):
    """Load a base model and its tokenizer; see :func:`loratune.models.load_base_model`."""
    from .models import load_base_model as _load

    return _load(name_or_path, **kwargs)


__all__ = [
    "AdaLoraConfig", "AdapterFileError", "BASE", "ConfigError", "DataError", "LoraConfig", "LoraLayer", "LoraModel",
    "LoraTuneError", "NF4Linear", "NF4Tensor", "get_lora_model", "load_base_model", "quantize_nf4",
]
