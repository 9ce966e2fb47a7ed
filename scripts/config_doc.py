"""Write docs/config.md: every run-config key, its type and default read from the config's own dataclasses (the one
source of truth for names and defaults), with a line on what it does.

    python3 scripts/config_doc.py > docs/config.md

tests/training/test_config_doc.py fails when the page is stale or a key has no description here.
"""

from __future__ import annotations

import dataclasses
import typing

import yaml

from loratune.adapters.config import LoraConfig
from loratune.data import DataConfig
from loratune.training.config import AUTO_KEYS, LORA_DEFAULTS, LORA_SHORT, TASK_TYPES, RunConfig
from loratune.training.sections import ModelConfig, TrainConfig

TOP = {
    "task": f"what is trained: {' or '.join(TASK_TYPES)} (an encoder with a label head, docs/classification.md)",
    "output_dir": "the run's directory: run_config.yaml, metrics, checkpoints, adapter/, loss_curve.png",
}
MODEL = {
    "name": "a bundled name, an HF model directory, a .gguf file or a hub id (offline: read from the HF cache); "
            "`model: NAME` is short for `model: {name: NAME}`",
    "dtype": "precision of the frozen base: float32, bfloat16, float16 or auto (bfloat16 where it is fast); "
             "adapters stay float32",
    "quantize": "nf4: the base's linears in 4-bit NormalFloat (QLoRA, docs/qlora.md)",
    "compute_dtype": "the dtype NF4 layers compute in: float32 or bfloat16",
    "quantize_skip_modules": "modules kept in full precision besides the output head",
}
DATA = {
    "train": "the training file: .jsonl, .json, .csv or .parquet (required)",
    "eval": "a held-out file for eval loss and exact match",
    "eval_split": "without `eval`, this share of the cleaned train rows is held out (by the seed); auto (the "
                  "default): 10 %, at least 32, at most 500 and a fifth of the rows, none below 100 rows",
    "format": "auto (detected from the columns) or prompt_completion, alpaca, messages, sharegpt, text",
    "max_seq_len": "longest row in tokens (cut to the model's positions, with a note)",
    "packing": "pack several short rows into one sequence (attention kept within each row)",
    "train_on_prompt": "also train on prompt tokens (default: only on answers)",
    "overlength": "rows longer than max_seq_len: drop or truncate",
    "chat_template": "a Jinja template, or the path of a file holding one, instead of the tokenizer's",
    "system_prompt": "prepended to rows without a system message; saved with the adapter for eval/generate/chat",
    "text_column": "task classification: the column holding the text",
    "text_pair_column": "task classification: a second text column (sentence pairs)",
    "label_column": "task classification: the column holding the label (strings or integers)",
}
TRAIN = {
    "epochs": "passes over the data, or auto (the default when max_steps is not set either): 3 passes, 800 to "
              "16 000 row-passes, early stopping (docs/defaults.md); max_steps wins when both are set",
    "max_steps": "optimizer steps",
    "batch_size": "rows per micro-batch and process",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "learning rate (AdamW), or auto (the default): a short search on the training data before the run "
          "(docs/defaults.md)",
    "scheduler": "cosine, linear or constant, after warmup",
    "warmup_ratio": "share of the steps spent warming the rate up, in [0, 1)",
    "weight_decay": "AdamW's decoupled weight decay",
    "max_grad_norm": "gradient clipping norm (0: none)",
    "gradient_checkpointing": "recompute activations in backward (less memory, slower)",
    "seed": "seeds data order, adapter init, dropout and the eval split",
    "eval_every": "steps between evaluations (0: only at the end; with epochs auto, about ten a run)",
    "save_every": "steps between checkpoints (0: only the last step)",
    "loraplus_lr_ratio": "LoRA+: B learns this many times faster than A",
    "keep_checkpoints": "newest checkpoints kept (the last is always kept)",
    "eval_batch_size": "rows per batch in evaluation",
    "max_new_tokens": "tokens generated per row for exact match",
    "device": "auto, cpu, cuda, cuda:N or mps",
    "distributed": "under torchrun: ddp (adapters replicated) or fsdp (FSDP2, the base sharded per layer)",
    "compile": "torch.compile each decoder layer (inductor)",
    "report_to": "trackers besides metrics.jsonl: tensorboard, wandb (offline), mlflow (local store); none",
    "class_weights": "task classification: null, balanced, or one weight per label",
    "early_stopping_patience": "evaluations without a better eval loss before the run stops (0: never; default 3 "
                               "with epochs auto, else 0)",
    "early_stopping_threshold": "how far the best eval loss must fall (nats per token, from where it last counted) "
                                "to count as progress for the patience (default 1e-3 with epochs auto, else 0: any "
                                "drop)",
    "load_best": "the final adapter is the best evaluation's (default: true with epochs auto, else false)",
}
LORA = {
    "r": "rank", "lora_alpha": "scale α (s = α/r, or α/√r with use_rslora); short name `alpha`",
    "lora_dropout": "dropout on the adapter's input; short name `dropout`",
    "target_modules": "all-linear, a list of names or dotted suffixes, or a full-match regex",
    "exclude_modules": "modules never adapted (same forms as target_modules)",
    "bias": "none, all or lora_only: which biases train",
    "fan_in_fan_out": "the base stores (in, out) weights (GPT-2's Conv1D; set automatically)",
    "use_rslora": "s = α/√r (rank-stabilized LoRA)",
    "init_lora_weights": "true, gaussian, false, pissa, pissa_niter_K, olora or loftq (docs/variants.md)",
    "use_dora": "DoRA: a trained magnitude per output (docs/variants.md)",
    "loftq_config": "with init_lora_weights=loftq: {loftq_bits: 4, loftq_iter: N}",
    "layers_to_transform": "only these layer indices (with layers_pattern)",
    "layers_pattern": "the name of the layer list that layers_to_transform indexes",
    "rank_pattern": "per-module ranks, {regex: r}", "alpha_pattern": "per-module alphas, {regex: alpha}",
    "modules_to_save": "modules trained in full and saved with the adapter (e.g. a classification head)",
    "task_type": "PEFT's task type (set from `task`)",
    "base_model_name_or_path": "the base the adapter records (set by the run: a path PEFT resolves)",
    "use_adalora": "AdaLoRA: SVD-form adapters whose ranks are reallocated in training (docs/variants.md)",
    "target_r": "AdaLoRA: average rank at the end", "init_r": "AdaLoRA: rank at the start",
    "tinit": "AdaLoRA: steps before ranks are pruned", "tfinal": "AdaLoRA: final steps with ranks fixed",
    "deltaT": "AdaLoRA: steps between reallocations", "beta1": "AdaLoRA: smoothing of the sensitivity",
    "beta2": "AdaLoRA: smoothing of the uncertainty", "orth_reg_weight": "AdaLoRA: orthogonality penalty weight",
    "total_step": "AdaLoRA: the run's steps (default: taken from the run)",
}
SECTIONS = [("model", ModelConfig, MODEL), ("data", DataConfig, DATA), ("train", TrainConfig, TRAIN),
            ("lora", LoraConfig, LORA)]


