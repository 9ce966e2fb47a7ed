"""QLoRA on CPU: loratune's NF4 base against its fp32 base, PEFT + bitsandbytes NF4, and the frozen floor.

On the bundled SmolLM2-135M, in one process:

* storage: bits per quantized weight (codes, scales and double-quantization state), the quantized linears' bytes in
  fp32 and in NF4, the whole model's tensor bytes both ways, and the process's resident memory after loading the
  fp32 model (copied into private memory: the loader maps the file) and after quantizing it; the peak growth of the
  resident set while ``quantize_model`` runs, against the largest linear's fp32 size (layer by layer, it should
  stay near that);
* the training step (forward + backward, no optimizer) at --batch x --seq (4x128), all-linear r16 dropout 0.05:
  - floor:     the frozen fp32 model, forward + backward to the input embeddings, transformers' own loss;
  - lt_fp32:   loratune's LoRA on the fp32 model (its fused path);
  - lt_nf4:    loratune's LoRA on ``quantize_model(model)`` (NF4Linear bases; its fused LoRA path on each layer's
               ``dense_weight()``, the weight dequantized for the product and again for the backward);
  - lt_nf4_general: the same model on LoRA's general path (NF4Linear's own chunked product, then the LoRA term),
               the A/B of that fused path;
  - peft_bnb:  PEFT's LoRA on bitsandbytes ``Linear4bit`` NF4 bases holding the same codes (bitsandbytes' CPU
               path: dequantize, then matmul);
  all with the same adapter weights, the fp32 tensors shared by all models and the 4-bit tensors shared by lt_nf4
  and peft_bnb; interleaved, the order alternating; each ratio the median over repeats of the ratio within a repeat,
  with its quartiles (see benchmarks/train_step.py for why);
* peak memory of one step of each at --mem-batch x --mem-seq (8x512): the growth of the resident set (VmHWM).

Also, as a check that the two QLoRA stacks compute the same function: the loss of lt_nf4 and peft_bnb without dropout.

* loading (``--loading``): ``load_base_model(name)`` against ``load_base_model(name, quantize="nf4")``, each in a
  fresh process: seconds, and the peak of the process's private (anonymous) resident memory while loading, sampled
  every 2 ms, against the loaded model's tensor bytes and the largest linear's fp32 bytes. (The total resident set
  also counts the safetensors file's pages that the readers map; those are page cache, given back under pressure,
  and reported apart.)
* the quickstart through the real command line (``--quickstart-cli N``): ``python -m loratune quickstart`` and
  ``python -m loratune quickstart model.quantize=nf4``, N pairs in alternating order, each a fresh process: held-out
  exact match after training, the training seconds and the total seconds.
* on a GPU (``--device cuda``, ``--dtype bfloat16`` for bf16 compute): the step timings and peak memory (torch's
  allocated memory) of the same contestants, bitsandbytes on its CUDA kernels; storage and loading stay CPU figures.

    python benchmarks/qlora.py --repeats 7 --json qlora.json
    python benchmarks/qlora.py --no-steps --loading --quickstart-cli 1
    python benchmarks/qlora.py --device cuda --dtype bfloat16 --repeats 7 --json qlora_gpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as ts  # noqa: E402  (the house helpers: batches, timing, ratios, memory)

CONFIG = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")


def tensor_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def bnb_linear(layer):
    """A bitsandbytes NF4 ``Linear4bit`` on the same 4-bit tensors as loratune's ``NF4Linear`` ``layer`` (shared,
    not copied), in the layer's compute dtype, and on CPU its fp32 products (not its bf16 inference kernel)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState, create_dynamic_map, get_4bit_type

    device, dtype = layer.packed.device, layer.compute_dtype
    state2 = QuantState(absmax=layer.absmax2, code=create_dynamic_map().to(device), blocksize=256,
                        dtype=torch.float32)
    state = QuantState(absmax=layer.absmax, shape=torch.Size((layer.out_features, layer.in_features)),
                       code=get_4bit_type("nf4", device=device), blocksize=layer.blocksize, quant_type="nf4",
                       dtype=dtype, offset=layer.offset, state2=state2)
    q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          compute_dtype=dtype, compress_statistics=True, quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(layer.packed.view(-1, 1), requires_grad=False, quant_state=state,
                                 blocksize=layer.blocksize, compress_statistics=True, quant_type="nf4",
                                 bnb_quantized=True, module=q)
    q.bias = layer.bias
    q.support_avx512bf16_for_cpu = False
    return q


