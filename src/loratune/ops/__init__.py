"""The only place in loratune that knows about kernels: callers see this small interface.

* ``lora_linear(x, W, b, A, B, s, p, training)``: one LoRA linear's output, fused (``linear.py``), and
  ``plan(...)`` / ``unfused_reason(...)``: which path such a product takes, and why;
* ``accelerate(model)`` / ``restore(model)``: fused RMSNorm and SwiGLU forwards for the frozen blocks of Llama-family
  models (``blocks.py``), and their removal;
* ``causal_lm_loss`` / ``chunked_causal_lm_loss``: the causal-LM loss without the full logits (``losses.py``);
* ``clear_mask_cache()`` / ``release_workspace()``: let go of what the fast paths keep between calls;
* ``load_kernels()``: build or load the C kernels now (before ``torch.compile`` traces the fused paths).

Inside ``torch.compile`` the fused LoRA linear runs as custom ops (``traced.py``), traced without a graph break.

Matrix-library routing (``gemm.py``) and seeded dropout (``dropout.py``) sit underneath; the C kernels and their
builder are in ``cpu/``. Which paths are on is ``loratune.settings`` (``fused``, ``onednn``, ``native``).
"""

from .blocks import install as accelerate
from .blocks import uninstall as restore
from .linear import Plan, clear_mask_cache, is_enabled, lora_linear, plan, unfused_reason
from .losses import IGNORE_INDEX, causal_lm_loss, chunked_causal_lm_loss, release_workspace, split_lm
from .traced import load_kernels

__all__ = [
    "IGNORE_INDEX", "Plan", "accelerate", "causal_lm_loss", "chunked_causal_lm_loss", "clear_mask_cache",
    "is_enabled", "load_kernels", "lora_linear", "plan", "release_workspace", "restore", "split_lm", "unfused_reason",
]