def _type(hint) -> str:
    text = str(hint).replace("typing.", "").replace("NoneType", "None")
    return text.replace("<class '", "").replace("'>", "").replace(" | ", " or ")


def _default(cls, f: dataclasses.Field, section: str):
    if section == "lora" and f.name in LORA_DEFAULTS:
        return LORA_DEFAULTS[f.name]  # the run config's own defaults, not LoraConfig's (PEFT's)
    if f"{section}.{f.name}" in AUTO_KEYS and section != "train":
        return "auto"  # filled in by build_run_config for a causal-LM run (TrainConfig's own default says auto)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


def _cell(value) -> str:
    return "`" + yaml.safe_dump(value, default_flow_style=True, width=10_000).removesuffix("...\n").strip() + "`"


def render() -> str:
    """The whole page, as scripts/config_doc.py prints it."""
    short = {full: s for s, full in LORA_SHORT.items()}
    out = ["# Run-config keys", "",
           "Generated from the config's dataclasses by `python3 scripts/config_doc.py > docs/config.md` (a test keeps",
           "it current). Any key may be given in the YAML file or as a `section.key=value` override; unknown keys",
           "are refused with the closest valid name. Top level: " + "; ".join(
               f"`{k}` (default {_cell(getattr(RunConfig, k))}): {v}" for k, v in TOP.items()) + ".", ""]
    for section, cls, text in SECTIONS:
        hints = typing.get_type_hints(cls)
        out += [f"## {section}", "", "| key | type | default | what it does |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            name = f"`{f.name}`" + (f" (`{short[f.name]}`)" if f.name in short else "")
            out.append(f"| {name} | {_type(hints[f.name])} | {_cell(_default(cls, f, section))} | "
                       f"{text.get(f.name, 'MISSING')} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
