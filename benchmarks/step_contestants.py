"""The contestants of the train-step benchmark (``train_step.py``): the steps timed (the frozen floors, loratune's,
PEFT's; loratune with a kernel treated as missing or on the other CPU route), the models they run on (built on one
shared copy of the base weights, with identical adapter weights) and the check that loratune and PEFT compute the
same function."""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_measure import zero_grads

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# what base_models loads when given no arguments: train_step.py's defaults
DEFAULT_MODEL_ARGS = argparse.Namespace(model="smollm2-135m-instruct", dtype="float32", device="cpu",
                                        random_weights=False)


def routes_apply(args) -> bool:
    """Whether loratune's products can take either CPU route (gemm.py): on CPU only."""
    return torch.device(args.device).type == "cpu"


def floor_step(model, batch):
    input_ids, mask, labels = batch
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss.backward()


def floor_chunked_step(model, batch):
    """The floor with loratune's loss (``causal_lm_loss``), so loratune/floor_chunked isolates the LoRA layers."""
    from loratune.ops import causal_lm_loss

    input_ids, mask, labels = batch
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    causal_lm_loss(model, None, mask, labels, inputs_embeds=embeds).backward()


def loratune_step(model, batch):
    from loratune.ops import causal_lm_loss

    input_ids, mask, labels = batch
    causal_lm_loss(model, input_ids, mask, labels).backward()


def without_kernel(fn, which: str):
    """``fn`` with one of loratune's compiled kernels treated as unavailable, so that its code falls back to what runs
    without a C compiler: ``"blocks"`` (RMSNorm and SwiGLU as torch ops) or ``"dropout"`` (the numpy draw of the same
    masks). ``loratune_no_blocks`` / ``loratune_no_dropout_kernel``: what each kernel earns, in the same run."""
    def run(*args):
        from loratune.ops import blocks, dropout

        library = {"blocks": blocks.LIBRARY, "dropout": dropout.LIBRARY}[which]
        library.get()  # built (or found missing) before the swap, so the restore puts back the real state
        before, library.lib = library.lib, None
        try:
            return fn(*args)
        finally:
            library.lib = before
    return run


KERNEL_CONTESTANTS = {"loratune_no_blocks": "blocks", "loratune_no_dropout_kernel": "dropout"}


def on_route(fn, route: str):
    """``fn`` with loratune's products on ``route``, "onednn" or "mkl" (torch.mm), whatever this CPU's default."""
    def run(*args):
        from loratune import settings

        with settings.override(onednn=route == "onednn"):
            return fn(*args)
    return run


def default_route() -> str:
    from loratune.ops import gemm

    return "onednn" if gemm.routing_on() else "mkl"


def other_route() -> str:
    """The route this CPU does not take by default: the one timed besides "loratune"."""
    return "mkl" if default_route() == "onednn" else "onednn"


class _FrozenLinearFunction(torch.autograd.Function):
    """x·Wᵀ + b with W and b frozen, its products through loratune's gemm (the input gradient only)."""

    @staticmethod
    def forward(ctx, x2, weight, bias):
        from loratune.ops import gemm

        ctx.save_for_backward(weight)
        return gemm.linear(x2, weight, bias)

    @staticmethod
    def backward(ctx, g):
        from loratune.ops import gemm

        (weight,) = ctx.saved_tensors
        return gemm.linear(g.contiguous(), weight.t()), None, None


class _RoutedFrozenLinear(torch.nn.Linear):
    def forward(self, x):
        out = _FrozenLinearFunction.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return out.view(*x.shape[:-1], out.shape[-1])


def route_frozen_linears(model, names=None):
    """loratune at rank 0: the frozen nn.Linear modules ``names`` (None: all) of ``model`` compute through
    ``gemm.linear`` as loratune's LoRA layers do. The output embedding is left alone: loratune's loss computes the
    logits itself (through gemm too), and a changed head would make ``causal_lm_loss`` fall back to the model's
    own loss."""
    head = model.get_output_embeddings()
    for name, m in model.named_modules():
        if type(m) is torch.nn.Linear and m is not head and (names is None or name in names):
            m.__class__ = _RoutedFrozenLinear
    return model


def peft_step(model, batch):
    input_ids, mask, labels = batch
    model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()


def load_model(args):
    """The model to measure, in ``args.dtype`` on ``args.device``: ``args.model`` (a bundled name or an HF folder)
    as loratune loads it, or with ``--random-weights`` that model's architecture from its config.json with random
    weights."""
    if args.random_weights:
        from transformers import AutoConfig, AutoModelForCausalLM

        from loratune.models import resolve_model_path

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model_path(args.model)))
    else:
        from loratune import load_base_model

        model = load_base_model(args.model)[0]
    return model.to(device=args.device, dtype=DTYPES[args.dtype])


def base_models(n: int, args=None) -> list:
    """n copies of the model (``load_model``) that share one copy of the weights (the first is frozen as the floor).

    Sharing is for the measurement: each model's weights land elsewhere in memory, and that alone moved the same
    frozen step by up to 15 % between fresh copies (cache and TLB placement), more than the effects measured
    here. On one copy of the weights, a ratio compares only what the contestants do with them."""
    models = [load_model(args or DEFAULT_MODEL_ARGS) for _ in range(n)]
    for m in models[1:]:
        for (name, p), (other, q) in zip(models[0].named_parameters(), m.named_parameters(), strict=True):
            assert name == other, (name, other)
            q.data = p.data
    models[0].requires_grad_(False)
    return models


