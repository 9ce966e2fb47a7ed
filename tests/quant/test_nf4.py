"""The NF4 tensor format against bitsandbytes' own ``quantize_4bit`` / ``dequantize_4bit`` on CPU: the same code
tables, the same packed codes, the same (double-quantized) scales and the same dequantized values, bit for bit."""

from __future__ import annotations

import pytest
import torch

from loratune.errors import ConfigError, LoraTuneError
from loratune.quant import DYNAMIC_CODE, NF4_CODE, NF4Tensor, native, nf4, quantize_nf4

bnb = pytest.importorskip("bitsandbytes")
BF = pytest.importorskip("bitsandbytes.functional")

# (shape, why): sizes that are and are not multiples of the block size and of 256 blocks, an odd count, 1-D and 3-D
SHAPES = {
    "64x64": (64, 64),
    "96x200 (300 blocks: a short 256-block)": (96, 200),
    "33x17 (561 values: a short block, odd)": (33, 17),
    "1-D 1000": (1000,),
    "3-D 3x5x130": (3, 5, 130),
    "576x1536 (SmolLM2's MLP)": (576, 1536),
}


def weight(shape, seed, dtype=torch.float32) -> torch.Tensor:
    """Fresh random weights with a few outliers, as trained layers have."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    flat = w.view(-1)
    idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 500),), generator=g)
    flat[idx] *= 20
    return w.to(dtype)


def reference(w: torch.Tensor, blocksize: int, double_quant: bool):
    packed, state = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    return packed, state


def bnb_dequantize(packed, state, dtype) -> torch.Tensor:
    state.dtype = dtype
    return BF.dequantize_4bit(packed, state, quant_type="nf4")


def bnb_reference_dequantize(packed, state, dtype) -> torch.Tensor:
    """bitsandbytes' device-independent torch implementation of dequantize_4bit (its "default" backend). Its CPU
    kernel agrees with it except where a block is longer than a row (blocksize > the last dimension): there the
    kernel reads the wrong scales (seen with bitsandbytes 0.50.2: 0.67 relative error on a 64x64 weight at
    blocksize 128), so where the two differ loratune follows this one."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = state.absmax
    if state.nested:
        absmax = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    return compute(packed.view(-1), absmax, _get_4bit_code("nf4", packed.device), state.blocksize, state.shape, dtype)


