"""Initializations that move part of the base weight into the adapter: PiSSA, OLoRA and LoftQ.

Each writes A and B from the base weight W (out, in) and leaves the rest in the base, so the model's output is
unchanged at step 0 (LoftQ: up to its quantization error):

* ``pissa`` (Meng et al. 2024): the r principal singular triplets, A = √(S_r/s)·V_rᵀ, B = U_r·√(S_r/s), base
  W − s·B·A; ``pissa_niter_K``: the same from ``torch.svd_lowrank`` with K subspace iterations (Halko et al.),
  drawn from a fixed seed so that the same base gives the same split again (loading re-runs it);
* ``olora`` (Büyükakyüz 2024): W = QR, B = Q[:, :r], A = R[:r], base W − s·B·A (PEFT's definition: unscaled);
* ``loftq`` (Li et al. 2023): alternately Q = NF4(W − s·B·A) (``loratune.quant.quantize_nf4``) and A, B from the
  rank-r SVD of W − Q scaled by 1/s, ``loftq_iter`` times; the base becomes Q (its dequantized values: storing them
  in NF4 again, ``quant.quantize_model``, changes nothing without double quantization and about 2e-6 relative with
  it, the scales' 8-bit code). PEFT leaves s out (Q + L·R ≈ W, so its model starts at
  Q + s·L·R); here Q + s·B·A ≈ W, the paper's objective, for any lora_alpha.

The factors at init stay on the adapter (``initial_lora_A``/``initial_lora_B``, buffers left out of state dicts)
for ``convert_to_lora``: a trained adapter then applies to the *original* base as plain LoRA of rank 2r,
A' = [A; A0], B' = [B, −B0] (ΔW = s·(B·A − B0·A0)), with r and lora_alpha doubled (α·√2 with rsLoRA) so s stays,
which is what PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes. LoftQ's change of the
base (rounding) is not low-rank, so a LoftQ adapter is not converted: it applies to its quantized base.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...errors import ConfigError, LoraTuneError
from ..config import LoraConfig

MUTATING = ("pissa", "olora", "loftq")  # init_lora_weights values (and pissa_niter_K) that change the base
CONVERTIBLE = ("pissa", "olora")
NITER_SEED = 0  # the seed of pissa_niter_K's random subspace (a fixed one: loading must re-derive the same split)
NF4_BLOCKSIZE = 64  # loratune.quant's default block size, so that quantize_model stores LoftQ's base again


def init_kind(init: bool | str) -> str | None:
    """"pissa" (also for pissa_niter_K), "olora", "loftq", or None for inits that leave the base alone."""
    if isinstance(init, str):
        kind = "pissa" if init.startswith("pissa") else init
        return kind if kind in MUTATING else None
    return None


# --- the math, on plain tensors ------------------------------------------------------------------------------------
def pissa_factors(weight: torch.Tensor, r: int, scaling: float, niter: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's (A (r, in), B (out, r)) for ``weight`` (out, in), fp32: W ≈ s·B·A on the top r singular values."""
    w = weight.detach().to(torch.float32)
    if niter is None:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
            torch.manual_seed(NITER_SEED)
            U, S, V = torch.svd_lowrank(w, q=r, niter=niter)
        Vh = V.t()
    root = torch.sqrt(S / scaling)
    return (root[:, None] * Vh).contiguous(), (U * root[None, :]).contiguous()


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA's (A, B): the first r rows of R and columns of Q of W = QR."""
    Q, R = torch.linalg.qr(weight.detach().to(torch.float32))
    return R[:r].contiguous(), Q[:, :r].contiguous()


