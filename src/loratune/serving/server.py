"""``Server``: one base model, its adapter registry, the engine and the scheduler, and prompt building per model."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from ..errors import LoraTuneError
from .engine import Engine
from .protocol import Parsed
from .registry import AdapterRegistry, ServingError
from .scheduler import Scheduler, Sequence

DESIGN = "v3"  # the default ``Server(design=)``; benchmarks/serving_client.py sets "v1"/"v2" to run earlier designs
DESIGNS = ("v1", "v2", "v3")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class Server:
    """Everything behind the HTTP routes; ``start()`` starts the scheduler's thread, ``stop()`` ends it."""

    def __init__(self, model: nn.Module, tokenizer, base_id: str, *, root: str | Path | None = None,
                 adapters: dict[str, str | Path] | None = None, max_loras: int = 8, max_cpu_loras: int | None = None,
                 max_lora_rank: int = 16, max_batch: int = 32, max_batch_tokens: int = 16384,
                 policy: str = "continuous", base_root: str | None = None, design: str | None = None,
                 adapter_loaders: int = 1):
        """``design``: "v3" (default: v2 with cold adapters read by ``adapter_loaders`` loader threads while decoding
        goes on), "v2" (fast mixed paths, batched prefill, cold adapters read on the scheduler's thread) or "v1" (the
        first design); the earlier two are kept as the benchmark's contestants, the module's ``DESIGN`` gives the
        default. ``adapter_loaders=0`` makes v3 read on the scheduler's thread, as v2."""
        design = design or DESIGN
        if design not in DESIGNS:
            raise LoraTuneError(f"design must be one of {', '.join(DESIGNS)}, got {design!r}")
        if adapter_loaders < 0:
            raise LoraTuneError(f"--adapter-loaders must be 0 or more, got {adapter_loaders}")
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model, self.tok, self.base_id = model, tokenizer, base_id
        self.base_root = base_root or getattr(getattr(model, "config", None), "_name_or_path", None) or base_id
        self.registry = AdapterRegistry(model, root, adapters, max_loras, max_cpu_loras, max_lora_rank)
        if base_id in self.registry.paths:
            raise LoraTuneError(f"an adapter is named '{base_id}', the base model's id; rename its folder")
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or getattr(model.config, "n_positions",
                                                                                          2048))
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        fast = design != "v1"
        self.scheduler = Scheduler(Engine(model, self.registry, fast=fast), self.registry, tokenizer, self.eos,
                                   max_batch, max_batch_tokens, policy, batch_prefill=fast,
                                   loader_threads=adapter_loaders if design == "v3" else 0)
        self.design = design
        self.created = int(time.time())

    def start(self) -> Server:
        self.scheduler.start()
        return self

    def stop(self) -> None:
        self.scheduler.stop()

    # --- models --------------------------------------------------------------------------------------
    def models(self) -> list[dict]:
        card = {"object": "model", "created": self.created, "owned_by": "loratune", "max_model_len": self.context,
                "permission": []}
        out = [{"id": self.base_id, **card, "root": str(self.base_root), "parent": None}]
        for name in self.registry.names():
            out.append({"id": name, **card, "root": str(self.registry.paths.get(name, "")), "parent": self.base_id})
        return out

    def adapter_for(self, model: str) -> str | None:
        """None for the base's id, else the adapter's name; 404 if neither."""
        if model == self.base_id:
            return None
        if model not in self.registry.paths:
            raise ServingError(f"The model `{model}` does not exist.", status=404, param="model")
        return model

    # --- prompts -------------------------------------------------------------------------------------
    def prompt_ids(self, req: Parsed, adapter: str | None) -> list[int]:
        """Token ids of the request's prompt; chat uses the adapter's saved chat template and system prompt."""
        if req.messages is None:
            return list(self.tok(req.prompt)["input_ids"])
        template = prompt = None
        if adapter is not None:
            host = self.registry.host_adapter(adapter)  # (loads it on demand: a broken file fails this request)
            template, prompt = host.chat_template, host.system_prompt
        messages = req.messages
        if prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": prompt}, *messages]
        template = template or getattr(self.tok, "chat_template", None)
        if not template:
            return list(self.tok("\n".join(m["content"] for m in messages))["input_ids"])
        try:
            ids = self.tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        except Exception as e:
            raise ServingError(f"the chat template cannot render these messages: {e}", param="messages") from None
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    def submit(self, req: Parsed, emit) -> tuple[Sequence, int]:
        """Validate against the model, queue the request; (sequence, prompt tokens)."""
        adapter = self.adapter_for(req.model)
        ids = self.prompt_ids(req, adapter)
        if not ids:
            raise ServingError("the prompt is empty after tokenization", param="prompt")
        if len(ids) + req.sampling.max_tokens > self.context:
            raise ServingError(f"this model's context is {self.context} tokens; the prompt has {len(ids)} and "
                               f"max_tokens is {req.sampling.max_tokens} (lower max_tokens or shorten the prompt)",
                               param="max_tokens" if len(ids) < self.context else "prompt")
        seq = Sequence(ids, adapter, req.sampling, emit)
        self.scheduler.submit(seq)
        return seq, len(ids)

    def metrics(self) -> str:
        """Prometheus text exposition of the counters."""
        c, r = self.scheduler.counters, self.registry
        rows = [("requests_total", "counter", "requests accepted", c.requests),
                ("requests_finished_total", "counter", "requests finished", c.finished),
                ("requests_failed_total", "counter", "requests that failed", c.failed),
                ("prompt_tokens_total", "counter", "prompt tokens prefilled", c.prompt_tokens),
                ("generation_tokens_total", "counter", "tokens generated", c.completion_tokens),
                ("decode_steps_total", "counter", "batched decode steps", c.steps),
                ("queue_length", "gauge", "requests waiting", self.scheduler.queue_length()),
                ("running_sequences", "gauge", "sequences in the running batch", len(self.scheduler.active)),
                ("resident_adapters", "gauge", "adapters in device slots", r.resident()),
                ("host_adapters", "gauge", "adapters loaded in host memory", len(r.host)),
                ("registered_adapters", "gauge", "adapters that requests may name", len(r.paths)),
                ("adapter_loads_total", "counter", "adapter files read", r.stats.loads),
                ("adapter_reads_pending", "gauge", "adapter reads queued or under way on the loader threads",
                 self.scheduler.loader.pending() if self.scheduler.loader is not None else 0),
                ("adapter_swaps_total", "counter", "adapters copied into a slot", r.stats.swaps),
                ("adapter_evictions_total", "counter", "adapters evicted from a slot", r.stats.evictions)]
        lines = []
        for name, kind, help_, value in rows:
            lines += [f"# HELP loratune_{name} {help_}", f"# TYPE loratune_{name} {kind}", f"loratune_{name} {value}"]
        return "\n".join(lines) + "\n"
