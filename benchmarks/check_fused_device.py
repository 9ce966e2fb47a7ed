"""The fused LoRA linear on another device (a GPU) against float64 on the CPU: values and gradients.

The unit tests check the fused path on the CPU; this runs the same comparison where the kernels are CUDA's (CI
has no GPU). For each base dtype (fp32 adapters on half bases, as loratune creates them) and dropout rate, on
fresh random inputs: the relative error ‖got - want‖ / ‖want‖ of the output and of the gradients of x, A and B,
where want is float64 on the CPU from the same values and the same dropout mask. Exits 1 if one is over its bound:
1e-5 for fp32 results (tf32 off), the dtype's epsilon for half-precision ones.

    python benchmarks/check_fused_device.py --device cuda
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from loratune.ops import linear as fused


def check(device: str, base_dtype: torch.dtype, p: float, seed: int, tokens=2048, n_in=576, n_out=1536, r=16):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x64, W64, A64, B64, up64 = mk(tokens, n_in), mk(n_out, n_in) / n_in**0.5, mk(r, n_in), mk(n_out, r), \
        mk(tokens, n_out)
    x64, W64, up64 = (t.to(base_dtype).double() for t in (x64, W64, up64))  # values the half dtype can hold
    A64, B64 = A64.double(), B64.double()  # fp32 values
    x = x64.to(device, base_dtype).requires_grad_()
    W = W64.to(device, base_dtype)
    A, B = (t.float().to(device).requires_grad_() for t in (A64, B64))
    draws = []
    new_draw = fused.new_draw
    fused.new_draw = lambda *a: draws.append(new_draw(*a)) or draws[-1]
    try:
        out = fused.lora_linear(x, W, None, A, B, 2.0, p, training=True)
    finally:
        fused.new_draw = new_draw
    gx, gA, gB = torch.autograd.grad(out, [x, A, B], up64.to(device, base_dtype))
    keep = draws[0].keep(x.shape).cpu().double() / (1 - p) if p else 1.0
    ref_in = [t.clone().requires_grad_() for t in (x64, A64, B64)]
    ref = F.linear(ref_in[0], W64) + 2.0 * (ref_in[0] * keep) @ ref_in[1].t() @ ref_in[2].t()
    want = torch.autograd.grad(ref, ref_in, up64)
    err = lambda a, b: ((a.cpu().double() - b).norm() / b.norm()).item()  # noqa: E731
    return {"out": err(out, ref), "grad_x": err(gx, want[0]), "grad_A": err(gA, want[1]), "grad_B": err(gB, want[2])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    try:
        torch.device(args.device)
    except RuntimeError:
        ap.error(f"--device {args.device}: not a device name (use cuda, cuda:N or cpu)")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: this torch sees no CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    failed = False
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        base_tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
        for p in (0.0, 0.05):
            errs = check(args.device, dtype, p, seed=len(str(dtype)) + int(p * 100))
            bounds = {"out": base_tol, "grad_x": base_tol, "grad_A": 1e-5, "grad_B": 1e-5}
            bad = [k for k in errs if not errs[k] <= bounds[k]]  # (NaN fails too)
            failed |= bool(bad)
            print(f"{args.device} base {str(dtype)[6:]:8s} dropout {p:4}: "
                  + "  ".join(f"{k} {v:.1e}" for k, v in errs.items()) + ("  FAIL " + ",".join(bad) if bad else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
