"""``loratune info DIR``: what an adapter directory holds (loratune's or PEFT's), read without loading a model.

Base model, rank/alpha/targets, variant (DoRA, initializer, rsLoRA), parameter count and file size (from the
safetensors header: no tensor is read), the run that made it (``run_config.yaml`` and ``metrics.jsonl`` beside
the adapter or in its parent folder), the saved system prompt, and, with ``--model``, whether it loads on that
base.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..adapters.files import CONFIG_NAME, QUANT_NAME, WEIGHTS_NAME, check_adapter_dir
from ..errors import AdapterFileError, LoraTuneError

PROMPT_NAME = "loratune_prompt.json"  # (training.loop.PROMPT_FILE: not imported, info stays light)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterFileError(f"{path} is not readable JSON ({str(e).splitlines()[0]}); re-copy the adapter") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} holds {type(data).__name__}, not a JSON object; re-copy the adapter")
    return data


def weights_summary(path: Path) -> dict:
    """Tensor count, parameter count, dtypes and file size of a safetensors file, from its header only."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
            dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in f.keys()})
    except (OSError, SafetensorError) as e:
        raise AdapterFileError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}); "
                               "re-copy the adapter") from None
    return {"tensors": len(shapes), "parameters": sum(math.prod(s) for s in shapes.values()),
            "dtypes": dtypes, "file_bytes": path.stat().st_size}


def run_summary(adapter: Path) -> dict | None:
    """The training run an adapter came from: its folder (the adapter's own, or its parent), config and metrics."""
    import yaml

    for run in (adapter, adapter.parent):
        if (run / "run_config.yaml").is_file():
            break
    else:
        return None
    try:
        config = yaml.safe_load((run / "run_config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise AdapterFileError(f"{run / 'run_config.yaml'} cannot be read ({str(e).splitlines()[0]})") from None
    out: dict = {"dir": str(run), "config": config}
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        rows = []
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a torn last line of a killed run
                continue
        train = [r for r in rows if isinstance(r, dict) and "loss" in r]
        evals = [r["eval_loss"] for r in rows if isinstance(r, dict) and "eval_loss" in r]
        if train:
            out["metrics"] = {"steps": train[-1].get("step"), "first_loss": train[0]["loss"],
                              "last_loss": train[-1]["loss"], "best_eval_loss": min(evals) if evals else None,
                              "last_eval_loss": evals[-1] if evals else None,
                              "tokens_per_s": train[-1].get("tokens_per_s")}
    return out


def describe(adapter: str | Path) -> dict:
    """Everything ``loratune info`` reports about the adapter in ``adapter``, as a JSON-ready dict."""
    d = Path(adapter)
    check_adapter_dir(d)
    cfg = _read_json(d / CONFIG_NAME) or {}
    prompt = _read_json(d / PROMPT_NAME)
    variant = "DoRA" if cfg.get("use_dora") else "LoRA"
    init = cfg.get("init_lora_weights", True)
    return {
        "adapter": str(d.resolve()),
        "peft_type": cfg.get("peft_type"),
        "task_type": cfg.get("task_type"),
        "base_model": cfg.get("base_model_name_or_path"),
        "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"),
        "target_modules": cfg.get("target_modules"),
        "rank_pattern": cfg.get("rank_pattern") or None, "alpha_pattern": cfg.get("alpha_pattern") or None,
        "modules_to_save": cfg.get("modules_to_save"),
        "variant": variant, "init_lora_weights": init, "use_rslora": bool(cfg.get("use_rslora")),
        "weights": weights_summary(d / WEIGHTS_NAME),
        "system_prompt": prompt.get("system_prompt") if prompt else None,
        "quantization": _read_json(d / QUANT_NAME),
        "tokenizer_saved": (d / "tokenizer_config.json").is_file(),
        "run": run_summary(d),
    }


def loads_on(adapter: str | Path, model: str) -> tuple[bool, str]:
    """(True, "") when the adapter loads on base ``model``; else (False, the one-line reason)."""
    from ..adapters import LoraModel
    from ..models import load_base_model

    try:
        base, _ = load_base_model(model)
        LoraModel.from_pretrained(base, adapter)
    except LoraTuneError as e:
        return False, str(e)
    return True, ""


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def cmd_info(args) -> int:
    info = describe(args.adapter)
    if args.model:
        ok, why = loads_on(args.adapter, args.model)
        info["loads_on"] = {"model": args.model, "ok": ok, "error": why or None}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    w = info["weights"]
    targets = info["target_modules"]
    lines = [
        ("adapter", info["adapter"]),
        ("base model", info["base_model"] or "(not recorded)"),
        ("type", f"{info['peft_type'] or '?'} {info['task_type'] or ''}".strip()),
        ("rank / alpha", f"r={info['r']} alpha={info['lora_alpha']}" + (" (rsLoRA)" if info["use_rslora"] else "")
         + (f", rank_pattern {info['rank_pattern']}" if info["rank_pattern"] else "")),
        ("targets", ", ".join(targets) if isinstance(targets, list) else str(targets)),
        ("variant", f"{info['variant']}, init {info['init_lora_weights']}"),
        ("parameters", f"{w['parameters']:,} in {w['tensors']} tensors ({', '.join(w['dtypes'])})"),
        ("file size", _fmt_bytes(w["file_bytes"])),
        ("system prompt", repr(info["system_prompt"]) if info["system_prompt"] is not None else "(none saved)"),
    ]
    if info["modules_to_save"]:
        lines.append(("also saved", ", ".join(info["modules_to_save"])))
    if info["quantization"]:
        lines.append(("base quantized", str(info["quantization"].get("quantize"))))
    run = info["run"]
    if run:
        cfg = run["config"] if isinstance(run["config"], dict) else {}
        train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
        keys = ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "scheduler", "seed")
        lines.append(("run", run["dir"]))
        lines.append(("  train", ", ".join(f"{k}={train[k]}" for k in keys if train.get(k) is not None)))
        data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
        if data.get("train"):
            lines.append(("  data", str(data["train"])))
        m = run.get("metrics")
        if m:
            ev = "" if m["best_eval_loss"] is None else f", eval loss best {m['best_eval_loss']:.4f}"
            lines.append(("  metrics", f"{m['steps']} steps, train loss {m['first_loss']:.4f} → "
                                       f"{m['last_loss']:.4f}{ev}"))
    if "loads_on" in info:
        lo = info["loads_on"]
        lines.append((f"loads on {lo['model']}", "yes" if lo["ok"] else f"no: {lo['error']}"))
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k:<{width}}  {v}")
    return 0
