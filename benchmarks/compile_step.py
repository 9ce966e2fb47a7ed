"""loratune's training step with ``train.compile`` off and on: time per step, compile time, and the loss it gives.

Two copies of loratune's LoRA model on one shared copy of the base weights, with the same adapter weights: one eager,
one with every decoder layer compiled by ``loratune.training.compiled.compile_layers`` (inductor, what
``train.compile: true`` runs). The step is ``causal_lm_loss(model, ...)`` + backward (no optimizer), on a fixed
random batch. The compiled model's first steps pay the compile; that is reported on its own (the first two compiled
steps' times). By default the compile is cold: inductor's on-disk caches (FX graphs, AOT autograd) are off and its
cache directory (built C++ kernels) is a new empty one for each config, as on a machine's first run;
``--warm-cache`` leaves them as they are, as on a later run of the same shapes. Then both steps are timed
interleaved (the order alternating) over ``--repeats``; the ratio is the median over repeats of compiled/eager
within each repeat (a shared machine's speed drifts, and moves steps run seconds apart together), for wall time and
for the process's CPU time (all threads): on a machine loaded by others, wall time includes waiting for a core and
CPU time does not (it does include OpenMP threads' spin-waits). The load average is printed before and after: on a
loaded machine, quote the ratios, not the times.

Also checked, at dropout 0: the compiled step's loss and adapter gradients against eager's (at dropout > 0 the
compiled model draws one mask per module where eager siblings share one, so the values differ by design:
docs/compile.md).

    python benchmarks/compile_step.py                          # bundled SmolLM2-135M, 4×128, two configs
    python benchmarks/compile_step.py --model tiny --repeats 9  # a small config-built Llama (loaded machine)
    python benchmarks/compile_step.py --json benchmarks/results/compile_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

CONFIGS = {
    "all-linear r16 dropout0.05": dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"),
    "all-linear r16 dropout0": dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
}
# A Llama with SmolLM2-135M's shapes per layer, fewer layers and a smaller vocabulary: a step a loaded 2-core
# machine can repeat many times; the per-layer work (what compile changes) is the bundled model's.
TINY = dict(vocab_size=8192, hidden_size=576, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)


def load_base(name: str):
    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**TINY))
    from loratune import load_base_model

    return load_base_model(name)[0]


def build(cfg: dict, base_name: str):
    """(eager, compiled-to-be) loratune models on one copy of the base weights, with identical non-zero adapters."""
    from loratune import LoraConfig, get_lora_model

    bases = [load_base(base_name) for _ in range(2)]
    for (name, p), (other, q) in zip(bases[0].named_parameters(), bases[1].named_parameters(), strict=True):
        assert name == other
        q.data = p.data  # one copy of the weights: placement alone moves a step by several per cent
    models = []
    for base in bases:
        torch.manual_seed(0)
        models.append(get_lora_model(base, LoraConfig(**cfg, init_lora_weights=False)).train())
    return models


def step(model, batch) -> float:
    from loratune.ops import causal_lm_loss

    loss = causal_lm_loss(model, *batch)
    loss.backward()
    return loss.item()


def timed(model, batch) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process, all threads) of one step."""
    start, cpu = time.perf_counter(), time.process_time()
    step(model, batch)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    for p in model.parameters():
        p.grad = None
    return elapsed, cpu


def paired(a: list[float], b: list[float]) -> tuple[float, list[float]]:
    """The median of a/b within each repeat and its quartiles."""
    ratios = [x / y for x, y in zip(a, b)]
    if len(ratios) < 2:
        return ratios[0], [ratios[0], ratios[0]]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, [q1, q3]


def grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def parity(eager, compiled, batch) -> dict:
    """Loss and adapter gradients of one step, compiled against eager (same weights, same batch)."""
    le, ge = step(eager, batch), grads(eager)
    lc, gc = step(compiled, batch), grads(compiled)
    for m in (eager, compiled):
        for p in m.parameters():
            p.grad = None
    rel = max(((a - b).norm() / b.norm()).item() for a, b in zip(gc, ge) if b.norm() > 0)
    return {"loss_eager": le, "loss_compiled": lc, "loss_rel_diff": abs(lc - le) / abs(le), "grad_rel_diff": rel}


