"""Time and memory of one LoRA training step (forward + backward, no optimizer) against its floor and PEFT.

On the bundled SmolLM2-135M (fp32) with a fixed random batch, in one process, for each LoRA configuration:

* floor:    the frozen model's forward + backward to the input embeddings (inputs_embeds.requires_grad), with
            transformers' own ``labels=`` loss (floor_chunked: the same with loratune's chunked loss;
            floor_fused: also with loratune's fused RMSNorm and SwiGLU, ``ops/blocks.py``: loratune at rank 0, so
            loratune/floor_fused is what the LoRA layers themselves cost);
* loratune: loratune's step: ``causal_lm_loss(lora_model, ...)`` (fused LoRA linears, chunked loss) + backward;
* PEFT:     PEFT's step with the same LoRA config and the same adapter weights: ``model(labels=...).loss.backward()``.

loratune runs its matrix products on oneDNN instead of torch's MKL on CPUs where that is faster (AVX-512, not
Intel: ``src/loratune/ops/gemm.py``), and the stock floor never does. So that the LoRA layers' own cost and the
routing's share both stay visible, more contestants are timed:
* floor_onednn:    the frozen model with the adapted linears' products on oneDNN, and loratune's loss: loratune at
                   rank 0 on oneDNN, so loratune_onednn/floor_onednn is what the adapters themselves cost there
                   (on MKL, loratune_mkl/floor_fused is);
* loratune_onednn, loratune_mkl: loratune's step with the routing forced on and off (``LORATUNE_ONEDNN=1``/``0``).
                   One of them is what this CPU runs by default, i.e. "loratune", and is not timed twice.
* loratune_no_blocks, loratune_no_dropout_kernel: loratune with one of its compiled kernels treated as missing (the
                   fused RMSNorm/SwiGLU of ``ops/blocks.py``, the dropout kernel of ``ops/dropout.py``), i.e. what a
                   machine without a C compiler runs: what each kernel earns, timed and measured in the same run.

The steps are interleaved (the order alternating), repeated, and compared by medians. A ratio is the median over
repeats of the ratio within each repeat: on a shared 2-core VM the speed drifts by ±10 % over tens of seconds,
which moves steps run seconds apart together, so within-repeat ratios are steadier than ratios of medians (the
JSON has both). ``--malloc retain`` makes glibc keep freed memory for reuse, for every contestant: page faults on
re-touched activations cost 1-5 µs each on this VM, and the contestants allocate differently, so this shows how
much of a ratio is the allocator's. Peak memory is the growth of the process's resident set during one step
(Linux VmHWM after resetting it), measured after the timings with the allocator made to return freed memory at
once.

    python benchmarks/train_step.py              # timings at 4×128, memory at 8×512 (about 12 minutes on 2 cores)
    python benchmarks/train_step.py --json out.json --repeats 9
    python benchmarks/train_step.py --no-train --no-inference --mem-batch 0 --attribution   # where the time goes

On a GPU (``--device cuda --dtype bfloat16``) the same steps are timed between synchronizations, each timing the
mean of ``--inner`` steps; peak memory is torch's allocator peak over the step; the routes do not apply (they
are CPU matrix libraries) and only floor, floor_chunked, floor_fused (there the same as floor_chunked: the fused
blocks are CPU kernels), loratune and PEFT run. ``--random-weights`` builds the model from its config.json alone
with random weights, for a machine where the bundled weights cannot go (the times do not depend on the weights'
values).

    python benchmarks/train_step.py --device cuda --dtype bfloat16 --model DIR --random-weights --inner 10
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # (its halves, when loaded by path rather than run)
from bench_measure import (  # noqa: E402,F401  (re-exported: the other step benchmarks use them as ts.*)
    _libc,
    _status_kb,
    exact_rss_accounting,
    make_batch,
    paired_ratio,
    peak_step_memory_mb,
    ratio_spread,
    retain_freed_memory,
    sync,
    timed,
    zero_grads,
)
from step_contestants import (  # noqa: E402,F401
    DTYPES,
    KERNEL_CONTESTANTS,
    _RoutedFrozenLinear,
    base_models,
    build_models,
    check_same_function,
    compile_decoder_layers,
    default_route,
    floor_chunked_step,
    floor_step,
    fp32_twin,
    load_model,
    loratune_step,
    on_route,
    other_route,
    peft_step,
    route_frozen_linears,
    routes_apply,
    without_kernel,
)

CONFIGS = {
    "all-linear r16 dropout0.05": dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"),
    "all-linear r16 dropout0": dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
    "q,v r8 dropout0": dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
}








def bench_config(name: str, cfg: dict, args) -> dict:
    routes = routes_apply(args)
    base, lt, pm, fused_floor, *routed = build_models(cfg, args, routed_floor=routes)
    vocab = base.config.vocab_size
    small = make_batch(args.batch, args.seq, vocab, device=args.device)
    same = check_same_function(lt, pm, small)
    if getattr(args, "compile", False):  # every contestant's decoder layers compiled (warm-up pays the compile)
        for m in (base, lt, pm, fused_floor, *routed):
            compile_decoder_layers(m)
    steps = {"floor": (floor_step, base), "floor_chunked": (floor_chunked_step, base),
             "floor_fused": (floor_chunked_step, fused_floor), "loratune": (loratune_step, lt),
             "peft": (peft_step, pm)}
    if routes:
        steps["floor_onednn"] = (on_route(floor_chunked_step, "onednn"), routed[0])
        steps[f"loratune_{other_route()}"] = (on_route(loratune_step, other_route()), lt)
    if torch.device(args.device).type == "cpu":
        steps.update({k: (without_kernel(loratune_step, which), lt) for k, which in KERNEL_CONTESTANTS.items()})
    lt32 = None
    if args.dtype != "float32":  # loratune's own step in fp32 on the same weights: what bf16 earns
        lt32 = fp32_twin(lt, cfg, args)
        if getattr(args, "compile", False):
            compile_decoder_layers(lt32)
        steps["loratune_fp32"] = (loratune_step, lt32)
    if getattr(args, "core", False):  # only floor, loratune (and its fp32 step) and PEFT: a short run
        steps = {k: v for k, v in steps.items() if k in ("floor", "loratune", "loratune_fp32", "peft")}
        routes = False
    times: dict[str, list[float]] = {k: [] for k in steps}
    for step, model in steps.values():  # warm-up
        timed(step, model, small, args.device, args.inner)
    for i in range(args.repeats):
        order = list(steps) if i % 2 == 0 else list(reversed(steps))  # interleaved, alternating order
        for k in order:
            times[k].append(timed(steps[k][0], steps[k][1], small, args.device, args.inner))
    if routes:
        times[f"loratune_{default_route()}"] = times["loratune"]  # the default route is loratune itself
    med = {k: statistics.median(v) for k, v in times.items()}

    def ratio(a: str, b: str) -> float:
        return paired_ratio(times[a], times[b])

    pairs = [("loratune", "floor"), ("loratune", "peft"), ("loratune", "floor_chunked"), ("peft", "floor"),
             ("loratune", "floor_fused"), ("floor_fused", "floor_chunked"), ("floor_fused", "floor")]
    if routes:
        pairs += [("loratune_onednn", "floor_onednn"), ("loratune_mkl", "floor_fused"),
                  ("loratune_onednn", "floor"), ("loratune_onednn", "peft"), ("loratune_mkl", "floor"),
                  ("loratune_mkl", "peft"), ("floor_onednn", "floor_fused")]
    pairs += [("loratune", k) for k in KERNEL_CONTESTANTS if k in steps]
    if lt32 is not None:
        pairs += [("loratune", "loratune_fp32"), ("loratune_fp32", "peft"), ("loratune_fp32", "floor")]
    pairs = [(a, b) for a, b in pairs if a in times and b in times]
    spread = [("loratune", "floor"), ("loratune", "peft")] + ([("loratune_onednn", "floor_onednn")] if routes else [])
    spread += [("loratune", "loratune_fp32")] if lt32 is not None else []
    out = {
        "config": name, "lora": cfg, "tokens": f"{args.batch}x{args.seq}", "loss_diff_vs_peft": same["loss_diff"],
        "grad_rel_diff_vs_peft": same["grad_rel_diff"],
        **{f"{k}_vs_fp32": same[f"{k}_vs_fp32"] for k in ("loratune", "peft") if f"{k}_vs_fp32" in same},
        "default_route": default_route() if routes else None,
        "median_s": med, "all_s": times, **{f"{a}_over_{b}": ratio(a, b) for a, b in pairs},
        "quartiles": {f"{a}_over_{b}": ratio_spread(times[a], times[b]) for a, b in spread},
        "ratio_of_medians": {f"{a}_over_{b}": med[a] / med[b] for a, b in pairs[:2] + pairs[3:4]},
    }
    del base, lt, pm, fused_floor, routed, lt32
    gc.collect()
    return out


def memory_config(cfg: dict, args, with_floor: bool) -> dict:
    """Peak step memory of (floor,) loratune and PEFT at the large batch (run after all timings: see main)."""
    base, lt, pm, _ = build_models(cfg, args)
    big = make_batch(args.mem_batch, args.mem_seq, base.config.vocab_size, device=args.device)
    steps = {"loratune": (loratune_step, lt), "peft": (peft_step, pm)}
    if torch.device(args.device).type == "cpu":
        steps.update({k: (without_kernel(loratune_step, which), lt) for k, which in KERNEL_CONTESTANTS.items()})
    if with_floor:  # the floor does not depend on the LoRA config
        steps = {"floor": (floor_step, base), "floor_chunked": (floor_chunked_step, base), **steps}
    peaks = {k: peak_step_memory_mb(step, model, big) for k, (step, model) in steps.items()}
    del base, lt, pm
    gc.collect()
    return peaks


def bench_inference(cfg: dict, args) -> dict:
    """No-grad eval forward (logits) at the timing batch: base vs one unmerged adapter vs merged, medians."""
    base, lt, _, _ = build_models(cfg, args)
    base.eval(), lt.eval()
    input_ids, mask, _ = make_batch(args.batch, args.seq, base.config.vocab_size, device=args.device)

    def forward(model, batch):
        with torch.no_grad():
            model(input_ids=batch[0], attention_mask=batch[1])

    def fwd(model):
        return timed(forward, model, (input_ids, mask), args.device, args.inner)

    def merged():
        lt.merge_adapter()  # merge/unmerge are outside the timed forward
        try:
            return fwd(lt)
        finally:
            lt.unmerge_adapter()

    routes = routes_apply(args)
    runs = {"base": lambda: fwd(base), "unmerged": lambda: fwd(lt), "merged": merged}
    if routes:
        runs[f"unmerged_{other_route()}"] = on_route(lambda: fwd(lt), other_route())
    times: dict[str, list[float]] = {k: [] for k in runs}
    for run in runs.values():  # warm-up
        run()
    for i in range(max(args.repeats, 1) * 2):
        for k in list(runs) if i % 2 == 0 else list(reversed(runs)):
            times[k].append(runs[k]())
    if routes:
        times[f"unmerged_{default_route()}"] = times["unmerged"]
    med = {k: statistics.median(v) for k, v in times.items()}
    by_route = [f"unmerged_{r}" for r in ("onednn", "mkl")] if routes else []
    return {"median_s": med, "all_s": times, "default_route": default_route() if routes else None,
            "unmerged_over_base": paired_ratio(times["unmerged"], times["base"]),
            "merged_over_base": paired_ratio(times["merged"], times["base"]),
            **{f"{k}_over_base": paired_ratio(times[k], times["base"]) for k in by_route},
            "quartiles": {"unmerged_over_base": ratio_spread(times["unmerged"], times["base"]),
                          "merged_over_base": ratio_spread(times["merged"], times["base"])}}


def bench_attribution(args) -> dict:
    """Where loratune's time over the floor goes: all-linear at r=1 and r=16, dropout 0 and 0.05, against the
    floor with the same loss and fused blocks (floor_fused), interleaved, medians. r=1 vs r=16 separates the
    rank-proportional FLOPs from per-module costs that do not depend on r; dropout 0 vs 0.05 gives the cost of
    dropout."""
    from loratune import LoraConfig, get_lora_model, ops

    base, *copies = base_models(5, args)
    ops.accelerate(base)
    steps = {"floor_fused": (floor_chunked_step, base)}
    for r in (1, 16):
        for p in (0.0, 0.05):
            torch.manual_seed(0)
            lt = get_lora_model(copies.pop(), LoraConfig(r=r, lora_alpha=32, lora_dropout=p,
                                                         target_modules="all-linear", init_lora_weights=False))
            steps[f"r{r} dropout{p}"] = (loratune_step, lt.train())
    batch = make_batch(args.batch, args.seq, base.config.vocab_size, device=args.device)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for step, model in steps.values():  # warm-up
        timed(step, model, batch, args.device, args.inner)
    for i in range(args.repeats):
        for k in list(steps) if i % 2 == 0 else list(reversed(steps)):
            times[k].append(timed(*steps[k], batch, args.device, args.inner))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_s": med,
            "over_floor_fused": {k: paired_ratio(v, times["floor_fused"]) for k, v in times.items()}}


def print_table(results: list[dict]) -> None:
    """The medians (ms) and ratios per config; 'dnn' is loratune with the routing on, 'mkl' with it off (CPU only:
    a column whose contestant did not run is left out)."""
    cols = [("floor ms", "floor"), ("fl_chk ms", "floor_chunked"), ("fl_fus ms", "floor_fused"),
            ("fl_dnn ms", "floor_onednn"),
            ("lt ms", "loratune"), ("lt32 ms", "loratune_fp32"), ("peft ms", "peft")]
    ratios = [("lt/floor", "loratune_over_floor"), ("lt/peft", "loratune_over_peft"),
              ("lt/fl_fus", "loratune_over_floor_fused"), ("fl_fus/fl", "floor_fused_over_floor"),
              ("dnn/fl", "loratune_onednn_over_floor"), ("dnn/peft", "loratune_onednn_over_peft"),
              ("mkl/fl", "loratune_mkl_over_floor"), ("mkl/peft", "loratune_mkl_over_peft"),
              ("dnn/fl_dnn", "loratune_onednn_over_floor_onednn"), ("mkl/fl_fus", "loratune_mkl_over_floor_fused"),
              ("fl_dnn/fl_fus", "floor_onednn_over_floor_fused"), ("peft/fl", "peft_over_floor"),
              ("lt/lt_fp32", "loratune_over_loratune_fp32"), ("lt_fp32/peft", "loratune_fp32_over_peft"),
              ("lt/no_blocks", "loratune_over_loratune_no_blocks"),
              ("lt/no_dropout_k", "loratune_over_loratune_no_dropout_kernel")]
    first = results[0]
    shown = [(h, lambda r, k=k: 1e3 * r["median_s"][k]) for h, k in cols if k in first["median_s"]]
    shown += [(h, lambda r, k=k: r[k]) for h, k in ratios if k in first]
    if first["default_route"]:
        print(f"\nloratune's products by default on: {first['default_route']} (ops/gemm.py)")
    print(f"{'config':28s} " + " ".join(f"{h:>{max(len(h), 6)}s}" for h, _ in shown)
          + f" | peak MiB @{first.get('memory_tokens', '-')}: floor / floor_chunked / loratune / peft"
          + " / loratune_no_blocks / loratune_no_dropout_kernel")
    for r in results:
        mem = r.get("peak_mb")
        mem_s = " / ".join(f"{mem[k]:.0f}" for k in ("floor", "floor_chunked", "loratune", "peft",
                                                      *KERNEL_CONTESTANTS) if k in mem) if mem else "-"
        print(f"{r['config']:28s} " + " ".join(f"{f(r):>{max(len(h), 6)}.3f}" for h, f in shown) + f" | {mem_s}")
    print("quartiles of the per-repeat ratios (this machine's spread): "
          + "; ".join(f"{r['config']}: " + ", ".join(f"{k.replace('_over_', '/')} {lo:.3f}-{hi:.3f}"
                                                      for k, (lo, hi) in r["quartiles"].items())
                      for r in results))


def parse_device(ap: argparse.ArgumentParser, name: str) -> torch.device:
    """``--device`` as a torch.device, or the parser's one-line error: not a device name, or CUDA this torch lacks."""
    try:
        device = torch.device(name)
    except RuntimeError:
        ap.error(f"--device {name}: not a device name (use cpu or cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {name}: this torch sees no CUDA GPU (torch {torch.__version__})")
    return device


