"""The one hook LoRA variants plug into: ``Variant``, per adapter and layer, as PEFT's ``LoraVariant``.

A ``LoraLayer`` (``adapters.layers``) knows nothing of DoRA or PiSSA. ``LoraModel`` asks ``variants.for_config`` for
an adapter's variant (None for plain LoRA) and hands it to ``LoraLayer.add_adapter``, which calls ``init`` once the
adapter's factors exist and stores the variant on the adapter (``LoraAdapter.variant``). Only a variant with
``custom_forward`` is consulted afterwards: the layer then runs that adapter's ``forward`` and asks it for the
weight change of a merge (``merge_delta``) and of an unmerge (``unmerge_delta``). A variant that only initializes
(PiSSA, OLoRA, LoftQ) leaves the forward to plain LoRA, fused fast path included.

Variants must not import ``layers`` (which stays free of them); they work on the layer they are handed:
``layer.weight``, ``layer.base_layer``, ``layer.fan_in_fan_out``, ``layer.adapters[name]``, ``layer.lora_term``,
``layer.delta_weight``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Initializer = Callable[[nn.Module, str], None]


class Variant:
    """One adapter's variant on one layer. The base class is plain LoRA with an optional ``initializer``
    (``init.py``: PiSSA, OLoRA, LoftQ), called as ``initializer(layer, name)`` after the default init."""

    name = "lora"
    custom_forward = False  # True: the layer hands this adapter's forward and merges to the variant

    def __init__(self, initializer: Initializer | None = None):
        self.initializer = initializer

    def __repr__(self) -> str:
        init = getattr(self.initializer, "name", None)
        return f"{type(self).__name__}({init or ''})"

    def check(self, path: str, module: nn.Module) -> str | None:
        """Why this variant cannot go on ``module`` (the base module at ``path``), or None. Asked for every target
        before the model is changed, so a refusal leaves the model as it was."""
        check = getattr(self.initializer, "check", None)
        return check(path, module) if check is not None else None

    def init(self, layer: nn.Module, name: str) -> None:
        """Set up adapter ``name`` of ``layer`` (its A and B already hold the default init)."""
        if self.initializer is not None:
            self.initializer(layer, name)

    def forward(self, layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor | None) -> torch.Tensor:
        """The layer's output with adapter ``name`` applied: on top of ``result`` (the base's output, plus any
        adapters before this one), or, given None, the whole output (the base included) when this adapter is the
        layer's only active one."""
        raise NotImplementedError

    def merge_delta(self, layer: nn.Module, name: str) -> torch.Tensor:
        """What to add to the (unmerged) base weight, in its layout, so that it computes this adapter's output."""
        raise NotImplementedError

    def unmerge_delta(self, layer: nn.Module, name: str) -> torch.Tensor:
        """What to subtract from the weight merged by ``merge_delta`` to get the base weight back."""
        raise NotImplementedError


class TrainingHooks:
    """What a variant adds to each optimizer step of the training loop; plain LoRA, DoRA and the initializations
    add nothing (these no-ops). ``penalty`` is a loss term added once per optimizer step (its gradient joins the
    step's); ``after_step`` runs after ``optimizer.step()`` and before the gradients are cleared. ``state_dict`` /
    ``load_state_dict``: the tensors a checkpoint must hold for an exact resume (CPU tensors under flat string
    keys; none here)."""

    def penalty(self) -> torch.Tensor | None:
        return None

    def after_step(self, step: int, total_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass
