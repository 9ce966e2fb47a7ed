"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"), as PEFT 0.21 has it.

The update is in SVD form P·Λ·Q: per layer init_r triplets, A's rows (right vectors), E's entries (singular
values) and B's columns (left vectors), on Linear and GPT-2's Conv1D:

    h = W0·x + s·B·(A ⊙ E)·dropout(x) / (ranknum + 1e-5),    s = lora_alpha, ranknum = init_r

E (r, 1) starts at zero, A and B at normal(0, 0.02) (all three standard normal with ``init_lora_weights=False``, as
PEFT), so training starts at the base model. ranknum stays init_r for the layer's life: PEFT loads a pruned layer at
its kept rank but copies the old ranknum back ("the scaling is exactly as the previous"), so a pruned layer's
output does not change when it is saved and loaded.

Here a layer always holds its init_r triplets; a pruned one has E = 0 (what PEFT's training does too). The files
are PEFT's: only the kept triplets (``rank_pattern``'s masks cut A's rows, B's columns, E), and loading spreads
them back into their slots with the dropped ones zero (``state.load_adapter_state``): the same function as PEFT's
kept-rank layer, and one path for loading an adapter and resuming a run.

``RankAllocator`` is PEFT's ``RankAllocator`` plus ``AdaLoraModel.update_and_allocate``, over the adapter's factors
(``adalora_factors``): after each optimizer step, the sensitivity |p·∇p| of every entry of A, B, E smoothed by β1
(Ī), its uncertainty |I − Ī| smoothed by β2 (Ū), the entry's score Ī·Ū, a triplet's score E's + the mean of its A
row's + the mean of its B column's; the budget (total kept triplets) falls from init_r·n to target_r·n along a cubic
between ``tinit`` and ``total_step − tfinal``, and every ``deltaT`` steps the triplets scoring at or below the
(init_r·n − budget)-th smallest score get E = 0; at ``total_step − tfinal`` the final mask is taken (and kept
applied every later step). ``orth_penalty`` is the regularizer R = Σ‖AAᵀ − I‖_F + ‖BᵀB − I‖_F over the adapter's
matrices, divided by their number, times ``orth_reg_weight``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...errors import ConfigError
from ..config import LoraConfig, schedule_problems
from .base import TrainingHooks, Variant

EPS = 1e-5  # PEFT's: s / (ranknum + 1e-5)
KEYS = ("lora_A", "lora_B", "lora_E")  # PEFT's file keys after the module path (no ".weight")


# --- the math, on plain tensors ------------------------------------------------------------------------------------
def adalora_scaling(lora_alpha: float, ranknum: float) -> float:
    """s / (ranknum + 1e-5), s = lora_alpha: the factor of B·(A ⊙ E)."""
    return lora_alpha / (ranknum + EPS)


