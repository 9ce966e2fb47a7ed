"""QLoRA's frozen base: weights in 4-bit NormalFloat (NF4) with double-quantized scales, bit-compatible with
bitsandbytes, and LoRA adapters in full precision on top (docs/qlora.md).

* ``quantize_nf4(weight)`` -> ``NF4Tensor`` (``.packed``, ``.absmax``/``.absmax2``/``.offset``, ``.nbytes``,
  ``.dequantize(dtype)``): the tensor format (``nf4.py``);
* ``NF4Linear``: a frozen Linear on an NF4 weight, whose backward dequantizes again (``linear.py``);
* ``quantize_model`` / ``dequantize_model``: every eligible Linear of a model to NF4 and back (``convert.py``),
  with ``quantization_settings`` / ``check_same_settings`` for adapter metadata.

* ``load_quantized``: a transformers model loaded straight into NF4, one linear at a time (``load.py``).
* ``forced_merge_report``: around a forced merge into 4 bits, one warning with the merged-4-bit model's measured
  output error against a full-precision merge (``merge.py``).

This package sits below ``adapters``: it imports torch, ``loratune.ops``, ``errors`` and ``settings`` (and
transformers, safetensors and accelerate inside the functions that load models).
"""

from .convert import (
    QUANTIZE_CHOICES,
    check_quantize,
    check_same_settings,
    check_skip_vs_targets,
    default_skip_modules,
    dequantize_model,
    linears_to_quantize,
    quantization_settings,
    quantize_model,
)
from .linear import COMPUTE_DTYPES, LayerMergeNote, NF4Linear, check_compute_dtype
from .load import load_quantized
from .merge import forced_merge_report
from .nf4 import BLOCKSIZES, DYNAMIC_CODE, NF4_CODE, NF4Tensor, quantize_nf4

__all__ = [
    "BLOCKSIZES", "COMPUTE_DTYPES", "DYNAMIC_CODE", "LayerMergeNote", "NF4Linear", "NF4Tensor", "NF4_CODE",
    "QUANTIZE_CHOICES", "check_compute_dtype", "check_quantize", "check_same_settings", "check_skip_vs_targets",
    "default_skip_modules", "dequantize_model", "forced_merge_report", "linears_to_quantize", "load_quantized",
    "quantization_settings", "quantize_model", "quantize_nf4",
]
