"""The names users bring to a run config from transformers, PEFT, axolotl and LLaMA-Factory, and the key each
means here: consulted by ``config.py`` before the fuzzy match, so that an unknown key gets the valid name it most
likely means. Every target is a real key of its section (tests/training/test_run_config.py)."""

from __future__ import annotations

# Names users bring from transformers, PEFT, axolotl and LLaMA-Factory -> the key they mean here, per section.
# Consulted before the fuzzy match for unknown keys; every target is a real key of its section (tested).
SYNONYMS: dict[str, dict[str, str]] = {
    "model": {
        "model_name_or_path": "name", "base_model": "name", "path": "name", "pretrained_model_name_or_path": "name",
        "quantization": "quantize", "load_in_4bit": "quantize", "quant": "quantize",
        "bnb_4bit_compute_dtype": "compute_dtype", "bnb_4bit_quant_type": "quantize",
        "llm_int8_skip_modules": "quantize_skip_modules", "skip_modules": "quantize_skip_modules",
        "modules_to_not_convert": "quantize_skip_modules",
        "torch_dtype": "dtype", "precision": "dtype", "bf16": "dtype", "fp16": "dtype",
    },
    "train": {
        "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs", "n_epochs": "epochs",
        "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
        "train_batch_size": "batch_size", "per_device_eval_batch_size": "eval_batch_size",
        "gradient_accumulation_steps": "grad_accum", "gradient_accumulation": "grad_accum",
        "lr_scheduler_type": "scheduler", "lr_scheduler": "scheduler", "warmup_steps": "warmup_ratio",
        "grad_clip": "max_grad_norm", "gradient_clipping": "max_grad_norm", "clip_grad_norm": "max_grad_norm",
        "num_steps": "max_steps", "total_steps": "max_steps", "train_steps": "max_steps",
        "eval_steps": "eval_every", "save_steps": "save_every", "random_seed": "seed",
        "use_gradient_checkpointing": "gradient_checkpointing", "loraplus_ratio": "loraplus_lr_ratio",
        "device_map": "device", "torch_compile": "compile", "fsdp": "distributed", "ddp": "distributed",
        "strategy": "distributed",
    },
    "data": {
        "cutoff_len": "max_seq_len", "sequence_len": "max_seq_len", "max_length": "max_seq_len",
        "max_seq_length": "max_seq_len", "seq_len": "max_seq_len", "max_len": "max_seq_len",
        "model_max_length": "max_seq_len", "block_size": "max_seq_len",
        "dataset": "train", "train_file": "train", "train_path": "train", "path": "train",
        "eval_file": "eval", "validation_file": "eval", "val_file": "eval", "eval_dataset": "eval",
        "val_set_size": "eval_split", "val_size": "eval_split", "validation_split": "eval_split",
        "test_size": "eval_split", "sample_packing": "packing", "train_on_inputs": "train_on_prompt",
        "template": "chat_template", "system_message": "system_prompt", "system": "system_prompt",
        "type": "format",
    },
    "lora": {
        "rank": "r", "lora_r": "r", "lora_rank": "r", "target": "target_modules", "lora_target": "target_modules",
        "lora_target_modules": "target_modules", "lora_modules_to_save": "modules_to_save",
        "rslora": "use_rslora", "init_weights": "init_lora_weights",
    },
}
SECTION_SYNONYMS = {"base_model": "model", "model_name_or_path": "model", "dataset": "data", "datasets": "data",
                    "peft": "lora", "lora_config": "lora", "training": "train", "training_args": "train",
                    "trainer": "train", "output": "output_dir", "out_dir": "output_dir"}
