"""An adapter's tensors under PEFT's state-dict keys, and merging as a pure function of state dicts.

Keys are ``base_model.model.<module path>.lora_A.weight`` (adapter name stripped), A shaped (r, in) and B (out, r);
embeddings use ``lora_embedding_A``/``lora_embedding_B``; DoRA's magnitude is ``<module path>.lora_magnitude_vector``
(out,); AdaLoRA's triplets are ``<module path>.lora_A`` (r, in), ``.lora_B`` (out, r) and ``.lora_E`` (r, 1), cut in
files to the triplets its ``rank_pattern`` keeps (``file_tensors``; loading spreads them back); modules_to_save and
trained biases appear under their plain parameter names. ``merged_state_dict`` adds an adapter's ΔW to a base model's
state dict without any model: the base that composition, rank tools and export build on.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterFileError, ConfigError
from . import functional as LF
from . import variants
from .config import LoraConfig
from .layers import LoraLayer, ModulesToSave
from .targets import pattern_value
from .variants.adalora import KEYS as ADALORA_KEYS

PREFIX = "base_model.model."
_FACTORS = {".lora_A.weight": ".lora_B.weight", ".lora_embedding_A": ".lora_embedding_B", ".lora_A": ".lora_B"}
MAGNITUDE = ".lora_magnitude_vector"  # DoRA's m, one per output (PEFT's key)
ADALORA_E = ".lora_E"  # AdaLoRA's singular values (r, 1) (PEFT's key; its A and B are ".lora_A"/".lora_B")


def bias_params(model: nn.Module, mode: str) -> list[nn.Parameter]:
    """The biases that train under PEFT's ``bias`` mode: "all" (every bias but those of the frozen originals behind
    modules_to_save), "lora_only" (the LoRA layers' base biases) or "none"."""
    if mode == "all":
        frozen = {id(p) for m in model.modules() if isinstance(m, ModulesToSave)
                  for p in m.original_module.parameters()}
        return [m.bias for m in model.modules()
                if isinstance(getattr(m, "bias", None), nn.Parameter) and id(m.bias) not in frozen]
    if mode == "lora_only":
        return [m.base_layer.bias for m in model.modules()
                if isinstance(m, LoraLayer) and isinstance(getattr(m.base_layer, "bias", None), nn.Parameter)]
    return []


def adapter_tensors(model: nn.Module, config: LoraConfig, name: str) -> dict[str, torch.Tensor]:
    """PEFT file key -> the live parameter that key holds, for adapter ``name`` of the wrapped ``model`` (a
    LoraModel's ``.model``) whose config is ``config``."""
    out: dict[str, torch.Tensor] = {}
    # Parameters inside a ModulesToSave copy: PEFT's name for them ("<path>.modules_to_save.<param>", as its
    # bias="all" writes them), or None for another adapter's copy. loratune's ".copies.<name>." is internal.
    in_copies: dict[int, str | None] = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and name in module.adapters:
            ad = module.adapters[name]
            if getattr(ad, "lora_E", None) is not None:  # AdaLoRA's triplets: PEFT's keys carry no ".weight"
                out.update({f"{PREFIX}{path}.{k}": getattr(ad, k) for k in ADALORA_KEYS})
                continue
            key_a, key_b = module.peft_keys
            out[f"{PREFIX}{path}.{key_a}"] = ad.lora_A
            out[f"{PREFIX}{path}.{key_b}"] = ad.lora_B
            if getattr(ad, "lora_magnitude_vector", None) is not None:
                out[f"{PREFIX}{path}{MAGNITUDE}"] = ad.lora_magnitude_vector
        elif isinstance(module, ModulesToSave):
            for copy_name, copy_module in module.copies.items():
                for pname, p in copy_module.named_parameters():
                    in_copies[id(p)] = f"{PREFIX}{path}.modules_to_save.{pname}" if copy_name == name else None
                    if copy_name == name:
                        out[f"{PREFIX}{path}.{pname}"] = p
    if config.bias != "none":
        # PEFT's bias="all" file holds every bias, trainable or not (a head's frozen original_module's too).
        params = bias_params(model, config.bias) if config.bias != "all" else \
            [m.bias for m in model.modules() if isinstance(getattr(m, "bias", None), nn.Parameter)]
        ids = {id(p) for p in params}
        for pname, p in model.named_parameters():
            if id(p) in ids:
                key = in_copies.get(id(p), f"{PREFIX}{pname}")
                if key is not None:
                    out[key] = p
    return out


def file_tensors(model: nn.Module, config: LoraConfig, name: str) -> dict[str, torch.Tensor]:
    """What adapter ``name``'s file holds: ``adapter_tensors``, with an AdaLoRA adapter's triplets cut to those its
    ``rank_pattern`` keeps (as PEFT saves them). An AdaLoRA adapter needs ``total_step`` (PEFT refuses a file
    without it)."""
    out = adapter_tensors(model, config, name)
    if not config.use_adalora:
        return out
    if config.total_step is None:
        raise ConfigError(f"adapter '{name}' is AdaLoRA without total_step, which PEFT's AdaLoraConfig needs to load "
                          "it; set total_step in its LoraConfig (loratune train fills it with the run's step count)")
    for key, mask in config.rank_pattern.items():
        path = key[: -len(ADALORA_E)]
        if f"{PREFIX}{path}.lora_A" not in out:
            raise ConfigError(f"adapter '{name}': rank_pattern names {key!r}, which is not one of its AdaLoRA layers; "
                              "remove that entry")
        keep = torch.tensor(mask, device=out[f"{PREFIX}{path}.lora_A"].device)
        for k in ADALORA_KEYS:
            t = out[f"{PREFIX}{path}.{k}"].detach()
            out[f"{PREFIX}{path}.{k}"] = t[:, keep] if k == "lora_B" else t[keep]
    return out


def _spread_adalora(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], pattern: dict,
                    source: str) -> dict[str, torch.Tensor]:
    """``found`` with each AdaLoRA layer's kept triplets (a file cut by ``pattern``, PEFT's ``rank_pattern``) put
    back into their slots of the full-rank layer, the dropped ones zero (E = 0: the layer computes what PEFT's
    kept-rank layer does). Tensors not cut are left as they are."""
    found = dict(found)
    for key, mask in pattern.items():
        path = key[: -len(ADALORA_E)]
        target = expected.get(f"{PREFIX}{path}.lora_A")
        if target is None:
            raise AdapterFileError(f"adapter in {source}: rank_pattern names {key!r}, which is not an AdaLoRA layer of "
                                   "this model; was it made for another architecture?")
        if len(mask) != target.shape[0]:
            raise AdapterFileError(f"adapter in {source}: rank_pattern[{key!r}] has {len(mask)} entries but the "
                                   f"layer has init_r = {target.shape[0]} triplets; re-save the adapter")
        keep = torch.tensor(mask)
        for k in ADALORA_KEYS:
            fkey = f"{PREFIX}{path}.{k}"
            t = found.get(fkey)
            cut = t is not None and (t.shape[1] if k == "lora_B" else t.shape[0]) == int(keep.sum()) != len(mask)
            if cut:
                full = torch.zeros(expected[fkey].shape, dtype=t.dtype)
                if k == "lora_B":
                    full[:, keep] = t
                else:
                    full[keep] = t
                found[fkey] = full
    return found


