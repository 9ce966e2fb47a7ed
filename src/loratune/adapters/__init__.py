"""LoRA itself: the config, the math, which modules to target, the layers, the model and its PEFT-format state."""

from .config import AdaLoraConfig, LoraConfig
from .layers import BASE, LoraLayer, ModulesToSave
from .model import LoraModel, get_lora_model
from .state import merged_state_dict

__all__ = ["BASE", "AdaLoraConfig", "LoraConfig", "LoraLayer", "LoraModel", "ModulesToSave", "get_lora_model",
           "merged_state_dict"]
