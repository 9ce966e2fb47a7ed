"""Checkpoints: ``checkpoints/step-N/`` holds the adapter, the optimizer, scheduler and RNG state, written whole or
not at all; never pickled."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from ..adapters.files import load_adapter_weights
from ..errors import AdapterFileError, LoraTuneError
from ..fsutil import atomic_dir, read_tensors, save_json, save_tensors
from .config import LORA_SHORT, lora_defaults

CHECKPOINTS = "checkpoints"


class TrainingError(LoraTuneError):
    """Training cannot go on (non-finite loss, mismatched checkpoint, occupied output dir)."""


def _optimizer_tensors(opt: torch.optim.Optimizer, state: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as safetensors-able CPU tensors plus JSON (checkpoints are never pickled, and load on any
    device); ``state``: the per-parameter state to write instead of the optimizer's own (gathered whole, FSDP)."""
    sd = opt.state_dict()
    tensors = {f"{pid}.{k}": (v.detach().cpu() if torch.is_tensor(v) else torch.tensor(v))
               for pid, st in (sd["state"] if state is None else state).items() for k, v in st.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def save_checkpoint(out: Path, step: int, model, opt, sched, config_text: str,
                    optimizer_state: dict | None = None, rng: list[dict[str, torch.Tensor]] | None = None,
                    hook_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoints/step-N of ``model`` (a LoraModel) whole or not at all (``fsutil.atomic_dir``).

    Every tensor is written from the CPU: a checkpoint made on a GPU resumes on any device. ``rng``: the random
    generators' states of every process by rank (``distributed.rng_states``; default: this process's), the CUDA
    generator's beside the CPU's where CUDA is in use (dropout on a GPU draws from it)."""
    final = out / CHECKPOINTS / f"step-{step:07d}"
    try:
        with atomic_dir(final) as tmp:
            model.save_pretrained(tmp / "adapter")
            tensors, meta = _optimizer_tensors(opt, optimizer_state)
            for r, states in enumerate(rng or [_own_rng()]):
                for key, state in states.items():
                    tensors[f"rng.{key}" + (f".rank{r}" if r else "")] = state
            for key, t in (hook_state or {}).items():  # a variant's training state (AdaLoRA's allocator)
                tensors[f"hooks.{key}"] = t
            save_tensors(tensors, tmp / "trainer_state.safetensors")
            save_json({"step": step, "optimizer": meta, "scheduler": sched.state_dict(), "config": config_text},
                      tmp / "trainer_state.json")
    except (OSError, AdapterFileError) as e:  # a full disk, say: the temp dir is gone, older checkpoints stand
        last = latest_checkpoint(out)
        raise TrainingError(f"could not write checkpoint {final.name} ({getattr(e, 'strerror', None) or e}); free "
                            "disk space and run the same command again: it resumes from "
                            + (last.name if last else "the start")) from None
    return final


def load_hook_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The variant training state ``save_checkpoint(hook_state=)`` stored (empty for plain LoRA)."""
    tensors = read_tensors(ckpt / "trainer_state.safetensors")
    return {k[len("hooks."):]: v for k, v in tensors.items() if k.startswith("hooks.")}


def _own_rng() -> dict[str, torch.Tensor]:
    own = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        own["cuda"] = torch.cuda.get_rng_state()
    return own


def prune_checkpoints(out: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (each one this run wrote under checkpoints/)."""
    done = sorted(p for p in (out / CHECKPOINTS).glob("step-*") if (p / "trainer_state.json").is_file())
    for old in done[:-max(1, keep)]:
        shutil.rmtree(old)


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove what a killed write left behind: ``atomic_dir``'s temp and set-aside directories of this run's
    checkpoints and adapter (their names are loratune's own: ``.step-N.tmp-*``, ``.adapter.old-*``). Returns them."""
    stale = [*(out / CHECKPOINTS).glob(".step-*.tmp-*"), *(out / CHECKPOINTS).glob(".step-*.old-*"),
             *out.glob(".adapter.tmp-*"), *out.glob(".adapter.old-*")]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in (out / CHECKPOINTS).glob("step-*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


LENGTH_KEYS = ("train.max_steps", "train.epochs")  # a run that differs only here extends (or is) the same run


def flat_config(text: str) -> dict:
    """A dumped run config as ``{"train.lr": 0.001, ...}``, every LoRA setting spelled out (so that ``lora.r=16``
    given is the default it equals, and a change reads ``16 -> 8``)."""
    def flat(d, prefix=""):
        for k, v in (d or {}).items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    d = dict(flat(yaml.safe_load(text)))
    for k in [k for k in d if k.startswith("lora.")]:  # lora.alpha is lora.lora_alpha; a key not given, its default
        d[f"lora.{LORA_SHORT.get(k[5:], k[5:])}"] = d.pop(k)
    return d | {f"lora.{k}": v for k, v in lora_defaults().items() if f"lora.{k}" not in d}


def config_diff(old_text: str, new_text: str) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` for the keys whose values differ between two dumped run configs, sorted by key; empty
    when they mean the same run (a key one of them lacks counts as null: a config written before a key with a null
    default existed is the same run)."""
    if old_text == new_text:
        return {}
    old, new = flat_config(old_text), flat_config(new_text)
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def length_only(diff: dict[str, tuple[Any, Any]]) -> bool:
    """True when a ``config_diff`` is non-empty and only in the run's length (train.max_steps, train.epochs): the
    new config extends the old run, which continues from its last checkpoint with its schedule recomputed."""
    return bool(diff) and diff.keys() <= set(LENGTH_KEYS)


def check_checkpoint(ckpt: Path, config_text: str) -> dict:
    """``ckpt``'s trainer state, refused (TrainingError) if it was made with another config (one that differs only
    in the run's length is this run, extended)."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    diff = config_diff(state["config"], config_text)
    if diff and not length_only(diff):
        raise TrainingError(f"checkpoint {ckpt} was made with a different config; run with --overwrite to "
                            "start over, or restore the config it was made with")
    return state


def load_checkpoint(ckpt: Path, model, opt, sched, config_text: str, adapter: bool = True,
                    place: Callable[[list, dict], None] | None = None, rank: int = 0) -> int:
    """Restore ``model`` (a LoraModel; unless ``adapter`` is False: already loaded), optimizer, scheduler and RNG
    from ``ckpt``; returns its step. Tensors go to the device of the parameter they belong to; ``place(params,
    state)`` may turn them into shards first (FSDP). Process ``rank`` takes its own generators' states (rank 0's
    where the checkpoint has none for it: it was made with fewer processes)."""
    state = check_checkpoint(ckpt, config_text)
    if adapter:
        load_adapter_weights(model, ckpt / "adapter", "default")
    tensors = read_tensors(ckpt / "trainer_state.safetensors")
    sd = {"state": {}, "param_groups": state["optimizer"]["param_groups"]}
    for key, v in tensors.items():
        if key.startswith(("rng.", "hooks.")):
            continue
        pid, name = key.split(".", 1)
        sd["state"].setdefault(int(pid), {})[name] = v
    if place is not None:
        place([p for g in opt.param_groups for p in g["params"]], sd["state"])
    opt.load_state_dict(sd)
    sched.load_state_dict(state["scheduler"])
    def own(key: str) -> torch.Tensor | None:
        return tensors.get(f"{key}.rank{rank}" if rank else key, tensors.get(key))

    torch.set_rng_state(own("rng.torch"))
    if own("rng.cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(own("rng.cuda"))
    return int(state["step"])
