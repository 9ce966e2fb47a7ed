"""LoRA files for diffusers: a UNet adapter that ``pipe.load_lora_weights`` / ``UNet2DConditionModel.load_lora_adapter``
read unchanged, and such files (written by diffusers' training scripts or ``save_lora_weights``) loaded back.

The format is diffusers' PEFT-based one: one ``pytorch_lora_weights.safetensors`` whose keys are
``unet.<module path>.lora_A.weight`` / ``.lora_B.weight`` (A (r, in[, k, k]), B (out, r[, 1, 1]), exactly PEFT's
tensors), and whose safetensors header holds the adapter's PEFT ``LoraConfig`` as JSON under
``lora_adapter_metadata``, each key prefixed ``unet.``. Without that header diffusers takes ``lora_alpha = r`` for
every module, so the header is always written: it is what keeps ``alpha / r`` (and rsLoRA) right.

The config written lists the targeted modules by their full paths (not the patterns they were chosen by), so PEFT
inside diffusers adapts exactly the modules loratune adapted. Nothing here imports diffusers: the files are plain
safetensors, and the tests check them against the real loader.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..adapters import LoraConfig, LoraLayer, LoraModel, get_lora_model, state
from ..errors import AdapterFileError, LoraTuneError
from ..fsutil import read_tensors, save_tensors

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name diffusers looks for in a directory
METADATA_KEY = "lora_adapter_metadata"  # the safetensors header entry diffusers reads the LoraConfig from
UNET_PREFIX = "unet"  # the UNet's component name in a pipeline's LoRA file
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' attention projections (self and cross)
CONV_TARGETS = ["conv1", "conv2", "conv_shortcut"]  # the 3×3 and 1×1 convolutions of the UNet's ResNet blocks
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def unet_lora_config(r: int = 4, lora_alpha: float | None = None, conv: bool = False,
                     extra_targets: list[str] | None = None, **kwargs) -> LoraConfig:
    """A ``LoraConfig`` for a diffusers ``UNet2DConditionModel``: LoRA on the attention projections
    (``to_q/to_k/to_v/to_out.0``, as diffusers' ``train_text_to_image_lora.py`` targets), plus the ResNet blocks'
    convolutions with ``conv=True``, plus any ``extra_targets`` (e.g. ``["proj_in", "proj_out", "conv_in"]``).
    ``lora_alpha`` defaults to ``r`` (scale 1, diffusers' convention); other keyword arguments go to ``LoraConfig``."""
    targets = list(ATTENTION_TARGETS) + (list(CONV_TARGETS) if conv else []) + list(extra_targets or [])
    return LoraConfig(r=r, lora_alpha=r if lora_alpha is None else lora_alpha, target_modules=targets, **kwargs)


def _exact(path: str) -> str:
    """A rank/alpha pattern key that matches the module ``path`` alone (PEFT and loratune read keys the same way)."""
    return f"^{re.escape(path)}$"


def _check_exportable(lora_model: LoraModel, adapter_name: str) -> LoraConfig:
    if adapter_name not in lora_model.peft_config:
        raise LoraTuneError(f"unknown adapter {adapter_name!r}; this model has {list(lora_model.peft_config)}")
    cfg = lora_model.peft_config[adapter_name]
    if getattr(cfg, "use_adalora", False):
        raise LoraTuneError(f"adapter {adapter_name!r} is AdaLoRA, whose singular values (lora_E) a diffusers LoRA "
                            "file cannot carry; train a plain LoRA for diffusers")
    if cfg.modules_to_save or cfg.bias != "none":
        raise LoraTuneError(f"adapter {adapter_name!r} trains more than LoRA factors (modules_to_save="
                            f"{cfg.modules_to_save}, bias={cfg.bias!r}); diffusers' LoRA files hold only lora_A/lora_B "
                            "tensors: train it with modules_to_save=None and bias='none', or save it with "
                            "save_pretrained() instead")
    init = cfg.init_lora_weights
    if getattr(cfg, "use_dora", False) or (isinstance(init, str) and init != "gaussian"):
        # DoRA's magnitudes are not written here; PiSSA/OLoRA/LoftQ inits change the base weights themselves, so
        # A and B alone would not reproduce the model on diffusers' unchanged base.
        raise LoraTuneError(f"adapter {adapter_name!r} uses {'DoRA' if getattr(cfg, 'use_dora', False) else init}, "
                            "which a diffusers LoRA file cannot carry on an unchanged base; train a plain LoRA "
                            "(use_dora=False, init_lora_weights=True or 'gaussian') for diffusers")
    return cfg


def _layers(lora_model: LoraModel, adapter_name: str) -> list[tuple[str, LoraLayer]]:
    found = [(p, m) for p, m in lora_model.model.named_modules()
             if isinstance(m, LoraLayer) and adapter_name in m.adapters]
    kinds = {type(m).__name__ for _, m in found if m.peft_keys != ("lora_A.weight", "lora_B.weight")}
    if kinds:
        raise LoraTuneError(f"adapter {adapter_name!r} has LoRA layers of kind {sorted(kinds)}, which diffusers' "
                            "UNet loader does not read; target Linear and Conv layers only")
    return found


def diffusers_state_dict(lora_model: LoraModel, adapter_name: str = "default",
                         prefix: str | None = UNET_PREFIX) -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name``'s factors under diffusers' keys: ``<prefix>.<module path>.lora_A.weight`` (no
    ``<prefix>.`` when ``prefix`` is None, as ``UNet2DConditionModel.save_lora_adapter`` writes them)."""
    _check_exportable(lora_model, adapter_name)
    lead = f"{prefix}." if prefix else ""
    out: dict[str, torch.Tensor] = {}
    for path, layer in _layers(lora_model, adapter_name):
        ad = layer.adapters[adapter_name]
        out[f"{lead}{path}.lora_A.weight"] = ad.lora_A.detach()
        out[f"{lead}{path}.lora_B.weight"] = ad.lora_B.detach()
    return out


def diffusers_lora_config(lora_model: LoraModel, adapter_name: str = "default") -> dict:
    """The PEFT ``LoraConfig`` (as a dict) that makes PEFT inside diffusers adapt exactly the modules loratune
    adapted, each with its own rank and alpha: targets by full path, layer filters resolved, and a rank/alpha
    pattern (anchored full paths) for every module that differs from the most common rank/alpha."""
    cfg = _check_exportable(lora_model, adapter_name)
    layers = _layers(lora_model, adapter_name)
    ranks = {p: m.adapters[adapter_name].r for p, m in layers}
    alphas = {p: m.adapters[adapter_name].lora_alpha for p, m in layers}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    d = cfg.to_dict()
    d.update(r=r, lora_alpha=alpha, target_modules=sorted(ranks), exclude_modules=None, layers_to_transform=None,
             layers_pattern=None, modules_to_save=None, task_type=None,
             rank_pattern={_exact(p): v for p, v in ranks.items() if v != r},
             alpha_pattern={_exact(p): v for p, v in alphas.items() if v != alpha})
    return d


def save_diffusers_lora(lora_model: LoraModel, save_directory: str | Path, adapter_name: str = "default",
                        prefix: str | None = UNET_PREFIX, weight_name: str = WEIGHT_NAME) -> Path:
    """Write adapter ``adapter_name`` of a LoRA-wrapped diffusers model (e.g. a UNet) as diffusers' LoRA file
    ``save_directory/weight_name`` (atomically), which ``pipe.load_lora_weights(save_directory)`` reads (with the
    default ``prefix="unet"``), or ``unet.load_lora_adapter(save_directory, prefix=None)`` with ``prefix=None``.
    Returns the file's path."""
    tensors = diffusers_state_dict(lora_model, adapter_name, prefix)
    config = diffusers_lora_config(lora_model, adapter_name)
    lead = f"{prefix}." if prefix else ""
    header = json.dumps({f"{lead}{k}": v for k, v in config.items()}, indent=2, sort_keys=True)
    path = Path(save_directory) / weight_name
    if Path(save_directory).is_file():
        raise LoraTuneError(f"{save_directory} is a file; give a directory for {weight_name}")
    try:
        save_tensors(tensors, path, metadata={"format": "pt", METADATA_KEY: header})
    except OSError as e:
        raise AdapterFileError(f"cannot write {path}: {e.strerror or e}; choose a writable directory") from None
    return path


def _file_of(path: Path, weight_name: str) -> Path:
    if path.is_dir():
        path = path / weight_name
    if not path.is_file():
        hint = " (only safetensors is read; convert a .bin file with diffusers first)" \
            if path.with_suffix(".bin").exists() else ""
        raise AdapterFileError(f"no diffusers LoRA file at {path}{hint}; pass the .safetensors file or the "
                               "directory that holds it (weight_name= names another file in it)")
    return path


def _header(path: Path) -> dict | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError) as e:
        raise AdapterFileError(f"{path} is not a readable safetensors file ({e}); copy it again") from None
    if not raw:
        return None
    try:
        found = json.loads(raw)
    except ValueError as e:
        raise AdapterFileError(f"{path}: its {METADATA_KEY} header is not JSON ({e}); re-save the LoRA") from None
    if not isinstance(found, dict):
        raise AdapterFileError(f"{path}: its {METADATA_KEY} header is not a JSON object; re-save the LoRA")
    return found


def _strip(d: dict, prefix: str | None) -> dict:
    """Entries under ``prefix.`` with it removed; a dict with no such entries (a component's own file, as
    ``save_lora_adapter`` writes it) as it is."""
    if not prefix:
        return d
    lead = f"{prefix}."
    if any(k.startswith(lead) for k in d):
        return {k[len(lead):]: v for k, v in d.items() if k.startswith(lead)}
    return d


def _peft_key(key: str) -> str:
    """PEFT's name for a key in diffusers' own layout, as its training scripts write it
    (``convert_state_dict_to_diffusers``): ``<m>.lora.down.weight`` is ``<m>.lora_A.weight``, ``.lora.up`` is
    ``lora_B``; the attention-processor layout ``<attn>.to_q_lora.down.weight`` is ``<attn>.to_q.lora_A.weight``
    (``to_out_lora``: ``to_out.0``; ``.processor.`` dropped). Other keys are returned unchanged."""
    key = key.replace(".processor.", ".")
    m = re.fullmatch(r"(.*?)(?:\.(to_q|to_k|to_v|to_out)_lora|\.lora)\.(down|up)\.weight", key)
    if m is None:
        return key
    module = m.group(1) + (f".{m.group(2)}" + (".0" if m.group(2) == "to_out" else "") if m.group(2) else "")
    return f"{module}.lora_{'A' if m.group(3) == 'down' else 'B'}.weight"


def _inferred_config(tensors: dict[str, torch.Tensor]) -> dict:
    """diffusers' reading of a file without a config header: rank from each B, alpha = rank (scale 1)."""
    ranks = {k[: -len(".lora_B.weight")]: v.shape[1] for k, v in tensors.items() if k.endswith(".lora_B.weight")}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {_exact(p): v for p, v in ranks.items() if v != r}
    return {"r": r, "lora_alpha": r, "target_modules": sorted(ranks), "rank_pattern": pattern,
            "alpha_pattern": dict(pattern)}


def read_diffusers_lora(path: str | Path, prefix: str | None = UNET_PREFIX,
                        weight_name: str = WEIGHT_NAME) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config and PEFT-keyed tensors (``base_model.model.<path>.lora_A.weight``) of the component ``prefix`` in
    a diffusers LoRA file (a file, or a directory holding ``weight_name``). Keys of other components (e.g.
    ``text_encoder.``) are left out; a file without ``prefix.`` keys is read as one component's file. Without a
    config header, alpha = rank for every module, as diffusers reads such files."""
    file = _file_of(Path(path), weight_name)
    tensors = _strip(read_tensors(file), prefix)
    if not tensors:
        raise AdapterFileError(f"{file} holds no tensors for {prefix!r}; pass the prefix of the component it adapts")
    tensors = {_peft_key(k): v for k, v in tensors.items()}
    odd = [k for k in tensors if not k.endswith(_LORA_SUFFIXES)]
    if odd:
        raise AdapterFileError(f"{file}: key {odd[0]!r} is not a LoRA factor loratune reads (<module>.lora_A.weight / "
                               ".lora_B.weight, or diffusers' .lora.down/.lora.up; DoRA, lora_bias and kohya/A1111 "
                               "layouts are not read): load it in diffusers and save it with save_lora_weights()")
    header = _header(file)
    settings = _strip(header, prefix) if header else _inferred_config(tensors)
    config = LoraConfig.from_dict(settings, source=f"{file} ({METADATA_KEY})")
    return config, {state.PREFIX + k: v for k, v in tensors.items()}


def load_diffusers_lora(model: nn.Module, path: str | Path, adapter_name: str = "default",
                        prefix: str | None = UNET_PREFIX, weight_name: str = WEIGHT_NAME,
                        is_trainable: bool = False) -> LoraModel:
    """Wrap ``model`` (e.g. a ``UNet2DConditionModel``) in a ``LoraModel`` holding the LoRA of a diffusers file
    (``read_diffusers_lora``), every key and shape checked. Frozen and in eval mode unless ``is_trainable``."""
    config, tensors = read_diffusers_lora(path, prefix, weight_name)
    lm = get_lora_model(model, config, adapter_name)
    try:
        state.load_adapter_state(lm.model, lm.peft_config[adapter_name], adapter_name, tensors, str(path))
    except Exception:
        lm.unload()  # leave ``model`` as it was given
        raise
    if not is_trainable:
        for p in lm.parameters():
            p.requires_grad_(False)
        lm.eval()
    return lm