def build_models(cfg: dict, args, routed_floor: bool = False):
    """(frozen base, loratune model, PEFT model, fused floor) with identical, non-trivial adapter weights, on shared
    base weights; the fused floor is the frozen base with loratune's fused blocks (``ops.accelerate``), i.e.
    loratune at rank 0. With ``routed_floor``, also that floor on loratune's kernels (``route_frozen_linears``)."""
    import peft

    from loratune import LoraConfig, get_lora_model, ops
    from loratune.adapters.state import adapter_tensors

    base, lt_base, peft_base, fused_floor, *rest = base_models(5 if routed_floor else 4, args)
    torch.manual_seed(0)
    lt = get_lora_model(lt_base, LoraConfig(**cfg, init_lora_weights=False))
    pcfg = peft.LoraConfig(**{k: v for k, v in cfg.items()}, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(peft_base, pcfg)  # fp32 adapters on a half base, as loratune's (PEFT's autocast)
    live = adapter_tensors(lt.model, lt.peft_config["default"], "default")
    weights = {k: v.detach().clone() for k, v in live.items()}
    result = peft.set_peft_model_state_dict(pm, weights)
    assert not result.unexpected_keys, result.unexpected_keys
    for m in (fused_floor, *rest):
        m.requires_grad_(False)  # frozen floors (base_models froze ``base`` already)
    for m in (base, lt, pm, fused_floor, *rest):
        m.train()
    ops.accelerate(fused_floor)
    if routed_floor:
        targets = {name for name, _ in lt.lora_layers()}  # the floor routes what loratune routes, no more
        ops.accelerate(rest[0])
        return base, lt, pm, fused_floor, route_frozen_linears(rest[0], targets)
    return base, lt, pm, fused_floor


def compile_decoder_layers(model) -> int:
    """torch.compile (inductor) on each decoder layer of ``model`` (a transformers model, or loratune's or PEFT's
    wrapper of one), as ``train.compile`` does; returns how many."""
    from loratune import ops

    ops.load_kernels()  # before tracing: loading a kernel takes a lock, which would break the graph
    hf = next((m for m in model.modules() if getattr(m, "_no_split_modules", None)), None)
    names = set(hf._no_split_modules) if hf is not None else set()
    layers = [m for m in model.modules() if type(m).__name__ in names]
    for layer in layers:
        layer.compile(backend="inductor")
    return len(layers)


def fp32_twin(lt, cfg: dict, args):
    """loratune's model on an fp32 copy of the base with ``lt``'s adapter weights (for ``--dtype`` other than fp32:
    the same step in fp32, timed in the same run)."""
    import argparse as _argparse

    from loratune import LoraConfig, get_lora_model
    from loratune.adapters.state import adapter_tensors

    twin = get_lora_model(load_model(_argparse.Namespace(**{**vars(args), "dtype": "float32"})),
                          LoraConfig(**cfg, init_lora_weights=False))
    src = adapter_tensors(lt.model, lt.peft_config["default"], "default")
    dst = adapter_tensors(twin.model, twin.peft_config["default"], "default")
    with torch.no_grad():
        for k, v in src.items():
            dst[k].copy_(v)
    twin.train()
    return twin


def _adapter_grads(lt, pm) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The A/B gradients of loratune's model and of PEFT's, in the same order (PEFT file keys)."""
    from loratune.adapters.state import adapter_tensors

    peft_params = dict(pm.named_parameters())
    ours, theirs = [], []
    # PEFT file key -> loratune's live parameter
    for key, p in adapter_tensors(lt.model, lt.peft_config["default"], "default").items():
        ours.append(p.grad.double())
        theirs.append(peft_params[key.replace(".lora_A.weight", ".lora_A.default.weight")
                                  .replace(".lora_B.weight", ".lora_B.default.weight")].grad.double())
    return ours, theirs


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    return [((x - y).norm() / y.norm()).item() for x, y in zip(a, b)]


def check_same_function(lt, pm, batch) -> dict:
    """Without dropout (eval mode) the same adapters must give the same loss and the same gradients of A and B:
    |loss_loratune - loss_PEFT| and the largest ‖grad_loratune - grad_PEFT‖ / ‖grad_PEFT‖ over the adapters'
    tensors. In fp32 the two differ in rounding only. On a half-precision base each rounds differently, and the
    difference compounds over the layers, so there both are also compared with the same models upcast to fp32 (the
    same weight values): the median and largest error of each against that reference."""
    import copy

    from loratune.ops import causal_lm_loss

    def run(lt, pm):
        lt.eval(), pm.eval()
        a = causal_lm_loss(lt, *batch)
        b = pm(input_ids=batch[0], attention_mask=batch[1], labels=batch[2]).loss
        a.backward(), b.backward()
        grads = _adapter_grads(lt, pm)
        zero_grads(lt), zero_grads(pm)
        lt.train(), pm.train()
        return a.item(), b.item(), grads

    a, b, (ours, theirs) = run(lt, pm)
    out = {"loss_diff": abs(a - b), "grad_rel_diff": max(_rel(ours, theirs))}
    if next(lt.parameters()).dtype in (torch.float16, torch.bfloat16):
        ref_a, _, (ref, _) = run(copy.deepcopy(lt).float(), copy.deepcopy(pm).float())
        for who, loss, grads in (("loratune", a, ours), ("peft", b, theirs)):
            errs = _rel(grads, ref)
            out[f"{who}_vs_fp32"] = {"loss_diff": abs(loss - ref_a), "grad_rel_err_median": statistics.median(errs),
                                     "grad_rel_err_max": max(errs)}
    return out