def build(args):
    """(floor, lt_fp32, lt_nf4, peft_bnb) on shared weights, with identical adapter weights."""
    import peft

    from loratune import LoraConfig, get_lora_model
    from loratune.adapters.state import adapter_tensors
    from loratune.quant import NF4Linear, quantize_model

    floor, fp32_base, nf4_base, bnb_base = ts.base_models(4, args)
    quantize_model(nf4_base, compute_dtype=ts.DTYPES[args.dtype])  # (on the model's device: torch ops off CPU)
    for name, m in list(nf4_base.named_modules()):
        if isinstance(m, NF4Linear):
            bnb_base.set_submodule(name, bnb_linear(m))
    torch.manual_seed(0)
    lt_fp32 = get_lora_model(fp32_base, LoraConfig(**CONFIG, init_lora_weights=False))
    lt_nf4 = get_lora_model(nf4_base, LoraConfig(**CONFIG))
    pm = peft.get_peft_model(bnb_base, peft.LoraConfig(**CONFIG, task_type="CAUSAL_LM"))
    weights = {k: v.detach().clone() for k, v in
               adapter_tensors(lt_fp32.model, lt_fp32.peft_config["default"], "default").items()}
    live = adapter_tensors(lt_nf4.model, lt_nf4.peft_config["default"], "default")
    with torch.no_grad():
        for k, v in live.items():
            v.copy_(weights[k])
    result = peft.set_peft_model_state_dict(pm, weights)
    assert not result.unexpected_keys, result.unexpected_keys
    for m in (floor, lt_fp32, lt_nf4, pm):
        m.train()
    return floor, lt_fp32, lt_nf4, pm


def general_path(step):
    """``step`` with loratune's NF4 layers lending no dense weight, so LoRA runs its general path on them
    (NF4Linear's own chunked product, then the LoRA term): the A/B of the fused path on 4-bit bases."""
    from loratune.quant import NF4Linear

    class Unfused(NF4Linear):
        @property
        def dense_weight(self):
            raise AttributeError("dense_weight")

    def run(model, batch):
        layers = [m for m in model.modules() if type(m) is NF4Linear]
        for m in layers:
            m.__class__ = Unfused
        try:
            return step(model, batch)
        finally:
            for m in layers:
                m.__class__ = NF4Linear
    return run


def same_function(lt_nf4, pm, batch) -> float:
    """|loss(lt_nf4) - loss(peft_bnb)| without dropout: the two QLoRA stacks on the same codes and adapters."""
    from loratune.ops import causal_lm_loss

    with torch.no_grad():
        lt_nf4.eval(), pm.eval()
        a = causal_lm_loss(lt_nf4, *batch).item()
        b = pm(input_ids=batch[0], attention_mask=batch[1], labels=batch[2]).loss.item()
        lt_nf4.train(), pm.train()
    return abs(a - b)


def storage(args) -> dict:
    """Bits per weight, bytes fp32 vs NF4, resident memory, and the peak while quantizing (fresh fp32 model)."""
    from loratune.quant import NF4Linear, default_skip_modules, quantize_model

    args = argparse.Namespace(**{**vars(args), "device": "cpu", "dtype": "float32"})  # CPU figures, always
    ts.exact_rss_accounting()
    gc.collect()
    ts._libc.malloc_trim(0)
    rss0 = ts._status_kb("VmRSS")
    model = ts.load_model(args)
    for t in [*model.parameters(), *model.buffers()]:  # into private memory: the loader may map the file, whose
        t.data = t.data.clone()  # pages would count only once touched (and stay mapped while the file is open)
    gc.collect()
    ts._libc.malloc_trim(0)
    rss_fp32 = ts._status_kb("VmRSS")
    fp32_bytes = tensor_bytes(model)
    linears = [m for m in model.modules() if type(m) is nn.Linear and m is not model.get_output_embeddings()]
    largest = max(m.weight.numel() * 4 for m in linears)
    default_skip_modules(model)  # (its first call imports transformers' quantizer code: not the quantization's)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = ts._status_kb("VmRSS")
    quantize_model(model)
    peak = ts._status_kb("VmHWM")
    gc.collect()
    ts._libc.malloc_trim(0)
    rss_nf4 = ts._status_kb("VmRSS")
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    q_bytes = sum(m.weight.nbytes for m in layers)
    q_values = sum(m.weight.numel() for m in layers)
    out = {"quantized_linears": len(layers), "quantized_weights": q_values,
           "bits_per_quantized_weight": 8 * q_bytes / q_values,
           "linear_bytes_fp32": 4 * q_values, "linear_bytes_nf4": q_bytes,
           "linear_fp32_over_nf4": 4 * q_values / q_bytes,
           "model_tensor_bytes_fp32": fp32_bytes, "model_tensor_bytes_nf4": tensor_bytes(model),
           "rss_mib_after_loading_fp32": (rss_fp32 - rss0) / 1024, "rss_mib_after_quantizing": (rss_nf4 - rss0) / 1024,
           "quantize_peak_growth_mib": (peak - before) / 1024, "largest_linear_fp32_mib": largest / 2**20}
    del model, layers
    gc.collect()
    return out


