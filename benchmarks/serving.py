"""Serving many adapters on one base (issue 21): the mixed-batch forward, adapter load/swap times, and a load test.

Parts (``--parts``, default all three):

* ``forward``: one forward of a mixed-adapter batch (each row its own adapter, round robin over N distinct
  adapters) on the bundled SmolLM2-135M, fp32, r=16 all-linear adapters read from the same PEFT files by both
  stacks, against
  - ``base``:  the plain transformers model (the issue's "base forward");
  - ``floor``: the same with loratune's fused RMSNorm/SwiGLU (``ops.accelerate``; loratune at rank 0);
  - ``peft``:  PEFT's ``adapter_names=`` mixed batch with the same N adapters loaded;
  - ``mixed``: loratune's serving path (``AdapterRegistry`` stacked slots, a per-call ``MixedBatch``);
  - ``v1``:    the same with the first design's paths only (``registry.batch(..., fast=False)``).
  All five on one copy of the base weights, interleaved with the order alternating; each ratio is the median over
  repeats of the ratio within a repeat, with its quartiles.
* ``swap``: adapter load time (safetensors read + checks + scaling folded into B, host memory) and slot-swap time
  (copying a host adapter into the stacked slots), in ms, median over the adapters.
* ``load``: a load test. ``loratune serve`` runs as a separate process (real uvicorn, loopback); this process is
  the client: ``--clients`` concurrent streaming clients send ``--requests`` completions (temperature 0) and record
  latency, time to first token (TTFT), tokens, errors. Scenarios: 8 adapters / 1 adapter / ``--many`` registered
  adapters cold on disk (``many``: ``--max-cpu-loras`` as given, the first request of each adapter reads it) / the
  same ``--many`` adapters resident in host memory (``resident``: ``--max-cpu-loras`` raised to ``--many`` and one
  untimed warm-up request per adapter first; S-LoRA's setting) under continuous batching, then the 8 adapters
  under static batching and one request at a time (sequential; bounded by ``--time-limit``). Every answer is
  compared with its adapter's offline greedy generation (loratune's ``LoraModel`` with that one adapter,
  transformers' ``generate``, one prompt at a time), and the share of answers that differ from the base model's
  shows that the adapters matter. ``--designs v2,v3`` runs each scenario on several server designs (v1: the first
  design, one-at-a-time prefill and v1 mixed paths; v2: fast paths, cold adapters read on the scheduler's thread;
  v3, the default: v2 with ``--loaders`` loader threads reading cold adapters while decoding goes on), alternating
  the order. Adapter loads and slot swaps are counted over the timed requests only.

    python benchmarks/serving.py --json serving.json                     # everything, the documented sizes
    python benchmarks/serving.py --parts forward --repeats 7
    python benchmarks/serving.py --parts load --requests 256 --clients 32 --max-tokens 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving_client import client_run, start_server  # noqa: E402  (the load test's server process and clients)

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "The best way to learn a language is",
           "def fibonacci(n):", "My favourite season of the year is", "Water boils at a temperature of",
           "The three primary colours are", "A good breakfast should include"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="forward,swap,load", help="comma-separated: forward, swap, load")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="bundled name or HF model folder")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--shapes", default="16x64,64x16", help="ROWSxTOKENS batches for the forward part")
    ap.add_argument("--adapters", default="1,2,8,32", help="distinct adapters per batch, forward part")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--requests", type=int, default=256, help="requests per load-test scenario")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--many", type=int, default=100, help="registered adapters in the many-adapter scenario")
    ap.add_argument("--max-loras", type=int, default=32, help="slots of the served model")
    ap.add_argument("--max-cpu-loras", type=int, default=32, help="host-memory LRU of the served model")
    ap.add_argument("--time-limit", type=float, default=180.0, help="seconds per scenario before no new request")
    ap.add_argument("--scenarios", default="8,1,many,resident,static,sequential")
    ap.add_argument("--designs", default="v3", help="server designs per load scenario, any of v1, v2, v3 (e.g. v2,v3)")
    ap.add_argument("--loaders", type=int, default=1, help="the v3 server's --adapter-loaders")
    ap.add_argument("--stagger", type=float, default=0.0,
                    help="seconds over which the clients' first requests are spread (0: all at once, so requests "
                         "come in waves)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every scenario and design this many times, interleaved (ratios within a round)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads here and in the server (1: on a shared, loaded VM the thread pool's waits "
                         "swamp the measurement)")
    ap.add_argument("--work", help="folder for the generated adapters (kept and reused; default: a temp folder)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    for name in ("rank", "threads", "repeats", "requests", "clients", "max_tokens", "many", "max_loras",
                 "max_cpu_loras", "loaders", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        args.adapters = [int(v) for v in args.adapters.split(",")]
    except ValueError:
        ap.error("--shapes is ROWSxTOKENS[,...] and --adapters N[,...], whole numbers")
    args.parts = args.parts.split(",")
    args.scenarios = args.scenarios.split(",")
    if set(args.parts) - {"forward", "swap", "load"}:
        ap.error(f"--parts: unknown {sorted(set(args.parts) - {'forward', 'swap', 'load'})}")
    if set(args.scenarios) - {"8", "1", "many", "resident", "static", "sequential"}:
        ap.error("--scenarios: choose from 8, 1, many, resident, static, sequential")
    args.designs = args.designs.split(",")
    if not args.designs or set(args.designs) - {"v1", "v2", "v3"}:
        ap.error("--designs: one or more of v1, v2, v3, comma-separated")
    return args


# --- adapters ------------------------------------------------------------------------------------------------
def base_models(model_name: str, n: int) -> list:
    """n copies of the base model on one copy of the weights (placement alone moves timings; see train_step.py)."""
    from loratune import load_base_model

    models = [load_base_model(model_name)[0].eval() for _ in range(n)]
    for m in models[1:]:
        for (name, p), (other, q) in zip(models[0].named_parameters(), m.named_parameters(), strict=True):
            assert name == other
            q.data = p.data
    for m in models:
        m.requires_grad_(False)
    return models


def make_adapters(model_name: str, root: Path, n: int, rank: int) -> list[Path]:
    """n random r=``rank`` all-linear PEFT adapters under ``root`` (a000, a001, ...), written by loratune's own
    writer; B is small and random, so each adapter changes the answers without wrecking the model. Reused if there."""
    from loratune import LoraConfig, get_lora_model, load_base_model

    dirs = [root / f"a{i:03d}" for i in range(n)]
    todo = [d for d in dirs if not (d / "adapter_model.safetensors").is_file()]
    if todo:
        lm = get_lora_model(load_base_model(model_name)[0], LoraConfig(r=rank, lora_alpha=rank,
                                                                       target_modules="all-linear"))
        for d in todo:
            g = torch.Generator().manual_seed(int(d.name[1:]))
            with torch.no_grad():
                for _, layer in lm.lora_layers():
                    ad = layer.adapters["default"]
                    ad.lora_A.copy_(torch.randn(ad.lora_A.shape, generator=g) / ad.lora_A.shape[1] ** 0.5)
                    ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g) * 0.02)
            lm.save_pretrained(d)
    return dirs


def paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(median, 25 %, 75 %) over repeats of a/b within each repeat."""
    r = sorted(x / y for x, y in zip(a, b))
    if len(r) < 2:
        return r[0], r[0], r[0]
    q1, med, q3 = statistics.quantiles(r, n=4, method="inclusive")
    return statistics.median(r), q1, q3