def add_step_args(ap: argparse.ArgumentParser) -> None:
    """The flags every step benchmark shares: timing batch, repeats, memory batch, threads."""
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--mem-batch", type=int, default=8, help="batch for the peak-memory step (0: skip)")
    ap.add_argument("--mem-seq", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked (one-line errors before any model loads)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_args(ap)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda[:N] on a GPU")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32", help="the model's dtype (adapters: fp32)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a bundled model's name or an HF folder")
    ap.add_argument("--random-weights", action="store_true",
                    help="the model's architecture from its config.json with random weights (see above)")
    ap.add_argument("--inner", type=int, default=None,
                    help="steps per timing, their mean (default: 1 on CPU, 10 on a GPU)")
    ap.add_argument("--malloc", choices=["default", "retain"], default="default",
                    help="default: glibc as it comes; retain: glibc keeps freed memory for reuse (for every "
                         "contestant), the allocator sensitivity check")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS), metavar="CONFIG",
                    help=f"any of {list(CONFIGS)}")
    ap.add_argument("--inference", action=argparse.BooleanOptionalAction, default=True,
                    help="also time no-grad inference: base vs unmerged vs merged adapter")
    ap.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                    help="time the training steps (--no-train: inference only)")
    ap.add_argument("--attribution", action="store_true",
                    help="also split loratune's overhead: r=1 vs r=16, dropout 0 vs 0.05, against the chunked floor")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON here ('-' for stdout)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile every contestant's decoder layers (as train.compile does)")
    ap.add_argument("--core", action="store_true",
                    help="time only floor, loratune (and with --dtype bfloat16 its fp32 step) and PEFT: a short run")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1 (medians need a timing)")
    if args.json and args.json != "-" and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        ap.error(f"--json {args.json}: its directory does not exist (create it first; checked now, not after the run)")
    device = parse_device(ap, args.device)
    from loratune.errors import LoraTuneError
    from loratune.models import BUNDLED, resolve_model_path

    if args.model not in BUNDLED:  # (a bundled model's package is checked when it loads, with its own message)
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(resolve_model_path(args.model))
        except LoraTuneError as e:
            ap.error(f"--model: {e}")
        except (OSError, ValueError) as e:  # a config.json transformers cannot read
            ap.error(f"--model {args.model}: its config.json cannot be read ({e}); point --model at a model folder")
    if args.inner is None:
        args.inner = 1 if device.type == "cpu" else 10
    if args.inner < 1:
        ap.error("--inner must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.malloc == "retain":
        retain_freed_memory()
    results = []
    for name in args.configs if args.train else []:
        r = bench_config(name, CONFIGS[name], args)
        results.append(r)
        m = {k: 1e3 * v for k, v in r["median_s"].items()}
        print(f"{name}: floor {m['floor']:.1f} ms loratune {m['loratune']:.1f} ms peft {m['peft']:.1f} ms  "
              f"loratune/floor {r['loratune_over_floor']:.3f} "
              f"loratune/peft {r['loratune_over_peft']:.3f}  (vs PEFT without dropout: loss diff "
              f"{r['loss_diff_vs_peft']:.1e}, A/B gradients' largest relative diff {r['grad_rel_diff_vs_peft']:.1e})",
              flush=True)
        for who in ("loratune", "peft"):
            if f"{who}_vs_fp32" in r:
                e = r[f"{who}_vs_fp32"]
                print(f"  {who} against the fp32 model: loss diff {e['loss_diff']:.1e}, A/B gradients' relative "
                      f"error median {e['grad_rel_err_median']:.1e}, largest {e['grad_rel_err_max']:.1e}", flush=True)
    if args.mem_batch:
        if device.type == "cpu":
            exact_rss_accounting()  # after the timings: returning memory at once makes every allocation slower
        floor = {}
        for r in results:
            r["memory_tokens"] = f"{args.mem_batch}x{args.mem_seq}"
            r["peak_mb"] = {**floor, **memory_config(CONFIGS[r["config"]], args, with_floor=not floor)}
            floor = {k: v for k, v in r["peak_mb"].items() if k.startswith("floor")}
            print(f"{r['config']}: peak MiB at {r['memory_tokens']} {r['peak_mb']}", flush=True)
    if results:
        print_table(results)
    inference = {}
    for name in args.configs if args.inference else []:
        inference[name] = r = bench_inference(CONFIGS[name], args)
        m = {k: 1e3 * v for k, v in r["median_s"].items()}
        print(f"inference {name}: base {m['base']:.1f} ms unmerged {m['unmerged']:.1f} ms merged {m['merged']:.1f} ms "
              f"unmerged/base {r['unmerged_over_base']:.3f} merged/base {r['merged_over_base']:.3f} (quartiles "
              f"{'-'.join(f'{v:.3f}' for v in r['quartiles']['unmerged_over_base'])} and "
              f"{'-'.join(f'{v:.3f}' for v in r['quartiles']['merged_over_base'])})"
              + (f"; by route (default {r['default_route']}): unmerged on oneDNN /base "
                 f"{r['unmerged_onednn_over_base']:.3f}, on MKL /base {r['unmerged_mkl_over_base']:.3f}"
                 if r["default_route"] else ""), flush=True)
    attribution = bench_attribution(args) if args.attribution else {}
    for k, v in attribution.get("over_floor_fused", {}).items():
        print(f"attribution {k:18s} {1e3 * attribution['median_s'][k]:.1f} ms  /floor_fused {v:.3f}", flush=True)
    if args.json:
        text = json.dumps({"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                           "device": args.device, "gpu": torch.cuda.get_device_name(device)
                           if device.type == "cuda" else None, "dtype": args.dtype, "model": args.model,
                           "random_weights": args.random_weights, "inner": args.inner,
                           "default_route": default_route() if device.type == "cpu" else None,
                           "threads": args.threads, "malloc": args.malloc,
                           "repeats": args.repeats, "results": results,
                           "inference": inference, "attribution": attribution}, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