def quality(args) -> dict:
    """The quickstart task (cli/quickstart.py: its data, config and step count) trained twice, on the fp32 base and
    on its NF4 quantization (what ``model.quantize: nf4`` will run): held-out exact match and loss after training,
    and the training time, one after the other in this process."""
    import tempfile
    from pathlib import Path

    from loratune.cli.quickstart import QUICKSTART
    from loratune.data import prepare
    from loratune.data.dates_task import make_dates_task
    from loratune.models import load_base_model
    from loratune.quant import quantize_model
    from loratune.training.config import load_run_config
    from loratune.training.evaluate import eval_loss, exact_match
    from loratune.training.loop import fit_to_model, train

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        train_file, eval_file = make_dates_task(Path(tmp) / "data", n_train=600, n_eval=100, seed=0)
        for name in ("fp32", "nf4"):
            cfg = load_run_config(None, [f"data.train={train_file}", f"data.eval={eval_file}",
                                         f"output_dir={tmp}/{name}"], defaults=QUICKSTART)
            model, tok = load_base_model(cfg.model)
            if name == "nf4":
                quantize_model(model)
            data = prepare(fit_to_model(cfg.data, model), tok, seed=cfg.train.seed)
            result = train(cfg, overwrite=True, model_and_tokenizer=(model, tok), data=data, progress=False)
            em = exact_match(result.model, tok, data.eval, cfg.train.eval_batch_size, 16)
            loss = eval_loss(result.model, data.eval, tok.pad_token_id)
            out[name] = {"exact_match": em["exact_match"], "eval": loss, "train_seconds": result.seconds,
                         "final_train_loss": result.history[-1].get("loss") if result.history else None}
            print(f"quality {name}: held-out exact match {em['exact_match']:.1%}, eval {loss}, training "
                  f"{result.seconds:.0f} s", flush=True)
            del model, result
            gc.collect()
    out["nf4_over_fp32_train_seconds"] = out["nf4"]["train_seconds"] / out["fp32"]["train_seconds"]
    return out


LOAD_SNIPPET = """
import json, sys, threading, time
import torch
from loratune import load_base_model
from loratune.quant import NF4Linear
import accelerate, safetensors, transformers  # (imports are not the loading)
torch.set_num_threads({threads})

def kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

peak, done = [kb("RssAnon")], []
def sample():
    while not done:
        peak[0] = max(peak[0], kb("RssAnon"))
        time.sleep(0.002)
anon0, rss0 = kb("RssAnon"), kb("VmRSS")
t = threading.Thread(target=sample, daemon=True)
t.start()
start = time.perf_counter()
model, _ = load_base_model({model!r}, **{kwargs!r})
seconds = time.perf_counter() - start
done.append(1)
t.join()
peak[0] = max(peak[0], kb("RssAnon"))
seen, nbytes = set(), 0
for x in [*model.parameters(), *model.buffers()]:
    if id(x) not in seen:
        seen.add(id(x))
        nbytes += x.numel() * x.element_size()
head = model.get_output_embeddings()  # (left in full precision: the largest linear that gets quantized counts)
largest = max(4 * m.in_features * m.out_features for m in model.modules()
              if isinstance(m, torch.nn.Linear) and m is not head)
print(json.dumps({{"seconds": seconds, "peak_private_growth_mib": (peak[0] - anon0) / 1024,
                  "private_after_mib": (kb("RssAnon") - anon0) / 1024,
                  "peak_total_rss_growth_mib": (kb("VmHWM") - rss0) / 1024,
                  "model_tensor_mib": nbytes / 2**20, "largest_linear_fp32_mib": largest / 2**20,
                  "nf4_linears": sum(isinstance(m, NF4Linear) for m in model.modules())}}))
"""