def loftq_factors(weight: torch.Tensor, r: int, scaling: float, iters: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ's (Q dequantized, A, B) for ``weight`` (out, in), all fp32: Q + s·B·A ≈ W."""
    from ... import quant  # (quant sits below adapters; imported here, where it is used)

    w = weight.detach().to(torch.float32)
    A = torch.zeros(r, w.shape[1])
    B = torch.zeros(w.shape[0], r)
    for _ in range(iters):
        q = quant.quantize_nf4(w - scaling * (B @ A), NF4_BLOCKSIZE).dequantize(torch.float32)
        A, B = _split_svd(w - q, r, scaling)
    return q, A, B


def _split_svd(m: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    root = torch.sqrt(S[:r] / scaling)
    return (root[:, None] * Vh[:r]).contiguous(), (U[:, :r] * root[None, :]).contiguous()


def factors_for(init: str, weight: torch.Tensor, r: int, scaling: float, loftq_iter: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the base weight left behind, A, B) of ``init`` for ``weight`` (out, in), all fp32."""
    kind = init_kind(init)
    if kind == "pissa":
        A, B = pissa_factors(weight, r, scaling, None if init == "pissa" else int(init.rsplit("_", 1)[1]))
    elif kind == "olora":
        A, B = olora_factors(weight, r)
    elif kind == "loftq":
        return loftq_factors(weight, r, scaling, loftq_iter)
    else:
        raise ConfigError(f"init_lora_weights={init!r} does not change the base weight")
    return weight.detach().to(torch.float32) - scaling * (B @ A), A, B


# --- on a layer ----------------------------------------------------------------------------------------------------
class WeightInit:
    """A ``Variant.initializer`` for one of ``MUTATING``: sets A and B, leaves the residual in the base."""

    def __init__(self, name: str, loftq_iter: int = 1):
        self.name, self.loftq_iter = name, loftq_iter

    def check(self, path: str, module: nn.Module) -> str | None:
        if hasattr(module, "dense_weight"):
            fix = "load the base without quantize: LoftQ quantizes it to NF4 itself" if self.name == "loftq" else \
                "initialize on the full-precision base, then quantize it (quant.quantize_model)"
            return f"init_lora_weights={self.name} needs the full-precision weight of '{path}', a 4-bit layer; {fix}"
        if not isinstance(module, (nn.Linear, Conv1D)):
            return (f"init_lora_weights={self.name} supports Linear and Conv1D layers only, but '{path}' is a "
                    f"{type(module).__name__}; leave it out of target_modules or use init_lora_weights: true")
        return None

    def __call__(self, layer: nn.Module, name: str) -> None:
        ad = layer.adapters[name]
        stored = layer.weight
        w = stored.t() if layer.fan_in_fan_out else stored
        if ad.r > min(w.shape):
            raise LoraTuneError(f"init_lora_weights={self.name} needs r ≤ {min(w.shape)} for a {tuple(w.shape)} "
                                f"weight, got r={ad.r}; lower r (or set it per module with rank_pattern)")
        if not stored.dtype.is_floating_point:
            raise LoraTuneError(f"init_lora_weights={self.name} needs a floating-point base weight, got {stored.dtype}")
        with torch.no_grad():
            residual, A, B = factors_for(self.name, w, ad.r, ad.scaling, self.loftq_iter)
            ad.lora_A.copy_(A.to(ad.lora_A.dtype))
            ad.lora_B.copy_(B.to(ad.lora_B.dtype))
            stored.copy_((residual.t() if layer.fan_in_fan_out else residual).to(stored.dtype))
        ad.register_buffer("initial_lora_A", ad.lora_A.detach().clone(), persistent=False)
        ad.register_buffer("initial_lora_B", ad.lora_B.detach().clone(), persistent=False)


def initializer_for(config: LoraConfig) -> WeightInit | None:
    """The initializer ``config.init_lora_weights`` names, or None (True, False, "gaussian": the layer's own)."""
    if init_kind(config.init_lora_weights) is None:
        return None
    return WeightInit(config.init_lora_weights, config.loftq_config.get("loftq_iter", 1))


# --- conversion to plain LoRA on the original base -----------------------------------------------------------------
def converted_config(config: LoraConfig) -> LoraConfig:
    """``config`` for the converted adapter: plain init, r and every rank doubled, α scaled so that s stays."""
    if init_kind(config.init_lora_weights) not in CONVERTIBLE:
        raise ConfigError(f"only PiSSA and OLoRA adapters convert to plain LoRA; this one has "
                          f"init_lora_weights={config.init_lora_weights!r}"
                          + (" (LoftQ's change of the base is rounding, not low-rank: keep its quantized base)"
                             if config.init_lora_weights == "loftq" else ""))
    factor = math.sqrt(2) if config.use_rslora else 2
    return dataclasses.replace(
        config, init_lora_weights=True, r=2 * config.r, lora_alpha=config.lora_alpha * factor,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()})


def converted_factors(A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """[A; A0] and [B, −B0]: s·B'·A' = s·(B·A − B0·A0), the trained change measured from the original base."""
    return torch.cat([A, A0], 0), torch.cat([B, -B0], 1)


@contextlib.contextmanager
def saved_as_lora(lora_model: nn.Module, name: str) -> Iterator[None]:
    """Inside the block, adapter ``name`` of ``lora_model`` reads as its conversion (``converted_config``,
    ``converted_factors``): what ``save_pretrained`` writes then applies to the original base. Restored on exit."""
    config = lora_model.peft_config[name]
    new_config = converted_config(config)
    swapped = []
    for module in lora_model.model.modules():
        adapters = getattr(module, "adapters", None)
        if not isinstance(adapters, nn.ModuleDict) or name not in adapters:
            continue
        ad = adapters[name]
        if getattr(ad, "initial_lora_A", None) is None:
            raise LoraTuneError(f"adapter '{name}' has no initial factors to convert from (it was loaded, not "
                                "initialized here); convert it in the session that initialized it")
        swapped.append((ad, ad.lora_A, ad.lora_B))
    try:
        for ad, A, B in swapped:
            A2, B2 = converted_factors(A.detach(), B.detach(), ad.initial_lora_A, ad.initial_lora_B)
            ad.lora_A, ad.lora_B = nn.Parameter(A2, requires_grad=False), nn.Parameter(B2, requires_grad=False)
        lora_model.peft_config[name] = new_config
        yield
    finally:
        lora_model.peft_config[name] = config
        for ad, A, B in swapped:
            ad.lora_A, ad.lora_B = A, B
