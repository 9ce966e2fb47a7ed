"""Fused RMSNorm and SwiGLU for the frozen blocks between a Llama-family model's LoRA layers.

A LoRA step on a frozen model spends about an eighth of its time outside the matmuls and attention (SmolLM2-135M,
4×128 tokens, CPU), much of it in the two blocks every Llama-family layer has around its linears: RMSNorm (twice
per layer) and the SwiGLU gate of the MLP. torch runs each as 5–10 elementwise ops, each a pass over the whole
tensor, and autograd saves their intermediates; the compiled kernel (``blocks_kernel.c``, built and cached like the
dropout kernel by ``native.py``) does each forward and each backward in one pass and saves only the inputs. The
same idea as Unsloth's fused kernels, on CPU.

``install(model)`` gives the known module types (a registry keyed by type, below) a fused ``forward`` on the
instance; state-dict keys and module types are unchanged, and ``uninstall`` removes them (``LoraModel`` installs on
wrap and uninstalls on unload/merge_and_unload). A fused forward takes the kernel only where it applies (float32 on
CPU, a frozen norm weight, the kernel built, ``LORATUNE_FUSED``) and otherwise runs the module's own forward,
so results never depend on whether it applied beyond float32 rounding: tests/test_blocks.py checks both against
float64 references.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import settings
from .cpu.build import Kernel


def _declare(lib: ctypes.CDLL) -> None:
    ptr, n, th = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.lt_rms_norm_fwd.argtypes = [ptr, ptr, ptr, ptr, n, n, ctypes.c_float, th]
    lib.lt_rms_norm_bwd.argtypes = [ptr, ptr, ptr, ptr, ptr, n, n, th]
    lib.lt_swiglu_fwd.argtypes = [ptr, ptr, ptr, n, th]
    lib.lt_swiglu_bwd.argtypes = [ptr, ptr, ptr, ptr, ptr, n, th]
    for fn in (lib.lt_rms_norm_fwd, lib.lt_rms_norm_bwd, lib.lt_swiglu_fwd, lib.lt_swiglu_bwd):
        fn.restype = None


LIBRARY = Kernel(Path(__file__).parent / "cpu" / "blocks_kernel.c", _declare,
                 without="with RMSNorm and SwiGLU as torch ops")


def _kernel_applies(*tensors: torch.Tensor) -> bool:
    """Whether the kernel is built and applies to these tensors (float32 on CPU), with the fast path on (the ops
    below then call ``LIBRARY.lib``)."""
    if not settings.get().fused or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    return LIBRARY.get() is not None


# --- RMSNorm -----------------------------------------------------------------------------------------------------
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight ⊙ x / sqrt(mean(x²) + eps) over the last dimension, in torch ops (as transformers' LlamaRMSNorm)."""
    xf = x.to(torch.float32)
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# The kernel's four entry points. Each is also a torch custom op (below) with a fake (shape-only) implementation and
# an autograd formula, so that torch.compile and meta-device tracing see one op where the kernel runs. Eager calls
# take a plain autograd.Function instead: the dispatcher's custom-op path made the whole training step 1.047× as
# long (in-process A/B, all-linear r16 dropout 0.05, 12 interleaved steps on the Zen 5 VM).
def _rms_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight ⊙ x / rms(x), 1 / rms(x) per row) for a float32 CPU x."""
    x = x.contiguous()
    d = x.shape[-1]
    y, r = torch.empty_like(x), x.new_empty(x.numel() // d)  # y: x.shape; r: (rows,)
    LIBRARY.lib.lt_rms_norm_fwd(x.data_ptr(), weight.data_ptr(), y.data_ptr(), r.data_ptr(), r.numel(), d, eps,
                                LIBRARY.threads())
    return y, r


def _rms_bwd(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x's gradient of RMSNorm with a frozen weight, from x and the per-row 1/rms."""
    g, x = g.contiguous(), x.contiguous()
    gx = torch.empty_like(x)
    LIBRARY.lib.lt_rms_norm_bwd(g.data_ptr(), x.data_ptr(), weight.data_ptr(), r.data_ptr(), gx.data_ptr(), r.numel(),
                                x.shape[-1], LIBRARY.threads())
    return gx


def _swiglu_fwd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) ⊙ b for float32 CPU tensors of one shape, in one pass."""
    a, b = a.contiguous(), b.contiguous()
    h = torch.empty_like(a)
    LIBRARY.lib.lt_swiglu_fwd(a.data_ptr(), b.data_ptr(), h.data_ptr(), a.numel(), LIBRARY.threads())
    return h


def _swiglu_bwd(gh: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of a and b of silu(a) ⊙ b, in one pass."""
    gh, a, b = gh.contiguous(), a.contiguous(), b.contiguous()
    ga, gb = torch.empty_like(a), torch.empty_like(b)
    LIBRARY.lib.lt_swiglu_bwd(gh.data_ptr(), a.data_ptr(), b.data_ptr(), ga.data_ptr(), gb.data_ptr(), a.numel(),
                              LIBRARY.threads())
    return ga, gb