def load_adapter_state(model: nn.Module, config: LoraConfig, name: str, found: dict[str, torch.Tensor],
                       source: str, saved: LoraConfig | None = None) -> None:
    """Copy ``found`` (PEFT keys) into adapter ``name`` (already injected), checking every key and shape first;
    ``source`` names where the tensors came from, in errors. ``saved``: the file's own config where it may differ
    from ``config`` (a checkpoint loaded into a run's adapter): an AdaLoRA file's triplets are spread back by its
    ``rank_pattern``, which the adapter then takes."""
    expected = adapter_tensors(model, config, name)
    pattern = None
    if config.use_adalora:
        pattern = (saved if saved is not None and saved.use_adalora else config).rank_pattern
        found = _spread_adalora(found, expected, pattern, source)
    # PEFT also saves a targeted embedding's full table as "<path>.base_layer.weight"; it loads it too.
    extra_base = {k: v for k, v in found.items() if k not in expected and k.endswith(".base_layer.weight")}
    unknown = [k for k in found if k not in expected and k not in extra_base]
    if unknown:
        raise AdapterFileError(f"adapter in {source} does not fit this model ({type(model).__name__}): "
                               f"{len(unknown)} tensor(s) name modules it lacks, e.g. '{unknown[0]}'; "
                               "was it made for another architecture?")
    missing = [k for k in expected if k not in found]
    if missing:
        raise AdapterFileError(f"adapter in {source} lacks {len(missing)} tensor(s) this config needs, "
                               f"e.g. '{missing[0]}'; re-save the adapter")
    pairs = [*((k, expected[k]) for k in expected), *((k, model.get_parameter(k[len(PREFIX):])) for k in extra_base)]
    for key, target in pairs:  # check everything before changing anything
        t = found[key]
        if not t.is_floating_point():
            raise AdapterFileError(f"adapter in {source}: tensor '{key}' is {t.dtype}, not a floating-point tensor; "
                                   "the file is damaged or not a LoRA adapter (re-save it)")
        if not torch.isfinite(t).all():
            raise AdapterFileError(f"adapter in {source}: tensor '{key}' holds NaN or infinite values; the adapter "
                                   "is broken (retrain it, or use an earlier checkpoint)")
        if t.shape != target.shape:
            module = module_of(key)
            part = key[len(PREFIX) + len(module) + 1:]
            raise AdapterFileError(f"adapter in {source}: module '{module}' needs {tuple(target.shape)} for "
                                   f"'{part}' but the file has {tuple(found[key].shape)}; the adapter was made for a "
                                   "different base model or rank")
    with torch.no_grad():
        for key, target in pairs:
            target.copy_(found[key].to(target.dtype))
    if pattern is not None:
        config.rank_pattern = dict(pattern)