def loading(args) -> dict:
    """fp32 and NF4 loading of the model, each in a fresh process (see the module doc), in alternating order over
    --load-repeats pairs; the medians."""
    runs: dict[str, list[dict]] = {"fp32": [], "nf4": []}
    for i in range(args.load_repeats):
        for name in ("fp32", "nf4") if i % 2 == 0 else ("nf4", "fp32"):
            code = LOAD_SNIPPET.format(threads=args.threads, model=args.model,
                                       kwargs={"quantize": "nf4"} if name == "nf4" else {})
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    out = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    out["runs"] = runs
    for name in ("fp32", "nf4"):
        r = out[name]
        print(f"loading {name}: {r['seconds']:.1f} s; private memory peak +{r['peak_private_growth_mib']:.0f} MiB, "
              f"after +{r['private_after_mib']:.0f} MiB (model tensors {r['model_tensor_mib']:.0f} MiB, largest "
              f"quantizable linear in fp32 {r['largest_linear_fp32_mib']:.1f} MiB); total resident peak "
              f"+{r['peak_total_rss_growth_mib']:.0f} MiB (with the mapped file's pages)", flush=True)
    return out


def quickstart_cli(args) -> dict:
    """``python -m loratune quickstart`` with and without ``model.quantize=nf4``, --quickstart-cli pairs in
    alternating order, each a fresh process: held-out exact match after training, training and total seconds."""
    runs: dict[str, list[dict]] = {"fp32": [], "nf4": []}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.quickstart_cli):
            for name in ("fp32", "nf4") if i % 2 == 0 else ("nf4", "fp32"):
                out = os.path.join(tmp, f"{name}{i}")
                cmd = [sys.executable, "-m", "loratune", "quickstart", *(["model.quantize=nf4"] if name == "nf4"
                                                                         else []), "--out", out, "--no-progress"]
                start = time.perf_counter()
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                wall = time.perf_counter() - start
                if done.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
                text = done.stdout
                em = float(re.search(r"with LoRA\s+([\d.]+)%", text).group(1))
                train_s = float(re.search(r"steps \d+ · (\d+) s ·", text).group(1))
                total = float(re.search(r"total time:\s+(\d+) s", text).group(1))
                runs[name].append({"exact_match": em, "train_seconds": train_s, "total_seconds": total,
                                   "process_seconds": wall})
                print(f"quickstart CLI {name}: held-out exact match {em:.1f} %, training {train_s:.0f} s, total "
                      f"{total:.0f} s ({wall:.0f} s with start-up)", flush=True)
    out = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    out["runs"] = runs
    out["nf4_over_fp32_total"] = out["nf4"]["total_seconds"] / out["fp32"]["total_seconds"]
    out["nf4_over_fp32_train"] = out["nf4"]["train_seconds"] / out["fp32"]["train_seconds"]
    print(f"quickstart CLI: exact match nf4 {out['nf4']['exact_match']:.1f} % vs fp32 {out['fp32']['exact_match']:.1f} "
          f"%; time nf4/fp32: training {out['nf4_over_fp32_train']:.2f}x, total {out['nf4_over_fp32_total']:.2f}x",
          flush=True)
    return out