def adalora_term(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, E: torch.Tensor, scaling: float,
                 dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """scaling·B·(A ⊙ E)·dropout(x) for x (..., in) -> (..., out); ``scaling`` from ``adalora_scaling``."""
    return F.linear(F.linear(F.dropout(x, dropout, training), A * E), B) * scaling


def adalora_delta(A: torch.Tensor, B: torch.Tensor, E: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = scaling·B·(A ⊙ E), (out, in)."""
    return (B @ (A * E)) * scaling


def orth_penalty(factors: dict[str, nn.Module], weight: float) -> torch.Tensor | None:
    """weight · (Σ ‖AAᵀ − I‖_F + ‖BᵀB − I‖_F) / (number of matrices), as PEFT adds it to the loss; None at weight 0."""
    if not weight or not factors:
        return None
    terms = []
    for f in factors.values():
        for cov in (f.lora_A @ f.lora_A.t(), f.lora_B.t() @ f.lora_B):
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            terms.append(torch.linalg.matrix_norm(cov - eye).to(terms[0].device if terms else cov.device))
    return weight * torch.stack(terms).sum() / len(terms)


# --- the layer ------------------------------------------------------------------------------------------------------
class AdaLora(Variant):
    """AdaLoRA's triplets on a Linear or Conv1D layer (see the module doc); ``random`` (init_lora_weights=False):
    A, B and E all standard normal, as PEFT's non-default init."""

    name = "adalora"
    custom_forward = True

    def __init__(self, random: bool = False):
        super().__init__(None)
        self.random = random

    def check(self, path: str, module: nn.Module) -> str | None:
        if not isinstance(module, (nn.Linear, Conv1D)) or hasattr(module, "dense_weight"):
            kind = "a 4-bit NF4Linear" if hasattr(module, "dense_weight") else f"a {type(module).__name__}"
            return (f"use_adalora supports Linear and Conv1D layers only, but '{path}' is {kind}; leave it out of "
                    "target_modules (or exclude_modules it), or set use_adalora: false")
        return None

    def init(self, layer: nn.Module, name: str) -> None:
        ad = layer.adapters[name]
        A, B = ad.lora_A, ad.lora_B
        ad.lora_E = nn.Parameter(torch.zeros(ad.r, 1, dtype=A.dtype, device=A.device))
        with torch.no_grad():
            if self.random:
                for p in (A, B, ad.lora_E):
                    p.normal_()
            else:
                A.normal_(0.0, 0.02)
                B.normal_(0.0, 0.02)
        ad.ranknum = float(ad.r)  # not trained, not saved (PEFT's ranknum)
        ad.scaling = adalora_scaling(ad.lora_alpha, ad.ranknum)

    def forward(self, layer, name, x, result):
        ad = layer.adapters[name]
        if result is None:
            result = layer.base_layer(x)
        term = adalora_term(x.to(ad.lora_A.dtype), ad.lora_A, ad.lora_B, ad.lora_E, ad.scaling, ad.dropout,
                            layer.training)
        return result + term.to(result.dtype)

    def merge_delta(self, layer, name):
        ad = layer.adapters[name]
        delta = adalora_delta(*(t.detach().double() for t in (ad.lora_A, ad.lora_B, ad.lora_E)), ad.scaling)
        return delta.t() if getattr(layer, "fan_in_fan_out", False) else delta

    def unmerge_delta(self, layer, name):
        return self.merge_delta(layer, name)


def adalora_factors(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """Module path -> adapter ``name``'s factors (``lora_A``, ``lora_B``, ``lora_E``) on each of ``model``'s (a
    LoraModel's) AdaLoRA layers, sorted by path."""
    return dict(sorted((path, layer.adapters[name]) for path, layer in model.lora_layers()
                       if name in layer.adapters and getattr(layer.adapters[name], "lora_E", None) is not None))


# --- the rank allocator ---------------------------------------------------------------------------------------------
class RankAllocator:
    """PEFT's AdaLoRA rank allocation (``RankAllocator`` with ``AdaLoraModel.update_and_allocate``) over
    ``factors`` (``adalora_factors``) as ``config`` (an AdaLoRA LoraConfig) says; ``step`` writes the masks it takes
    to ``config.rank_pattern``, which saving uses. Holds only the smoothed scores (``state_dict``)."""

    def __init__(self, config: LoraConfig, factors: dict[str, nn.Module]):
        self.config = config
        self.factors = dict(sorted(factors.items()))
        self.init_bgt = sum(f.lora_A.shape[0] for f in self.factors.values())
        self.target_bgt = config.target_r * len(self.factors)
        self.reset()

    def reset(self) -> None:
        """Forget the smoothed scores (PEFT's ``reset_ipt``, done once the final mask is taken)."""
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def named_factors(self) -> Iterator[tuple[str, nn.Parameter]]:
        """("<path>.lora_A", A), ... for every layer."""
        for path, f in self.factors.items():
            for key in KEYS:
                yield f"{path}.{key}", getattr(f, key)

    def budget_schedule(self, step: int, total_step: int) -> tuple[int, bool]:
        """(budget, whether to mask at this step): init_r·n up to ``tinit``, then
        ⌊(init − target)·(1 − (step − tinit)/(total − tfinal − tinit))³ + target⌋, target after total − tfinal."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > total_step - c.tfinal:
            return self.target_bgt, True
        mul = 1 - (step - c.tinit) / (total_step - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * (mul ** 3) + self.target_bgt), step % c.deltaT == 0

    def update_importance(self) -> None:
        """Smooth this step's sensitivity |p·∇p| (β1) and its uncertainty (β2) for every entry of A, B, E."""
        b1, b2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for key, p in self.named_factors():
                ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                if key not in self.exp_avg_ipt:
                    self.exp_avg_ipt[key], self.exp_avg_unc[key] = torch.zeros_like(p), torch.zeros_like(p)
                self.exp_avg_ipt[key] = b1 * self.exp_avg_ipt[key] + (1 - b1) * ipt
                self.exp_avg_unc[key] = b2 * self.exp_avg_unc[key] + (1 - b2) * (ipt - self.exp_avg_ipt[key]).abs()

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Module path -> each triplet's score (r,): E's Ī·Ū + the mean over A's row + the mean over B's column."""
        out = {}
        for path in self.factors:
            s = {k: self.exp_avg_ipt[f"{path}.{k}"] * self.exp_avg_unc[f"{path}.{k}"] for k in KEYS}
            ab = torch.cat([s["lora_A"].mean(1, keepdim=True), s["lora_B"].mean(0).view(-1, 1)], dim=1).sum(1)
            out[path] = s["lora_E"].view(-1) + ab
        return out

    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero E of every triplet scoring at or below the (init_r·n − budget)-th smallest score; the masks."""
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        first = next(iter(scores.values()))
        threshold = torch.kthvalue(torch.cat([s.to(first.device) for s in scores.values()]), k)[0].item() \
            if k > 0 else None  # (PEFT calls kthvalue with k = 0 too, which raises; nothing to mask then)
        pattern = {}
        with torch.no_grad():
            for path, f in self.factors.items():
                keep = scores[path] > threshold if threshold is not None else torch.ones_like(scores[path], dtype=bool)
                f.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
                pattern[f"{path}.lora_E"] = keep.tolist()
        return pattern

    def mask_with_pattern(self, pattern: dict[str, list[bool]]) -> None:
        """Zero E where ``pattern`` (a rank_pattern) says a triplet is dropped."""
        with torch.no_grad():
            for path, f in self.factors.items():
                mask = pattern.get(f"{path}.lora_E")
                if mask is not None:
                    f.lora_E.masked_fill_(~torch.tensor(mask, device=f.lora_E.device).view(-1, 1), 0.0)

    def step(self, step: int, total_step: int | None = None) -> dict[str, list[bool]] | None:
        """PEFT's ``update_and_allocate(step)``, after the optimizer's step and before the gradients are cleared:
        the masks taken at this step (also written to ``config.rank_pattern``), or None. ``total_step``: used when
        the config has none."""
        c = self.config
        total = c.total_step or total_step
        if total is None:
            raise ConfigError("AdaLoRA's rank allocator needs total_step (the number of optimizer steps of the run); "
                              "set it in the LoraConfig, e.g. total_step=1000")
        end = total - c.tfinal
        if step < end:
            self.update_importance()
            budget, mask_now = self.budget_schedule(step, total)
            if mask_now:
                c.rank_pattern = self.mask_to_budget(budget)
                return c.rank_pattern
        elif step == end:  # the final allocation; later steps only keep it applied
            c.rank_pattern = self.mask_to_budget(self.budget_schedule(step, total)[0])
            self.reset()
            return c.rank_pattern
        elif c.rank_pattern:
            self.mask_with_pattern(c.rank_pattern)
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The smoothed scores, as CPU tensors under "exp_avg_ipt.<path>.<lora_X>" / "exp_avg_unc...." keys."""
        return {f"{kind}.{key}": t.detach().cpu().clone() for kind, d in (("exp_avg_ipt", self.exp_avg_ipt),
                                                                         ("exp_avg_unc", self.exp_avg_unc))
                for key, t in d.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_factors())
        self.reset()
        for full, t in state.items():
            kind, _, key = full.partition(".")
            if kind not in ("exp_avg_ipt", "exp_avg_unc") or key not in params or t.shape != params[key].shape:
                raise ConfigError(f"AdaLoRA allocator state {full!r} does not fit this adapter; resume with the "
                                  "run's own checkpoint (same model and lora settings)")
            getattr(self, kind)[key] = t.to(params[key].device, params[key].dtype)


class AdaLoraHooks(TrainingHooks):
    """AdaLoRA's part of each optimizer step for one adapter: the orthogonality penalty and the rank allocator
    (``training_hooks`` gives it). ``total_steps``: the run's step count, used when ``config.total_step`` is None
    (and then written there, so that the saved adapter has it)."""

    def __init__(self, config: LoraConfig, factors: dict[str, nn.Module], total_steps: int | None = None):
        self.config, self.factors = config, factors
        self.allocator = RankAllocator(config, factors)
        if total_steps is not None:
            self._fill_total(total_steps)

    def _fill_total(self, total_steps: int) -> None:
        if self.config.total_step is None:
            problems = schedule_problems(self.config, total_steps)
            if problems:
                raise ConfigError(problems[0].replace("total_step (", "the run's step count (") + " (or set "
                                  "lora.total_step)")
            self.config.total_step = total_steps

    def penalty(self) -> torch.Tensor | None:
        """The orthogonality penalty; under torch.distributed each process adds 1/world of it, since the loop sums
        the gradients of all processes (``training.distributed.all_reduce_grads``)."""
        term = orth_penalty(self.factors, self.config.orth_reg_weight)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return term / world if term is not None and world > 1 else term

    def after_step(self, step: int, total_steps: int) -> None:
        self._fill_total(total_steps)
        self.allocator.step(step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The allocator's smoothed scores, and every layer's whole factors (a checkpoint's adapter file holds only
        the kept triplets; the dropped ones keep training through the penalty and may come back)."""
        out = {f"allocator.{k}": v for k, v in self.allocator.state_dict().items()}
        for path, f in self.factors.items():
            for key in KEYS:
                out[f"factors.{path}.{key}"] = getattr(f, key).detach().cpu().clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.allocator.load_state_dict({k[len("allocator."):]: v for k, v in state.items()
                                        if k.startswith("allocator.")})
        params = dict(self.allocator.named_factors())
        with torch.no_grad():
            for full, t in state.items():
                if not full.startswith("factors."):
                    continue
                target = params.get(full[len("factors."):])
                if target is None or target.shape != t.shape:
                    raise ConfigError(f"AdaLoRA state {full!r} does not fit this adapter; resume with the run's own "
                                      "checkpoint (same model and lora settings)")
                target.copy_(t)