def bench(name: str, cfg: dict, args) -> dict:
    from torch._dynamo.utils import counters

    from loratune.training.compiled import compile_layers

    torch._dynamo.reset()
    counters.clear()
    if not args.warm_cache:  # a new empty cache directory: the kernels' C++ is compiled afresh (inductor reads it late)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile_step_inductor_")
    eager, compiled = build(cfg, args.model)
    vocab = eager.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    batch = (ids, torch.ones_like(ids), ids.clone())
    timed(eager, batch)  # warm: kernels built, allocator grown
    layers = compile_layers(compiled)
    first = [timed(compiled, batch)[0] for _ in range(2)]  # the compile, forward and backward graphs
    eager_times, compiled_times = [], []
    for r in range(args.repeats):
        pair = [(eager, eager_times), (compiled, compiled_times)]
        for model, times in pair if r % 2 == 0 else pair[::-1]:
            times.append(timed(model, batch))
    wall = [t[0] for t in eager_times], [t[0] for t in compiled_times]
    cpu = [t[1] for t in eager_times], [t[1] for t in compiled_times]
    ratio, quartiles = paired(wall[1], wall[0])
    cpu_ratio, cpu_quartiles = paired(cpu[1], cpu[0])
    out = {
        "config": name, "layers_compiled": layers,
        "graph_breaks": sum(counters["graph_break"].values()), "graphs": counters["stats"]["unique_graphs"],
        "first_compiled_steps_s": first, "eager_median_s": statistics.median(wall[0]),
        "compiled_median_s": statistics.median(wall[1]), "compiled_over_eager": ratio, "ratio_quartiles": quartiles,
        "cpu_compiled_over_eager": cpu_ratio, "cpu_ratio_quartiles": cpu_quartiles,
        "eager_s": wall[0], "compiled_s": wall[1], "eager_cpu_s": cpu[0], "compiled_cpu_s": cpu[1],
    }
    if cfg["lora_dropout"] == 0:
        out.update(parity(eager, compiled, batch))
    if not args.warm_cache:
        shutil.rmtree(os.environ.pop("TORCHINDUCTOR_CACHE_DIR"), ignore_errors=True)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="a bundled model's name, an HF folder, or 'tiny' (SmolLM2's layer shapes, 6 layers)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS), metavar="CONFIG",
                    help=f"any of {list(CONFIGS)}")
    ap.add_argument("--warm-cache", action="store_true",
                    help="leave inductor's on-disk caches on (default: off, so the compile time is a cold one)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1 (medians need a timing)")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        ap.error(f"--json {args.json}: its directory does not exist (create it first)")
    from loratune.errors import LoraTuneError
    from loratune.models import BUNDLED, resolve_model_path

    if args.model != "tiny" and args.model not in BUNDLED:  # (checked now, not after minutes of eager steps)
        try:
            resolve_model_path(args.model)
        except LoraTuneError as e:
            ap.error(f"--model: {e}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.warm_cache:
        from torch._functorch import config as aot_config
        from torch._inductor import config as inductor_config

        inductor_config.fx_graph_cache = False
        aot_config.enable_autograd_cache = False
    load_before = os.getloadavg()
    print(f"torch {torch.__version__}, {args.threads} threads, {args.model} {args.batch}×{args.seq}, "
          f"load average {load_before[0]:.1f}", flush=True)
    results = []
    for name in args.configs:
        r = bench(name, CONFIGS[name], args)
        results.append(r)
        line = (f"{name}: eager {1e3 * r['eager_median_s']:.0f} ms, compiled {1e3 * r['compiled_median_s']:.0f} ms, "
                f"compiled/eager {r['compiled_over_eager']:.3f} [{r['ratio_quartiles'][0]:.3f}, "
                f"{r['ratio_quartiles'][1]:.3f}] (CPU time: {r['cpu_compiled_over_eager']:.3f} "
                f"[{r['cpu_ratio_quartiles'][0]:.3f}, {r['cpu_ratio_quartiles'][1]:.3f}]); first compiled steps "
                f"{r['first_compiled_steps_s'][0]:.1f} s, {r['first_compiled_steps_s'][1]:.1f} s; "
                f"graph breaks {r['graph_breaks']}, graphs {r['graphs']}")
        if "loss_rel_diff" in r:
            line += f"; loss rel diff {r['loss_rel_diff']:.1e}, grads {r['grad_rel_diff']:.1e}"
        print(line, flush=True)
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.1f} (1 min), {load_after[1]:.1f} (5 min)")
    if args.json:
        from loratune.fsutil import atomic_write

        doc = {"args": vars(args), "torch": torch.__version__, "cpu_count": os.cpu_count(),
               "load_average_before": load_before, "load_average_after": load_after, "results": results}
        atomic_write(args.json, lambda tmp: open(tmp, "w").write(json.dumps(doc, indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