class _RMSNorm(torch.autograd.Function):
    """RMSNorm with a frozen weight, eagerly: saves x and one scalar per row; the backward is x's gradient only."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, r = _rms_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx, g):
        return _rms_bwd(g, *ctx.saved_tensors), None, None


class _SwiGLU(torch.autograd.Function):
    """silu(a) ⊙ b, eagerly: saves a and b (torch's ops also save silu(a)); one pass each way."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return _swiglu_fwd(a, b)

    @staticmethod
    def backward(ctx, gh):
        return _swiglu_bwd(gh, *ctx.saved_tensors)


_rms_norm_op = torch.library.custom_op("loratune::rms_norm", _rms_fwd, mutates_args=())
_rms_norm_backward_op = torch.library.custom_op("loratune::rms_norm_backward", _rms_bwd, mutates_args=())
_swiglu_op = torch.library.custom_op("loratune::swiglu", _swiglu_fwd, mutates_args=())
_swiglu_backward_op = torch.library.custom_op("loratune::swiglu_backward", _swiglu_bwd, mutates_args=())


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.numel() // x.shape[-1])


@_rms_norm_backward_op.register_fake
def _(g, x, weight, r):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_swiglu_op.register_fake
def _(a, b):
    return torch.empty_like(a, memory_format=torch.contiguous_format)


@_swiglu_backward_op.register_fake
def _(gh, a, b):
    contiguous = torch.contiguous_format
    return torch.empty_like(a, memory_format=contiguous), torch.empty_like(b, memory_format=contiguous)


def _rms_norm_setup(ctx, inputs, output) -> None:
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _swiglu_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


_rms_norm_op.register_autograd(lambda ctx, g, _: (_rms_norm_backward_op(g, *ctx.saved_tensors), None, None),
                               setup_context=_rms_norm_setup)
_swiglu_op.register_autograd(lambda ctx, gh: _swiglu_backward_op(gh, *ctx.saved_tensors), setup_context=_swiglu_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x's last dimension: the fused kernel where it applies (weight frozen and contiguous), else
    ``rms_norm_reference``."""
    if (not _kernel_applies(x, weight) or weight.requires_grad or weight.dim() != 1 or not weight.is_contiguous()
            or x.numel() == 0):
        return rms_norm_reference(x, weight, eps)
    if torch.compiler.is_compiling():
        return _rms_norm_op(x, weight, float(eps))[0]
    return _RMSNorm.apply(x, weight, float(eps))


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) ⊙ b: the fused kernel where it applies (same shapes), else torch's ops."""
    if not _kernel_applies(a, b) or a.shape != b.shape:
        return F.silu(a) * b
    return _swiglu_op(a, b) if torch.compiler.is_compiling() else _SwiGLU.apply(a, b)


# --- modules -----------------------------------------------------------------------------------------------------
def _norm_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return rms_norm(x, module.weight, module.variance_epsilon)


def _mlp_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module.down_proj(swiglu(module.gate_proj(x), module.up_proj(x)))


def _silu_mlp(module: nn.Module) -> bool:
    """Whether a gate/up/down MLP's activation is SiLU (Llama's, Qwen2's, Mistral's default; not always)."""
    from transformers.activations import SiLUActivation

    return isinstance(getattr(module, "act_fn", None), (nn.SiLU, SiLUActivation))


# transformers model families whose <Prefix>RMSNorm and <Prefix>MLP are Llama's (tests/test_blocks.py checks each
# against the installed transformers).
_FAMILIES = (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"),
             ("smollm3", "SmolLM3"))


@functools.cache
def registry() -> dict[type, tuple[Callable, Callable[[nn.Module], bool]]]:
    """Module type → (fused forward, whether an instance qualifies). These types' forwards are exactly
    ``rms_norm_reference`` and ``down(act(gate(x)) ⊙ up(x))`` in the transformers versions loratune supports."""
    import importlib

    def always(module: nn.Module) -> bool:
        return True

    out: dict[type, tuple[Callable, Callable[[nn.Module], bool]]] = {}
    for family, prefix in _FAMILIES:
        mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        out[getattr(mod, f"{prefix}RMSNorm")] = (_norm_forward, always)
        out[getattr(mod, f"{prefix}MLP")] = (_mlp_forward, _silu_mlp)
    return out


_MARK = "_loratune_fused_forward"


def install(model: nn.Module) -> int:
    """Give every module of a registered type a fused forward (an instance attribute); returns how many. Modules
    whose forward something else already replaced (accelerate's hooks, say) are left alone."""
    known, count = registry(), 0
    for module in model.modules():
        entry = known.get(type(module))
        if entry is None or "forward" in module.__dict__ or not entry[1](module):
            continue
        module.forward = entry[0].__get__(module)
        setattr(module, _MARK, True)
        count += 1
    return count


def uninstall(model: nn.Module) -> None:
    """Remove what ``install`` added: the modules run their own forward again."""
    for module in model.modules():
        if module.__dict__.pop(_MARK, False):
            module.__dict__.pop("forward", None)