def test_code_tables_are_bitsandbytes():
    assert torch.equal(NF4_CODE, BF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(DYNAMIC_CODE, BF.create_dynamic_map())


@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "fp32-scales"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_codes_scales_and_values_are_bitsandbytes(shape, double_quant):
    for seed, blocksize, dtype in ((sum(shape), 64, torch.float32), (sum(shape) + 1, 128, torch.bfloat16),
                                   (sum(shape) + 2, 32, torch.float16)):
        w = weight(shape, seed, dtype)
        q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
        packed, state = reference(w, blocksize, double_quant)
        assert q.packed.dtype == torch.uint8 and q.packed.shape == ((w.numel() + 1) // 2,)
        assert torch.equal(q.packed, packed.view(-1)), "packed codes differ"
        assert torch.equal(q.absmax, state.absmax), "block scales (or their 8-bit codes) differ"
        if double_quant:
            assert torch.equal(q.absmax2, state.state2.absmax)
            assert torch.equal(q.offset, state.offset)
        else:
            assert q.absmax2 is None and q.offset is None
        assert q.shape == w.shape and q.dtype == dtype
        for out in (torch.float32, torch.bfloat16):
            ours = q.dequantize(out)
            assert ours.dtype == out and ours.shape == w.shape
            assert torch.equal(ours, bnb_reference_dequantize(packed, state, out)), f"dequantized {out} differ"
            if shape[-1] % blocksize == 0 or len(shape) == 1:  # where bitsandbytes' CPU kernel is right
                theirs = bnb_dequantize(packed, state, out).view(w.shape)  # (1-D comes back as 1 x n)
                assert torch.equal(ours, theirs), f"dequantized {out} values differ"


def test_ties_zero_blocks_and_extremes_are_bitsandbytes():
    """Values exactly on the midpoints between NF4 codes (they go down), blocks of zeros, ±absmax."""
    mids = nf4._NF4_BOUNDS
    block = torch.cat([mids, -mids, torch.tensor([1.0, -1.0]), torch.zeros(64 - 2 * mids.numel() - 2)])
    w = torch.cat([block, torch.zeros(64), block * 3.5, block.flip(0) * 1e-3]).view(4, 64)
    for double_quant in (True, False):
        q = quantize_nf4(w, double_quant=double_quant)
        packed, state = reference(w, 64, double_quant)
        assert torch.equal(q.packed, packed.view(-1))
        assert torch.equal(q.absmax, state.absmax)
        assert torch.equal(q.dequantize(), bnb_dequantize(packed, state, torch.float32))
    assert (q.packed[32:64] == 0x77).all(), "a block of zeros is code 7 (0.0) throughout"


def test_short_last_block_divides_as_bitsandbytes():
    """The short last block is x/m (a division), the full blocks x·(1/m): values picked so that the two round to
    different codes must come out as bitsandbytes writes them."""
    am = torch.tensor(0.7300001)
    picked = []
    for mid in nf4._NF4_BOUNDS:
        x = (mid * am).reshape(1)
        for _ in range(40):
            if torch.bucketize(x / am, nf4._NF4_BOUNDS) != torch.bucketize(x * (1.0 / am), nf4._NF4_BOUNDS):
                picked.append(x.clone())
            x = torch.nextafter(x, torch.tensor(1.0) * mid.sign())
    assert len(picked) >= 3, "no value tells the two roundings apart"
    tail = torch.cat([am.reshape(1), *picked])[:63]
    w = torch.cat([weight((64,), 9), tail])
    q = quantize_nf4(w, double_quant=False)
    packed, state = reference(w, 64, False)
    assert torch.equal(q.packed, packed.view(-1))


def test_scale_codes_are_bitsandbytes_cpu_table():
    """The 8-bit double quantization (bitsandbytes' CPU lookup table) on many values, incl. near-midpoint ones."""
    g = torch.Generator().manual_seed(5)
    mids = (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) / 2
    n = 256 * 800
    near = (mids[torch.randint(0, 255, (n,), generator=g)] + torch.randn(n, generator=g) * 2e-5).clamp(-1, 1)
    near.view(-1, 256)[:, 0] = 1.0  # each block's absmax is 1: the values stay near the midpoints when scaled
    for v in (torch.randn(300_000, generator=g), torch.rand(100_000, generator=g) - 0.3, near):
        codes, absmax = nf4._code8(v)
        ref_codes, ref_state = BF.quantize_blockwise(v, blocksize=256)
        assert torch.equal(absmax, ref_state.absmax)
        assert torch.equal(codes, ref_codes)


def test_kernel_and_torch_paths_agree_bit_for_bit():
    lib = native.LIBRARY.get()
    if lib is None:
        pytest.skip("the NF4 kernel could not be built here (no C compiler)")
    for i, shape in enumerate(SHAPES.values()):
        q = quantize_nf4(weight(shape, 100 + i), blocksize=(32, 64, 256)[i % 3])
        with_kernel = {d: q.dequantize(d) for d in (torch.float32, torch.bfloat16)}
        native.LIBRARY.lib = None
        try:
            for d, values in with_kernel.items():
                assert torch.equal(values, q.dequantize(d)), (shape, d)
            start = 2 * q.blocksize  # a slice that starts at a block and ends inside one
            if q.numel() > start + 70:
                part_torch = q.dequantize_flat(start, start + 69)
        finally:
            native.LIBRARY.lib = lib
        if q.numel() > start + 70:
            assert torch.equal(part_torch, q.dequantize_flat(start, start + 69))
            assert torch.equal(part_torch, with_kernel[torch.float32].view(-1)[start:start + 69])


def test_quantizing_kernel_and_torch_paths_agree_bit_for_bit():
    """The compiled quantizer (``native.quantize``) against the torch path: every shape above at several block
    sizes, bf16 and fp16 inputs, ties on every midpoint, zero blocks, values that tell x/m from x·(1/m) in a short
    block, and weights longer than one chunk; and both refuse a NaN in any position."""
    lib = native.LIBRARY.get()
    if lib is None:
        pytest.skip("the NF4 kernel could not be built here (no C compiler)")
    mids = nf4._NF4_BOUNDS
    block = torch.cat([mids, -mids, torch.tensor([1.0, -1.0]), torch.zeros(64 - 2 * mids.numel() - 2)])
    cases = [weight(shape, 200 + i, dtype) for i, shape in enumerate(SHAPES.values())
             for dtype in (torch.float32, torch.bfloat16, torch.float16)]
    cases += [torch.cat([block, torch.zeros(64), block * 3.5, block.flip(0)[:37] * 1e-3]),
              weight((nf4._QUANT_CHUNK + 3 * 64 + 5,), 7), torch.tensor([0.7300001, 0.2043, -0.5, 0.0, 1e-30])]
    for i, w in enumerate(cases):
        for blocksize in (32, 64, 256):
            with_kernel = quantize_nf4(w, blocksize=blocksize, double_quant=i % 2 == 0)
            native.LIBRARY.lib = None
            try:
                with_torch = quantize_nf4(w, blocksize=blocksize, double_quant=i % 2 == 0)
            finally:
                native.LIBRARY.lib = lib
            for key, t in with_torch.state().items():
                assert torch.equal(t, with_kernel.state()[key]), (i, tuple(w.shape), blocksize, key)
    for where in (0, 63, 64, 100):
        w = weight((101,), 3)
        w[where] = float("nan")
        for kernel in (lib, None):
            native.LIBRARY.lib = kernel
            try:
                with pytest.raises(LoraTuneError, match="NaN or infinite"):
                    quantize_nf4(w)
            finally:
                native.LIBRARY.lib = lib


def test_storage_is_about_4127_bits_per_weight():
    q = quantize_nf4(weight((1024, 1024), 7))
    assert q.nbytes == 1024 * 1024 // 2 + 1024 * 1024 // 64 + 4 * (1024 * 1024 // 64 // 256) + 4
    assert 4.12 < q.bits_per_weight() <= 4.13
    assert quantize_nf4(weight((1024, 1024), 7), double_quant=False).bits_per_weight() == 4.5
    assert isinstance(q, NF4Tensor) and q.is_floating_point() and not q.requires_grad
    assert q.device == torch.device("cpu") and q.numel() == 1024 * 1024


@pytest.mark.parametrize("bad, error, words", [
    (lambda: quantize_nf4(torch.ones(64, dtype=torch.int32)), ConfigError, ["torch.int32", "float32"]),
    (lambda: quantize_nf4(weight((64,), 0), blocksize=48), ConfigError, ["48", "64"]),
    (lambda: quantize_nf4(torch.tensor([1.0, float("nan")] * 40)), LoraTuneError, ["NaN", "clean copy"]),
    (lambda: quantize_nf4(torch.tensor([1.0] * 63 + [float("inf")])), LoraTuneError, ["infinite"]),
    (lambda: quantize_nf4(torch.empty(0, 4)), ConfigError, ["empty"]),
    (lambda: quantize_nf4(weight((64,), 0)).dequantize(torch.int8), ConfigError, ["torch.int8", "bfloat16"]),
])
def test_bad_input_is_one_line_naming_the_fix(bad, error, words):
    with pytest.raises(error) as e:
        bad()
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_the_top_level_api_is_the_spec():
    """``loratune.quantize_nf4(weight, blocksize=64, double_quant=True) -> NF4Tensor`` with ``.dequantize(dtype=)``,
    ``.packed``, ``.absmax`` and its double-quantization state, and ``.nbytes``, as the issue names them."""
    import loratune
    from loratune import quant

    assert loratune.quantize_nf4 is quant.quantize_nf4 and loratune.NF4Tensor is NF4Tensor
    assert loratune.NF4Linear is quant.NF4Linear
    w = weight((40, 64), 11)
    q = loratune.quantize_nf4(w, blocksize=64, double_quant=True)
    packed, state = reference(w, 64, True)
    assert q.packed.dtype == torch.uint8 and torch.equal(q.packed, packed.view(-1))
    assert q.absmax.dtype == torch.uint8 and torch.equal(q.absmax, state.absmax)
    assert torch.equal(q.absmax2, state.state2.absmax) and torch.equal(q.offset, state.offset)
    assert q.nbytes == q.packed.nbytes + q.absmax.nbytes + q.absmax2.nbytes + q.offset.nbytes
    assert torch.equal(q.dequantize(dtype=torch.bfloat16), bnb_reference_dequantize(packed, state, torch.bfloat16))
    assert q.dequantize().dtype == torch.float32 and q.dequantize().shape == w.shape