def module_of(key: str) -> str:
    """The module path inside a PEFT key (``base_model.model.`` and the parameter's own name stripped)."""
    path = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B", ".base_layer.weight",
                   MAGNITUDE, ".lora_A", ".lora_B", ADALORA_E):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path.rsplit(".", 1)[0]


def merged_state_dict(base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], config: LoraConfig
                      ) -> dict[str, torch.Tensor]:
    """The base model's state dict with the adapter merged in: W + ΔW for every LoRA pair of ``adapter`` (PEFT's
    keys, as ``adapter_model.safetensors`` holds them), and its other tensors (modules_to_save, trained biases)
    taking the place of the base's. ``base`` is a plain model's state dict (``model.state_dict()``); it is not
    changed. The result equals ``merge_and_unload()``'s state dict for the same adapter: a DoRA pair (with its
    ``lora_magnitude_vector``) gives m ⊙ (W + ΔW) / ‖W + ΔW‖, and an adapter whose init split the base (PiSSA, OLoRA,
    LoftQ: ``config.init_lora_weights``) is merged into the base that init leaves (it is re-derived from W)."""
    out = dict(base)
    factors = []
    for key in adapter:  # plain tensors first (a LoRA layer's base bias, a head's copy), then each ΔW on top
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"adapter key {key!r} does not start with {PREFIX!r}; is it a PEFT adapter?")
        suffix = next((s for s in _FACTORS if key.endswith(s)), None)
        if suffix is not None:
            factors.append((key, suffix))
        elif not key.endswith((*_FACTORS.values(), MAGNITUDE, ADALORA_E)) and ".original_module." not in key:
            # (a B factor goes with its A; a head's frozen original, which PEFT's bias="all" file holds too, is
            # not what the merged model runs: its trained copy is)
            target = key[len(PREFIX):].replace(".modules_to_save.", ".").replace(".base_layer.", ".")
            if target not in base:
                raise AdapterFileError(f"adapter tensor {key!r} has no counterpart {target!r} in the base state "
                                       "dict; is the adapter for this base model?")
            out[target] = adapter[key].to(base[target].dtype)
    for key, suffix in factors:
        a = adapter[key]
        module = key[len(PREFIX):-len(suffix)]
        b = adapter.get(PREFIX + module + _FACTORS[suffix])
        weight_key = module + ".weight"
        if b is None or weight_key not in out:
            raise AdapterFileError(f"adapter module {module!r}: its B factor or the base weight {weight_key!r} is "
                                   "missing; is the adapter for this base model?")
        w = out[weight_key]
        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        if suffix == ".lora_A":  # AdaLoRA: s·B·(A ⊙ E) / (init_r + 1e-5) (PEFT keeps ranknum at init_r)
            e = adapter.get(PREFIX + module + ADALORA_E)
            if e is None or not config.use_adalora:
                raise AdapterFileError(f"adapter module {module!r} has AdaLoRA keys but " + (
                    "no lora_E" if e is None else "its config is not AdaLoRA (peft_type ADALORA)")
                    + "; the file is damaged or not from loratune/PEFT")
            scale = variants.adalora_scaling(config.lora_alpha, config.init_r)
            delta = LF.linear_delta_weight(a64 * e.to(torch.float64), b64, scale, config.fan_in_fan_out)
            out[weight_key] = (w.to(torch.float64) + delta).to(w.dtype)
            continue
        alpha = pattern_value(config.alpha_pattern, module, config.lora_alpha)
        scaling = LF.lora_scaling(alpha, a.shape[0], config.use_rslora)  # the rank is A's (rank_pattern included)
        if variants.init_kind(config.init_lora_weights) is not None:  # the base that PiSSA/OLoRA/LoftQ left behind
            if suffix != ".lora_A.weight" or a.dim() != 2:
                raise AdapterFileError(f"adapter module {module!r}: init_lora_weights={config.init_lora_weights!r} "
                                       "applies to Linear/Conv1D layers only; the file is not one loratune or PEFT "
                                       "writes")
            fifo = config.fan_in_fan_out
            w2 = w.t() if fifo else w
            residual = variants.factors_for(config.init_lora_weights, w2, a.shape[0], scaling,
                                            config.loftq_config.get("loftq_iter", 1))[0]
            w = (residual.t() if fifo else residual).to(w.dtype)
        magnitude = adapter.get(PREFIX + module + MAGNITUDE)
        if magnitude is not None:
            if suffix != ".lora_A.weight" or a.dim() != 2:
                raise AdapterFileError(f"adapter module {module!r} has a DoRA magnitude but is not a Linear/Conv1D "
                                       "LoRA pair; the file is damaged or not from loratune/PEFT")
            out[weight_key] = variants.merged_weight(w, a64, b64, magnitude, scaling, config.fan_in_fan_out
                                                     ).to(w.dtype)
            continue
        if suffix == ".lora_embedding_A":
            delta = LF.embedding_delta_weight(a64, b64, scaling)
        elif a.dim() > 2:
            delta = LF.conv_delta_weight(a64, b64, scaling)
        else:
            delta = LF.linear_delta_weight(a64, b64, scaling, config.fan_in_fan_out)
        out[weight_key] = (w.to(torch.float64) + delta).to(w.dtype)
    return out
