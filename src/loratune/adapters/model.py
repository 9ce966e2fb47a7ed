"""``LoraModel``: a transformers model with LoRA adapters injected in place of its target modules."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from .. import ops, quant
from ..errors import AdapterFileError, ConfigError, LoraTuneError
from . import files, state, variants
from .batch import BASE, MixedBatch, adapter_factors, mixed_batch
from .config import LoraConfig
from .layers import LoraLayer, ModulesToSave, lora_class_for
from .targets import SEQ_CLS_HEADS, all_linear_targets, in_layers, layer_index, name_matches, pattern_value


def get_lora_model(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> LoraModel:
    """Wrap ``config.target_modules`` of ``model`` in place with LoRA layers and freeze everything else."""
    return LoraModel(model, config, adapter_name)


class LoraModel(nn.Module):
    """A base model plus named LoRA adapters. Forward and ``generate`` pass through to the base model."""

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default"):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapters: list[str] = []
        self._frozen: set[str] = set()  # adapters loaded for inference only
        for p in model.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, config)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)  # config, device, dtype, ... of the base model

    # --- modules -------------------------------------------------------------------------------------
    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        return ((n, m) for n, m in self.model.named_modules() if isinstance(m, LoraLayer))

    def _wrappers(self) -> Iterator[LoraLayer | ModulesToSave]:
        return (m for m in self.model.modules() if isinstance(m, (LoraLayer, ModulesToSave)))

    # --- adapters ------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        """Inject a new adapter; the first one added becomes active."""
        if adapter_name in self.peft_config:
            raise LoraTuneError(f"adapter '{adapter_name}' already exists; pick another name or "
                                f"delete_adapter('{adapter_name}') first")
        if not adapter_name or "." in adapter_name or adapter_name == BASE:
            raise ConfigError(f"invalid adapter name {adapter_name!r}: use a non-empty name without dots")
        config = dataclasses.replace(config)  # our own copy: injection fills in targets
        q = quant.quantization_settings(self.model)
        if q is not None:  # a module kept in full precision on purpose cannot also be an adapter target
            quant.check_skip_vs_targets(q["quantize_skip_modules"], config.target_modules)
        if config.target_modules == "all-linear":
            config.target_modules = all_linear_targets(self.model, wrapped=(LoraLayer, ModulesToSave))
        if config.task_type == "SEQ_CLS":  # as PEFT: a classifier's fresh head must be trained and saved
            config.modules_to_save = sorted(set(config.modules_to_save or []) | set(SEQ_CLS_HEADS))
        self._inject(adapter_name, config)
        ops.accelerate(self.model)  # fused RMSNorm/SwiGLU between the LoRA layers; unwrapping removes them
        self.peft_config[adapter_name] = config
        # A new adapter is not active (layers it alone targets must not switch it on), unless it is the first.
        self.set_adapter(self.active_adapters or [adapter_name])

    def _inject(self, name: str, cfg: LoraConfig) -> None:
        # Scan first, change nothing until the whole config is known to fit.
        targetable, named, matched, to_save, wrapped = set(), [], [], [], []
        for path, module in self.model.named_modules():
            if any(path.startswith(p) for p in wrapped):
                continue  # inside a wrapper: its base_layer/copies are not targets themselves
            if isinstance(module, (LoraLayer, ModulesToSave)):
                wrapped.append(path + ".")
            if name_matches(path, cfg.modules_to_save) and not isinstance(module, LoraLayer):
                to_save.append((path, module))
                wrapped.append(path + ".")
                continue
            cls = lora_class_for(module.base_layer if isinstance(module, LoraLayer) else module)
            if cls is None or not path:
                continue
            targetable.add(path.rsplit(".", 1)[-1])
            if not name_matches(path, cfg.target_modules):
                continue
            named.append(path)
            exact = isinstance(cfg.target_modules, list) and path in cfg.target_modules  # PEFT: no layer filter
            if not name_matches(path, cfg.exclude_modules) and \
                    (exact or in_layers(path, cfg.layers_to_transform, cfg.layers_pattern)):
                matched.append((path, module, cls))
        if not matched:
            raise ConfigError(self._no_match(cfg, named, targetable))
        saved = {p for p, _ in to_save}
        missing = [m for m in cfg.modules_to_save or [] if m not in SEQ_CLS_HEADS
                   and not any(name_matches(p, [m]) for p in saved)]
        if missing:  # (the classifier heads that task_type="SEQ_CLS" adds are optional, as in PEFT)
            tops = sorted({p.rsplit(".", 1)[-1] for p, _ in self.model.named_children()})
            raise ConfigError(f"modules_to_save={missing} matched no module of {type(self.model).__name__}; "
                              f"give module names it has (its top-level modules: {tops})")
        variant = variants.for_config(cfg)  # DoRA, PiSSA, ... (None: plain LoRA); checked before anything changes
        variants.check_targets(variant, [(path, module) for path, module, _ in matched])
        for path, module, cls in matched:
            layer = module if isinstance(module, LoraLayer) else cls(module)
            if layer is not module:
                self.model.set_submodule(path, layer)
            layer.add_adapter(name, r=variants.layer_rank(cfg, path),  # (AdaLoRA: init_r)
                              lora_alpha=pattern_value(cfg.alpha_pattern, path, cfg.lora_alpha),
                              dropout=cfg.lora_dropout, use_rslora=cfg.use_rslora, init=cfg.init_lora_weights,
                              variant=variant)
            cfg.fan_in_fan_out = cfg.fan_in_fan_out or getattr(layer, "fan_in_fan_out", False)
        for path, module in to_save:
            wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
            if wrapper is not module:
                self.model.set_submodule(path, wrapper)
            wrapper.add_adapter(name)

    def _no_match(self, cfg: LoraConfig, named: list[str], targetable: set[str]) -> str:
        """Why no module was targeted: nothing has these names, or a filter removed all that do."""
        model = type(self.model).__name__
        if not named:
            return (f"target_modules={cfg.target_modules!r} matched no module of {model}; modules that can be "
                    f"targeted: {sorted(targetable)}")
        excluded = [p for p in named if name_matches(p, cfg.exclude_modules)]
        if len(excluded) == len(named):
            return (f"target_modules={cfg.target_modules!r} matched {len(named)} module(s) of {model}, but "
                    f"exclude_modules={cfg.exclude_modules!r} removed all of them; narrow exclude_modules")
        layers = sorted({i for p in named if (i := layer_index(p, cfg.layers_pattern)) is not None})
        span = f"its layers are {layers[0]}..{layers[-1]}" if layers else "no numbered layers were found in their names"
        return (f"target_modules={cfg.target_modules!r} matched {len(named)} module(s) of {model}, but "
                f"layers_to_transform={cfg.layers_to_transform!r}"
                + (f" with layers_pattern={cfg.layers_pattern!r}" if cfg.layers_pattern else "")
                + f" kept none of them ({span}); pick layers in that range")

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make one adapter (or several, summed) active; only active adapters train."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_names(names)
        for m in self._wrappers():
            if isinstance(m, LoraLayer):
                m.active = [n for n in names if n in m.adapters]
            else:
                m.active = next((n for n in names if n in m.copies), None)
        self.active_adapters = names
        self._update_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every layer; layers left without adapters go back to their base module."""
        self._check_names([adapter_name])
        for path, module in list(self.model.named_modules()):
            if isinstance(module, LoraLayer) and adapter_name in module.adapters:
                module.delete_adapter(adapter_name)
                if not module.adapters:
                    self.model.set_submodule(path, module.base_layer)
            elif isinstance(module, ModulesToSave) and adapter_name in module.copies:
                del module.copies[adapter_name]
                module.active = next(iter(module.copies), None) if module.active == adapter_name \
                    else module.active
                if not module.copies:
                    self.model.set_submodule(path, module.original_module)
        del self.peft_config[adapter_name]
        self._frozen.discard(adapter_name)
        remaining = [a for a in self.active_adapters if a != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        if remaining:
            self.set_adapter(remaining)
        else:
            self.active_adapters = []

    def _check_names(self, names: list[str]) -> None:
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise LoraTuneError(f"unknown adapter(s) {unknown}; this model has {list(self.peft_config)}")

    def _update_trainable(self) -> None:
        """Active adapters (not loaded for inference) and their modules_to_save train; nothing else does."""
        train = {n for n in self.active_adapters if n not in self._frozen}
        for m in self._wrappers():
            items = m.adapters.items() if isinstance(m, LoraLayer) else m.copies.items()
            for name, sub in items:
                sub.requires_grad_(name in train)
        for name in train:
            for p in state.bias_params(self.model, self.peft_config[name].bias):
                p.requires_grad_(True)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             density: float | None = None, majority_sign_method: str = "total",
                             seed: int | None = None, svd_clamp: float | None = None,
                             allow_partial: bool = False):
        """PEFT's ``add_weighted_adapter``: a new adapter ``adapter_name`` (added, not made active) combining the
        named ``adapters`` with ``weights``. Modes as PEFT's: "cat" (exact Σ wᵢ·ΔWᵢ), "svd" (that, truncated to
        ``svd_rank``), "linear" (factor-wise, equal ranks), "ties", "dare_linear", "dare_ties", "magnitude_prune"
        and their "_svd" forms (``density`` in (0, 1], ``majority_sign_method``, ``seed`` for DARE's drops). Each
        ΔWᵢ uses its own adapter's scaling (rsLoRA and patterns included), unlike PEFT. Returns a
        ``CombineReport`` (ranks, and the energy kept by the SVD modes). See ``adapters.weighted``."""
        from .weighted import add_weighted_adapter  # the pure combination math, in this layer

        return add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank=svd_rank,
                                    density=density, majority_sign_method=majority_sign_method, seed=seed,
                                    svd_clamp=svd_clamp, allow_partial=allow_partial)

    # --- counting ------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, counted as PEFT counts them."""
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # --- merge ---------------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False,
                      force: bool = False) -> None:
        """Fold the active (or named) adapters into the base weights; unmerge_adapter() undoes it. Merging into a
        4-bit base is refused unless ``force`` (``quant.dequantize_model`` first merges into full precision)."""
        names = adapter_names or self.active_adapters
        self._check_names(names)
        # a forced merge into 4 bits: one warning with the merged model's measured output error, not one per layer
        with quant.forced_merge_report(self.model) if force else contextlib.nullcontext():
            for _, layer in self.lora_layers():
                layer.merge([n for n in names if n in layer.adapters], safe_merge=safe_merge, force=force)

    def unmerge_adapter(self) -> None:
        for _, layer in self.lora_layers():
            layer.unmerge()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None,
                         force: bool = False) -> nn.Module:
        """Merge, then return the plain transformers model (no LoRA modules left); ``force`` as merge_adapter."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge, force=force)
        return self._unwrap(keep_merged=True)

    def unload(self) -> nn.Module:
        """Return the plain base model without merging (adapters are discarded)."""
        return self._unwrap(keep_merged=False)

    def _unwrap(self, keep_merged: bool) -> nn.Module:
        ops.restore(self.model)
        for path, module in list(self.model.named_modules()):
            if isinstance(module, LoraLayer):
                if not keep_merged:
                    module.unmerge()
                self.model.set_submodule(path, module.base_layer)
            elif isinstance(module, ModulesToSave):
                keep = module.copies[module.active] if keep_merged and module.active else module.original_module
                self.model.set_submodule(path, keep)
        return self.model

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model: adapters off (and unmerged) inside, restored exactly on exit."""
        merged = {path: list(layer.merged) for path, layer in self.lora_layers()}
        wrappers = list(self._wrappers())
        try:
            for _, layer in self.lora_layers():
                layer.unmerge()
            for m in wrappers:
                m.disabled = True
            yield
        finally:
            for m in wrappers:
                m.disabled = False
            for path, layer in self.lora_layers():
                layer.merge(merged[path])

    # --- forward -------------------------------------------------------------------------------------
    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The base model's forward; ``adapter_names`` (one per row, "__base__" for none) mixes adapters."""
        with self._rows(adapter_names, args, kwargs):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        with self._rows(adapter_names, args, kwargs):
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _rows(self, adapter_names, args, kwargs) -> Iterator[None]:
        """Run the block with ``adapter_names`` as this call's mixed batch (per call: concurrent calls from other
        threads each have their own; nothing is set on the modules)."""
        if adapter_names is None:
            yield
            return
        first = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if first is not None and len(adapter_names) != first.shape[0]:
            raise LoraTuneError(f"adapter_names has {len(adapter_names)} entries but the batch has "
                                f"{first.shape[0]} rows; give one adapter name per row")
        unknown = sorted({n for n in adapter_names if n != BASE and n not in self.peft_config})
        if unknown:
            raise LoraTuneError(f"unknown adapter(s) {unknown} in adapter_names; "
                                f"known: {list(self.peft_config)} and '{BASE}' for none")
        batch = MixedBatch([None if n == BASE else n for n in adapter_names], adapter_factors, self._wrappers(),
                           copies=lambda m, k: m.copies[k] if k in m.copies else None)
        with mixed_batch(batch):
            yield

    # --- files ---------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, selected_adapters: list[str] | None = None,
                        convert_to_lora: bool = False) -> None:
        """Write each adapter in PEFT's format: "default" in the directory, others in a subdirectory.
        ``convert_to_lora``: a PiSSA/OLoRA adapter is written as plain LoRA of rank 2r that applies to the original
        base (PEFT's ``path_initial_model_for_weight_conversion``; ``variants.saved_as_lora``)."""
        for name in selected_adapters or list(self.peft_config):
            self._check_names([name])
            with variants.saved_as_lora(self, name) if convert_to_lora else contextlib.nullcontext():
                files.save_adapter(self, Path(save_directory) if name == "default" else Path(save_directory) / name,
                                   name)

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_dir: str | Path, adapter_name: str = "default",
                        is_trainable: bool = False) -> LoraModel:
        """Load a PEFT-format adapter onto ``model`` (frozen and in eval mode unless ``is_trainable``)."""
        config = files.read_adapter_config(adapter_dir)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.model, self.peft_config, self.active_adapters, self._frozen = model, {}, [], set()
        for p in model.parameters():
            p.requires_grad_(False)
        self._load(adapter_dir, adapter_name, config, is_trainable)
        return self

    def load_adapter(self, adapter_dir: str | Path, adapter_name: str, is_trainable: bool = False) -> None:
        """Load another PEFT-format adapter next to the existing ones (not made active)."""
        self._load(adapter_dir, adapter_name, files.read_adapter_config(adapter_dir), is_trainable)

    def _load(self, adapter_dir, adapter_name, config, is_trainable) -> None:
        if not is_trainable:
            self._frozen.add(adapter_name)
        try:
            try:
                self.add_adapter(adapter_name, config)
            except ConfigError as e:
                raise AdapterFileError(f"adapter in {adapter_dir} does not fit this model ({e}); was it made "
                                       "for another architecture?") from None
            files.load_adapter_weights(self, adapter_dir, adapter_name)
        except Exception:
            if adapter_name in self.peft_config:  # leave the model as it was
                self.delete_adapter(adapter_name)
            self._frozen.discard(adapter_name)
            raise
        if not is_trainable:
            self.eval()