# --- part 1: the mixed-batch forward -------------------------------------------------------------------------
def contestants(base, floor, lt_model, pm, x, names, batch, batch_v1) -> dict:
    """One forward of each contestant on batch ``x`` (``names``: each row's adapter; ``batch``: the same as slots,
    ``batch_v1`` the same with the first design's paths)."""
    from loratune.adapters.batch import mixed_batch

    def run(b):
        with mixed_batch(b):
            return lt_model(input_ids=x).logits

    return {"base": lambda: base(input_ids=x).logits, "floor": lambda: floor(input_ids=x).logits,
            "peft": lambda: pm(input_ids=x, adapter_names=names).logits, "mixed": lambda: run(batch),
            "v1": lambda: run(batch_v1)}


def bench_forward(args, dirs: list[Path]) -> list[dict]:
    import peft

    from loratune import ops
    from loratune.serving import AdapterRegistry

    most = min(max(args.adapters), max(r for r, _ in args.shapes))
    base, floor, lt_model, peft_base = base_models(args.model, 4)
    ops.accelerate(floor)
    reg = AdapterRegistry(lt_model, max_loras=most, max_lora_rank=args.rank)
    pm = peft.PeftModel.from_pretrained(peft_base, dirs[0], adapter_name=dirs[0].name)
    for d in dirs[:most]:
        reg.register(d.name, d)
        if d != dirs[0]:
            pm.load_adapter(d, adapter_name=d.name)
    slots = {d.name: reg.acquire(d.name) for d in dirs[:most]}
    pm.eval()
    vocab = base.config.vocab_size
    results = []
    for rows, tokens in args.shapes:
        x = torch.randint(0, vocab, (rows, tokens), generator=torch.Generator().manual_seed(rows * 1000 + tokens))
        for n in args.adapters:
            k = min(n, rows)
            names = [dirs[i % k].name for i in range(rows)]

            row_slots = [slots[nm] for nm in names]
            runs = contestants(base, floor, lt_model, pm, x, names, reg.batch(row_slots),
                               reg.batch(row_slots, fast=False))
            with torch.inference_mode():
                got_peft, got_mixed, got_v1 = runs["peft"](), runs["mixed"](), runs["v1"]()  # warm-up; they agree
                err = float((got_mixed - got_peft).norm() / got_peft.norm())
                err_v1 = float((got_mixed - got_v1).norm() / got_v1.norm())
                times = {name: [] for name in runs}
                order = list(runs)
                for rep in range(args.repeats):
                    for name in order if rep % 2 == 0 else order[::-1]:
                        t0 = time.perf_counter()
                        runs[name]()
                        times[name].append(time.perf_counter() - t0)
            row = {"rows": rows, "tokens": tokens, "adapters": k, "peft_vs_mixed_rel_err": err,
                   "v1_vs_mixed_rel_err": err_v1, "v1/base": paired(times["v1"], times["base"]),
                   "mixed/v1": paired(times["mixed"], times["v1"]),
                   "ms": {name: 1000 * statistics.median(t) for name, t in times.items()},
                   "mixed/base": paired(times["mixed"], times["base"]),
                   "mixed/floor": paired(times["mixed"], times["floor"]),
                   "mixed/peft": paired(times["mixed"], times["peft"]),
                   "peft/base": paired(times["peft"], times["base"])}
            results.append(row)
            print(_forward_line(row), flush=True)
    return results


