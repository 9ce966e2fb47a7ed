"""Checkpoints: ``checkpoints/step-N/`` holds the adapter, the optimizer, scheduler and RNG state, written whole or
not at all; never pickled."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..adapters.files import load_adapter_weights
from ..errors import AdapterFileError, LoraTuneError
from ..fsutil import atomic_dir, read_tensors, save_json, save_tensors

CHECKPOINTS = "checkpoints"


class TrainingError(LoraTuneError):
    """Training cannot go on (non-finite loss, mismatched checkpoint, occupied output dir)."""


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as safetensors-able tensors plus JSON (checkpoints are never pickled)."""
    sd = opt.state_dict()
    tensors = {f"{pid}.{k}": (v if torch.is_tensor(v) else torch.tensor(v))
               for pid, st in sd["state"].items() for k, v in st.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def save_checkpoint(out: Path, step: int, model, opt, sched, config_text: str) -> Path:
    """Write checkpoints/step-N of ``model`` (a LoraModel) whole or not at all (``fsutil.atomic_dir``)."""
    final = out / CHECKPOINTS / f"step-{step:07d}"
    try:
        with atomic_dir(final) as tmp:
            model.save_pretrained(tmp / "adapter")
            tensors, meta = _optimizer_tensors(opt)
            tensors["rng.torch"] = torch.get_rng_state()
            save_tensors(tensors, tmp / "trainer_state.safetensors")
            save_json({"step": step, "optimizer": meta, "scheduler": sched.state_dict(), "config": config_text},
                      tmp / "trainer_state.json")
    except (OSError, AdapterFileError) as e:  # a full disk, say: the temp dir is gone, older checkpoints stand
        last = latest_checkpoint(out)
        raise TrainingError(f"could not write checkpoint {final.name} ({getattr(e, 'strerror', None) or e}); free "
                            "disk space and run the same command again: it resumes from "
                            + (last.name if last else "the start")) from None
    return final


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


def load_checkpoint(ckpt: Path, model, opt, sched, config_text: str) -> int:
    """Restore ``model`` (a LoraModel), optimizer, scheduler and RNG from ``ckpt``; returns its step."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if state["config"] != config_text:
        raise TrainingError(f"checkpoint {ckpt} was made with a different config; run with --overwrite to "
                            "start over, or restore the config it was made with")
    load_adapter_weights(model, ckpt / "adapter", "default")
    tensors = read_tensors(ckpt / "trainer_state.safetensors")
    sd = {"state": {}, "param_groups": state["optimizer"]["param_groups"]}
    for key, v in tensors.items():
        if key == "rng.torch":
            continue
        pid, name = key.split(".", 1)
        sd["state"].setdefault(int(pid), {})[name] = v
    opt.load_state_dict(sd)
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(state["step"])