def bench_steps(args) -> dict:
    """The step timings at the small batch and the peak step memory at the large one (see the module doc)."""
    floor, lt_fp32, lt_nf4, pm = build(args)
    small = ts.make_batch(args.batch, args.seq, floor.config.vocab_size, device=args.device)
    loss_diff = same_function(lt_nf4, pm, small)
    steps = {"floor": (ts.floor_step, floor), "lt_fp32": (ts.loratune_step, lt_fp32),
             "lt_nf4": (ts.loratune_step, lt_nf4), "lt_nf4_general": (general_path(ts.loratune_step), lt_nf4),
             "peft_bnb": (ts.peft_step, pm)}
    for step, model in steps.values():  # warm-up (and the kernels' first build)
        ts.timed(step, model, small, args.device, args.inner)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(args.repeats):
        for k in list(steps) if i % 2 == 0 else list(reversed(steps)):
            times[k].append(ts.timed(*steps[k], small, args.device, args.inner))
    pairs = [("lt_nf4", "lt_fp32"), ("lt_nf4", "peft_bnb"), ("lt_nf4", "floor"), ("lt_fp32", "floor"),
             ("peft_bnb", "floor"), ("lt_nf4", "lt_nf4_general"), ("lt_nf4_general", "peft_bnb")]
    result = {"config": CONFIG, "tokens": f"{args.batch}x{args.seq}", "repeats": args.repeats,
              "device": str(args.device), "dtype": args.dtype,
              "loss_diff_lt_nf4_vs_peft_bnb": loss_diff,
              "median_s": {k: statistics.median(v) for k, v in times.items()}, "all_s": times,
              "ratios": {f"{a}/{b}": ts.paired_ratio(times[a], times[b]) for a, b in pairs},
              "quartiles": {f"{a}/{b}": ts.ratio_spread(times[a], times[b]) for a, b in pairs}}
    med = {k: f"{1e3 * v:.0f} ms" for k, v in result["median_s"].items()}
    print(f"step at {result['tokens']}: {med}", flush=True)
    for k, v in result["ratios"].items():
        lo, hi = result["quartiles"][k]
        print(f"  {k:18s} {v:.3f}  (quartiles {lo:.3f}-{hi:.3f})", flush=True)
    print(f"  loss lt_nf4 vs peft_bnb without dropout: |diff| {loss_diff:.1e}", flush=True)
    if args.mem_batch:
        ts.exact_rss_accounting()
        big = ts.make_batch(args.mem_batch, args.mem_seq, floor.config.vocab_size, device=args.device)
        result["memory_tokens"] = f"{args.mem_batch}x{args.mem_seq}"
        result["peak_step_mib"] = {k: ts.peak_step_memory_mb(step, model, big) for k, (step, model) in steps.items()}
        print(f"peak step memory (MiB) at {result['memory_tokens']}: "
              + ", ".join(f"{k} {v:.0f}" for k, v in result["peak_step_mib"].items()), flush=True)
    del floor, lt_fp32, lt_nf4, pm, steps
    gc.collect()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ts.add_step_args(ap)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda[:N] for the step timings on a GPU")
    ap.add_argument("--dtype", choices=list(ts.DTYPES), default="float32",
                    help="the models' dtype and the NF4 compute dtype (float32 or bfloat16)")
    ap.add_argument("--inner", type=int, default=None, help="steps per timing (default: 1 on CPU, 10 on a GPU)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--quality", action="store_true",
                    help="also train the quickstart task on fp32 and on NF4 in this process (about 2 x 3 minutes)")
    ap.add_argument("--quickstart-cli", type=int, default=0, metavar="N",
                    help="also run `python -m loratune quickstart` with and without model.quantize=nf4, N pairs")
    ap.add_argument("--loading", action="store_true", help="also measure fp32 and NF4 loading in fresh processes")
    ap.add_argument("--load-repeats", type=int, default=1, metavar="N", help="pairs of loading runs (medians)")
    ap.add_argument("--no-steps", dest="steps", action="store_false", help="skip the step timings and memory")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.dtype == "float16":
        ap.error("--dtype float16: NF4 computes in float32 or bfloat16")
    device = ts.parse_device(ap, args.device)
    if args.inner is None:
        args.inner = 1 if device.type == "cpu" else 10
    args.random_weights = False
    torch.set_num_threads(args.threads)

    result = bench_steps(args) if args.steps else {}
    result["storage"] = storage(args)
    s = result["storage"]
    print(f"storage: {s['bits_per_quantized_weight']:.4f} bits per quantized weight; quantized linears "
          f"{s['linear_bytes_fp32'] / 2**20:.1f} MiB fp32 -> {s['linear_bytes_nf4'] / 2**20:.1f} MiB NF4 "
          f"({s['linear_fp32_over_nf4']:.2f}x smaller); model tensors {s['model_tensor_bytes_fp32'] / 2**20:.0f} -> "
          f"{s['model_tensor_bytes_nf4'] / 2**20:.0f} MiB; resident {s['rss_mib_after_loading_fp32']:.0f} MiB after "
          f"loading fp32, {s['rss_mib_after_quantizing']:.0f} MiB after quantizing; peak growth while quantizing "
          f"{s['quantize_peak_growth_mib']:.1f} MiB (largest linear in fp32: {s['largest_linear_fp32_mib']:.1f} MiB)",
          flush=True)
    if args.loading:
        result["loading"] = loading(args)
    if args.quality:
        result["quality"] = quality(args)
    if args.quickstart_cli:
        result["quickstart_cli"] = quickstart_cli(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": args.threads, "model": args.model,
                       "load_average_at_end": os.getloadavg(), **result}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