def _forward_line(r: dict) -> str:
    def f(key):
        m, q1, q3 = r[key]
        return f"{m:.3f} [{q1:.2f}-{q3:.2f}]"

    return (f"| {r['rows']}x{r['tokens']} | {r['adapters']} | {r['ms']['base']:.0f} | {r['ms']['mixed']:.0f} | "
            f"{r['ms']['v1']:.0f} | {r['ms']['peft']:.0f} | {f('mixed/base')} | {f('v1/base')} | {f('mixed/v1')} | "
            f"{f('mixed/floor')} | {f('mixed/peft')} | {f('peft/base')} | {r['peft_vs_mixed_rel_err']:.1e} |")


# --- part 2: load and swap times ------------------------------------------------------------------------------
def bench_swap(args, dirs: list[Path]) -> dict:
    from loratune.serving import AdapterRegistry

    (model,) = base_models(args.model, 1)
    use = dirs[:min(8, len(dirs))]
    reg = AdapterRegistry(model, max_loras=max(1, len(use) // 2), max_cpu_loras=len(use), max_lora_rank=args.rank)
    for d in use:
        reg.register(d.name, d, preload=False)
    for d in use:  # cold: read from disk into host memory
        reg.host_adapter(d.name)
    for _ in range(3):  # swaps: more adapters than slots, so each acquire evicts and copies in
        for d in use:
            reg.acquire(d.name)
            reg.release(d.name)
    out = {"adapters": len(use), "load_ms": statistics.median(reg.stats.load_ms),
           "swap_ms": statistics.median(reg.stats.swap_ms), "swaps": reg.stats.swaps,
           "adapter_mb": reg.host[use[-1].name].nbytes / 2 ** 20}
    print(f"adapter load {out['load_ms']:.1f} ms, slot swap {out['swap_ms']:.2f} ms (median over {len(use)} loads, "
          f"{out['swaps']} swaps; {out['adapter_mb']:.1f} MB per adapter)", flush=True)
    return out


# --- part 3: the load test -----------------------------------------------------------------------------------
def offline_answers(args, pairs: set[tuple[str | None, str]], dirs: dict[str, Path], cache: dict) -> None:
    """Fill ``cache[(adapter, prompt)]`` with the offline greedy text (adapter None: the base model)."""
    from loratune import LoraModel, load_base_model

    todo = sorted({p for p in pairs if p not in cache}, key=lambda p: (p[0] or "", p[1]))
    if not todo:
        return
    model, tok = load_base_model(args.model)
    model.eval()
    lm = None
    for adapter in sorted({a for a, _ in todo}, key=lambda a: a or ""):
        if adapter is None:
            runner = model if lm is None else None
        else:
            if lm is None:
                lm = LoraModel.from_pretrained(model, dirs[adapter], adapter_name=adapter)
            else:
                lm.load_adapter(dirs[adapter], adapter)
            lm.set_adapter(adapter)
            runner = lm
        for a, prompt in todo:
            if a != adapter:
                continue
            ids = torch.tensor([tok(prompt).input_ids])
            with torch.inference_mode():
                if runner is None:  # the base after adapters were added
                    with lm.disable_adapter():
                        out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=args.max_tokens, pad_token_id=tok.eos_token_id)
                else:
                    out = runner.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=args.max_tokens, pad_token_id=tok.eos_token_id)
            cache[a, prompt] = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        if adapter is not None and len(lm.peft_config) > 1:
            lm.delete_adapter(adapter)


