"""``loratune combine``, ``analyze``, ``extract`` and ``resize``: the compose tools on adapter directories.

``add_parsers(sub)`` adds the four subcommands to the ``loratune`` parser's subparsers; each ``cmd_*`` takes the
parsed arguments and returns the exit code. Bad input is a ``LoraTuneError`` (one line, naming the fix).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import LoraTuneError

COMMANDS = ("combine", "analyze", "extract", "resize")


def add_parsers(sub) -> None:
    """Add combine, analyze, extract and resize to ``sub`` (an argparse subparsers object)."""
    from ..adapters.weighted import COMBINATION_TYPES

    c = sub.add_parser("combine", help="combine adapters: weighted sum, SVD, TIES, DARE (PEFT's modes)",
                       description="One adapter from several: cat (exact Σ wᵢ·ΔWᵢ), svd (that, truncated), "
                                   "ties/dare/magnitude_prune (with _svd: on ΔW), linear (PEFT's factor-wise mode).")
    c.add_argument("--adapter", action="append", required=True, help="an adapter directory (repeat: one per adapter)")
    c.add_argument("--weights", help="comma-separated, one per adapter (default: equal, summing to 1)")
    c.add_argument("--method", default="svd", choices=COMBINATION_TYPES, metavar="METHOD",
                   help=f"one of {', '.join(COMBINATION_TYPES)} (default: svd)")
    c.add_argument("--density", type=float, help="fraction of entries kept, in (0, 1] (ties, dare, magnitude_prune)")
    c.add_argument("--svd-rank", type=int, help="rank of the result (svd modes; default: the largest input rank)")
    c.add_argument("--svd-clamp", type=float, help="PEFT's quantile clamp of the SVD factors, e.g. 0.99")
    c.add_argument("--majority-sign", default="total", choices=("total", "frequency"), help="TIES' sign election")
    c.add_argument("--seed", type=int, help="seed of DARE's random drops (default: not reproducible)")
    c.add_argument("--allow-partial", action="store_true", help="adapters may target different modules (missing: 0)")
    c.add_argument("--any-base", action="store_true", help="do not require one base_model_name_or_path")
    _out_args(c)

    a = sub.add_parser("analyze", help="the rank an adapter really uses: spectra, energy ranks, recommended r",
                       description="Per module: singular values of ΔW, ranks holding 90/99 % of its energy, "
                                   "effective rank, ‖ΔW‖/‖W0‖ (with --base); a recommended r and rank_pattern.")
    a.add_argument("--adapter", required=True, help="adapter directory")
    a.add_argument("--base", help="base model (bundled name, HF dir, .gguf) for ‖ΔW‖/‖W0‖")
    a.add_argument("--plot", help="write the spectra and a per-layer heat map to this PNG")
    a.add_argument("--json", action="store_true", help="print JSON instead of a table")

    e = sub.add_parser("extract", help="a LoRA adapter from a fully fine-tuned model (SVD of W_tuned − W_base)",
                       description="Per Linear module, the best rank-r approximation of W_tuned − W_base.")
    e.add_argument("--base", required=True, help="the base model (bundled name, HF dir or .gguf)")
    e.add_argument("--tuned", required=True, help="the fine-tuned (or merged) model, same architecture")
    e.add_argument("--r", type=int, required=True, help="rank of the adapter")
    e.add_argument("--alpha", type=float, help="lora_alpha (default: r, so scaling 1)")
    e.add_argument("--target-modules", help="comma-separated module names (default: every Linear but the head)")
    _out_args(e)

    r = sub.add_parser("resize", help="change an adapter's rank by SVD of ΔW (shrink, or pad exactly)")
    r.add_argument("--adapter", required=True, help="adapter directory")
    r.add_argument("--r", type=int, required=True, help="the new rank")
    r.add_argument("--rank-pattern", help="JSON object of per-module ranks, e.g. '{\"v_proj\": 4}' (from analyze)")
    _out_args(r)


def _out_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="a new or empty directory, or one a compose command wrote")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out that loratune did not write")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _weights(text: str | None, n: int) -> list[float]:
    if text is None:
        return [1.0 / n] * n
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise LoraTuneError(f"--weights {text!r} is not a comma-separated list of numbers; e.g. --weights 0.7,0.3"
                            ) from None
    return weights


def _print(report: dict, as_json: bool, line: str) -> None:
    print(json.dumps(report, indent=2, sort_keys=True) if as_json else line)


def cmd_combine(args) -> int:
    from ..compose import combine_adapters, load_adapter, save_adapter
    from ..compose.io import check_out_dir

    out = Path(args.out)
    check_out_dir(out, args.overwrite, keep=tuple(Path(a) for a in args.adapter))
    adapters = [load_adapter(a) for a in args.adapter]
    weights = _weights(args.weights, len(adapters))
    result, report = combine_adapters(adapters, weights, args.method, svd_rank=args.svd_rank, density=args.density,
                                      majority_sign_method=args.majority_sign, seed=args.seed,
                                      svd_clamp=args.svd_clamp, allow_partial=args.allow_partial,
                                      check_base=not args.any_base, name=str(out))
    provenance = {"command": "combine", "adapters": args.adapter, "weights": weights, "method": args.method,
                  "density": args.density, "svd_rank": args.svd_rank, "seed": args.seed}
    save_adapter(result, out, provenance, companions_from=args.adapter[0])
    _print({**provenance, "ranks": report.ranks, "energy_kept": report.energy_kept}, args.json,
           f"{report.summary()}\ncombined adapter written to {out}")
    return 0


def cmd_analyze(args) -> int:
    from ..compose import load_adapter
    from ..compose.rank import analyze_adapter, format_analysis

    if args.plot and Path(args.plot).is_dir():
        raise LoraTuneError(f"--plot {args.plot} is a directory; give a file name such as spectra.png")
    adapter = load_adapter(args.adapter)
    base = None
    if args.base:
        from ..models import load_base_model

        base = load_base_model(args.base)[0].state_dict()
    analysis = analyze_adapter(adapter, base)
    if args.plot:
        from ..compose.plot import plot_analysis

        plot_analysis(analysis, args.plot, title=f"{args.adapter}: recommended r = {analysis.recommended_r}")
    if args.json:
        print(json.dumps(analysis.to_dict(), indent=2))
    else:
        print(format_analysis(analysis) + (f"\nplot written to {args.plot}" if args.plot else ""))
    return 0


def cmd_extract(args) -> int:
    from ..compose import save_adapter
    from ..compose.extract import extract_lora
    from ..compose.io import check_out_dir
    from ..models import load_base_model

    out = Path(args.out)
    check_out_dir(out, args.overwrite, keep=tuple(Path(p) for p in (args.base, args.tuned) if Path(p).exists()))
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()] if args.target_modules else None
    base, _ = load_base_model(args.base)
    tuned, _ = load_base_model(args.tuned)
    adapter, report = extract_lora(base, tuned, args.r, lora_alpha=args.alpha, target_modules=targets,
                                   name=str(out))
    provenance = {"command": "extract", "base": args.base, "tuned": args.tuned, "r": args.r}
    companions = args.tuned if Path(args.tuned).is_dir() else None
    save_adapter(adapter, out, provenance, companions_from=companions)
    _print({**provenance, "energy_kept": report.energy_kept, "unchanged": report.unchanged,
            "not_captured": report.not_captured}, args.json, f"{report.summary()}\nadapter written to {out}")
    return 0


def cmd_resize(args) -> int:
    from ..compose import load_adapter, save_adapter
    from ..compose.io import check_out_dir
    from ..compose.rank import resize_adapter

    out = Path(args.out)
    check_out_dir(out, args.overwrite, keep=(Path(args.adapter),))
    pattern = None
    if args.rank_pattern:
        try:
            pattern = json.loads(args.rank_pattern)
        except ValueError:
            pattern = None
        if not isinstance(pattern, dict) or not all(isinstance(v, int) and v > 0 for v in pattern.values()):
            raise LoraTuneError(f"--rank-pattern {args.rank_pattern!r} is not a JSON object of positive ranks; "
                                "e.g. --rank-pattern '{\"v_proj\": 4}'")
    adapter = load_adapter(args.adapter)
    result, kept = resize_adapter(adapter, args.r, pattern)
    save_adapter(result, out, {"command": "resize", "adapter": args.adapter, "r": args.r, "rank_pattern": pattern},
                 companions_from=args.adapter)
    e = list(kept.values())
    _print({"r": args.r, "rank_pattern": pattern, "energy_kept": kept}, args.json,
           f"resized {len(e)} modules to r={args.r}; energy kept: mean {100 * sum(e) / len(e):.2f} %, "
           f"min {100 * min(e):.2f} %\nadapter written to {out}")
    return 0


COMMAND_FUNCTIONS = {"combine": cmd_combine, "analyze": cmd_analyze, "extract": cmd_extract, "resize": cmd_resize}