def _counters(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(url + "/metrics", trust_env=False).text
    return {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}


def scenario(args, name: str, names: list[str], flags: list[str], policy: str, work: Path, dirs: dict[str, Path],
             cache: dict, design: str = "v3", warm: bool = False) -> dict:
    """One load-test run; ``warm``: first one untimed request per adapter (1 token), so every adapter is in host
    memory when the timed requests start."""
    jobs = [(names[j % len(names)], PROMPTS[(j // len(names) + j) % len(PROMPTS)]) for j in range(args.requests)]
    proc, url = start_server(args, [*flags, "--policy", policy], work / f"server-{name}-{design}.log", design)
    try:
        if warm:
            warmup = asyncio.run(client_run(url, [(n, PROMPTS[0]) for n in names], args.clients, 1, 3600))
            bad = [r["error"] for r in warmup["results"] if r is None or r["error"]]
            if bad:
                raise RuntimeError(f"the warm-up failed: {bad[:3]}")
        before = _counters(url)
        load0 = os.getloadavg()[0]
        run = asyncio.run(client_run(url, jobs, 1 if policy == "sequential" else args.clients, args.max_tokens,
                                      args.time_limit, args.stagger))
        counters = _counters(url)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    done = [(j, r) for j, r in zip(jobs, run["results"]) if r is not None]
    ok = [(j, r) for j, r in done if r["error"] is None]
    offline_answers(args, {j for j, _ in ok} | {(None, p) for (_, p), _ in ok}, dirs, cache)
    differ = [j for j, r in ok if r["text"] != cache[j]]
    not_base = sum(r["text"] != cache[None, j[1]] for j, r in ok)
    lat = sorted(r["latency"] for _, r in ok) or [float("nan")]
    ttft = sorted(r["ttft"] for _, r in ok) or [float("nan")]
    tokens = sum(r["tokens"] for _, r in ok)
    wall = run["wall"]

    def pct(v, q):
        return v[min(len(v) - 1, int(q * len(v)))]

    def delta(key):
        return counters.get(key, 0.0) - before.get(key, 0.0)

    out = {"scenario": name, "design": design, "policy": policy, "registered": len(names), "sent": len(done),
           "ok": len(ok),
           "errors": len(done) - len(ok), "differ_from_offline": len(differ), "differ_from_base": not_base,
           "wall_s": wall, "req_per_s": len(ok) / wall, "tok_per_s": tokens / wall, "tokens": tokens,
           "p50_ms": 1000 * pct(lat, 0.5), "p99_ms": 1000 * pct(lat, 0.99), "ttft_p50_ms": 1000 * pct(ttft, 0.5),
           "ttft_p99_ms": 1000 * pct(ttft, 0.99), "adapter_loads": delta("loratune_adapter_loads_total"),
           "adapter_swaps": delta("loratune_adapter_swaps_total"), "decode_steps": delta("loratune_decode_steps_total"),
           "warm": warm, "stagger_s": args.stagger, "loadavg_1min": [load0, os.getloadavg()[0]],
           "first_errors": [r["error"] for _, r in done if r["error"]][:3], "first_differences": differ[:3]}
    print(_load_line(out), flush=True)
    return out


def _load_line(r: dict) -> str:
    return (f"| {r['scenario']} | {r['design']} | {r['policy']} | {r['registered']} | {r['ok']}/{r['sent']} | "
            f"{r['errors']} | "
            f"{r['differ_from_offline']} | {r['differ_from_base']} | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} | "
            f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
            f"{r['adapter_loads']:.0f} | {r['adapter_swaps']:.0f} |")


def bench_load(args, work: Path, dirs: list[Path]) -> list[dict]:
    by_name = {d.name: d for d in dirs}
    eight = [d.name for d in dirs[:8]]
    common = ["--max-loras", str(args.max_loras), "--max-cpu-loras", str(args.max_cpu_loras)]
    adapter_flags = lambda names: [f for n in names for f in ("--adapter", f"{n}={by_name[n]}")]  # noqa: E731
    plans = {"8": ("continuous", eight, adapter_flags(eight)),
             "1": ("continuous", eight[:1], adapter_flags(eight[:1])),
             "many": ("continuous", [d.name for d in dirs], ["--adapters", str(dirs[0].parent)]),  # all in the root
             "resident": ("continuous", [d.name for d in dirs],
                          ["--adapters", str(dirs[0].parent), "--max-cpu-loras", str(max(args.max_cpu_loras,
                                                                                         len(dirs)))]),
             "static": ("static", eight, adapter_flags(eight)),
             "sequential": ("sequential", eight, adapter_flags(eight))}
    # the offline answers are kept beside the adapters (generated from fixed seeds), so later runs reuse them
    saved = work / f"offline-{Path(args.model).name}-r{args.rank}-t{args.max_tokens}.json"
    cache: dict = {}
    if saved.is_file():
        cache = {(a or None, p): text for a, p, text in json.loads(saved.read_text())}
    out = []
    for rnd in range(args.rounds):
        for i, name in enumerate(args.scenarios):
            policy, names, flags = plans[name]
            label = {"many": f"{args.many} adapters, cold", "resident": f"{args.many} adapters, in host memory",
                     "static": "static", "sequential": "sequential"}.get(name, f"{name} adapter{'s' * (name != '1')}")
            for design in args.designs if (i + rnd) % 2 == 0 else args.designs[::-1]:  # alternate the order
                r = scenario(args, label, names, [*common, *flags], policy, work, by_name, cache, design,
                             warm=name == "resident")
                out.append({**r, "round": rnd})
                saved.write_text(json.dumps([[a or "", p, text] for (a, p), text in cache.items()]))
    return out


def many_ratios(load: list[dict]) -> list[dict]:
    """Per round and design, requests/s of each other continuous scenario over the 8-adapter one's."""
    out = []
    for r in load:
        eight = [e for e in load if e["scenario"] == "8 adapters" and e["design"] == r["design"]
                 and e.get("round") == r.get("round")]
        if eight and r["scenario"] != "8 adapters" and r["policy"] == "continuous":
            out.append({"round": r.get("round"), "design": r["design"], "scenario": r["scenario"],
                        "vs_8_adapters": r["req_per_s"] / eight[0]["req_per_s"]})
    return out


LOAD_HEADER = ("| scenario | design | policy | registered | answered/sent | errors | differ from offline | "
               "differ from base | "
               "req/s | tok/s | p50 ms | p99 ms | TTFT p50 ms | TTFT p99 ms | adapter loads | slot swaps |\n"
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
FORWARD_HEADER = ("| rows x tokens | adapters | base ms | mixed ms | v1 ms | PEFT ms | mixed/base | v1/base | mixed/v1 "
                  "| mixed/floor | mixed/PEFT | PEFT/base | mixed vs PEFT rel. diff |\n"
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    own = args.work is None
    work = Path(args.work or tempfile.mkdtemp(prefix="loratune-serving-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    need = max([*args.adapters, 8] if "forward" in args.parts else [8])
    if "load" in args.parts and {"many", "resident"} & set(args.scenarios):
        need = max(need, args.many)  # (the many-adapter server registers every adapter made)
    result: dict = {"model": args.model, "rank": args.rank, "torch_threads": torch.get_num_threads(),
                    "loadavg_start": os.getloadavg()}
    try:
        t0 = time.perf_counter()
        dirs = make_adapters(args.model, work / "adapters", need, args.rank)
        print(f"{len(dirs)} adapters r={args.rank} ready in {time.perf_counter() - t0:.0f} s under {work}", flush=True)
        if "forward" in args.parts:
            print(FORWARD_HEADER, flush=True)
            result["forward"] = bench_forward(args, dirs)
        if "swap" in args.parts:
            result["swap"] = bench_swap(args, dirs)
        if "load" in args.parts:
            print(LOAD_HEADER, flush=True)
            result["load"] = bench_load(args, work, dirs)
            result["vs_8_adapters"] = many_ratios(result["load"])
            for r in result["vs_8_adapters"]:
                print(f"round {r['round']} {r['design']}: {r['scenario']} / 8 adapters = {r['vs_8_adapters']:.2f}",
                      flush=True)
    finally:
        result["loadavg_end"] = os.getloadavg()
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        if own:
            shutil.rmtree(work, ignore_errors=True)  # (only the temp folder this run made)
    return 0


if __name__ == "__main__":
    sys.exit(main())
