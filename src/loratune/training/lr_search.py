"""``train.lr: auto``: a short learning-rate search before the run, on the training data with a held-out slice.

Each candidate rate trains the run's own adapter from its initial weights (the model is loaded once; the adapter's
factors are put back to their seeded initial values between candidates, and the generator to its seeded state) for
a few dozen steps of the run's schedule compressed to that length, on the training rows less a held-out slice, and
is scored by the loss on that slice. The rates lie on a log grid (half decades, 5e-5…5e-3: small models want the top
of it, 7B models the middle, "LoRA Without Regret" 2025); the search starts at 1.5e-3 and walks down while the
held-out loss improves, else up, so that it usually tries three rates, never more than the plan allows.

The search costs at most ``SHARE`` of the run's steps (in step-equivalents: a candidate's steps plus its held-out
evaluation, a forward pass counted as a third of a step). A run too short for two candidates of ``MIN_STEPS`` steps
falls back to ``FALLBACK_LR`` with a note (a ConfigWarning), rather than refusing: a short run is usually a test.

The result is written to ``lr_search.json`` in the run directory before training starts, and read from there by a
resumed run (which then does not search again); ``lr_search.png`` plots it. Under the same seed, the search is
deterministic wherever training is.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .. import devices, ops
from ..data import collate
from ..errors import ConfigWarning
from ..fsutil import save_json
from .evaluate import eval_loss, response_loss_sum
from .optim import global_batch, lr_lambda, make_optimizer

GRID = (5e-5, 1.5e-4, 5e-4, 1.5e-3, 5e-3)
START = 3  # 1.5e-3: the usual best for the small models loratune trains on a CPU; bigger ones walk down
SHARE = 0.15  # of the run's steps
MIN_STEPS, MAX_STEPS = 5, 30  # per candidate
HELD_SHARE, HELD_MIN, HELD_MAX = 0.1, 8, 64  # rows of the training data held out for scoring
FALLBACK_LR = 2e-4  # PEFT's and Unsloth's usual LoRA rate: safe for big models, slow for small ones
EVAL_COST = 1 / 3  # a forward pass, in train steps (forward + backward)
RESULT, PLOT = "lr_search.json", "lr_search.png"


@dataclass
class SearchPlan:
    """What the search will do: ``steps_each`` steps for at most ``max_candidates`` rates of ``grid``, scored on
    ``held_out`` rows; ``cost`` is its worst case in step-equivalents. ``note`` (and no steps) when it cannot run."""
    grid: tuple[float, ...] = GRID
    start: int = START  # the grid index tried first
    steps_each: int = 0
    max_candidates: int = 0
    held_out: int = 0
    cost: float = 0.0
    note: str = ""

    @property
    def runs(self) -> bool:
        return self.max_candidates >= 2


@dataclass
class SearchResult:
    """The chosen rate and every candidate tried, as ``lr_search.json`` holds them."""
    lr: float
    candidates: list[dict] = field(default_factory=list)  # {"lr", "eval_loss"} in the order tried
    steps_each: int = 0
    held_out: int = 0
    seconds: float = 0.0
    note: str = ""

    def lines(self) -> list[str]:
        """What the run prints: one line per candidate, then the choice."""
        if not self.candidates:
            return [f"lr search: {self.note}"]
        out = [f"lr search: {len(self.candidates)} rates × {self.steps_each} steps, scored on {self.held_out} "
               f"held-out training rows ({self.seconds:.0f} s)"]
        for c in sorted(self.candidates, key=lambda c: c["lr"]):
            mark = "  <- chosen" if c["lr"] == self.lr else ""
            out.append(f"  lr {c['lr']:.1e}  held-out loss {c['eval_loss']:.4f}{mark}")
        return out


def plan_search(n_rows: int, run_steps: int, per_step: int) -> SearchPlan:
    """The search for a run of ``run_steps`` steps of ``per_step`` rows over ``n_rows`` training examples."""
    held = min(max(HELD_MIN, round(n_rows * HELD_SHARE)), HELD_MAX)
    if n_rows - held < per_step:
        return SearchPlan(note=f"{n_rows} training rows are too few to hold {held} out and still fill a step of "
                               f"{per_step}; using lr={FALLBACK_LR:g} (set train.lr to choose)")
    eval_cost = math.ceil(held / per_step) * EVAL_COST
    budget = SHARE * run_steps
    steps = min(MAX_STEPS, max(MIN_STEPS, math.floor(budget / 3 - eval_cost)))
    n = min(len(GRID), math.floor(budget / (steps + eval_cost)))
    if n < 2:
        need = math.ceil(2 * (MIN_STEPS + eval_cost) / SHARE)
        return SearchPlan(note=f"a run of {run_steps} steps is too short to search (2 rates × {MIN_STEPS} steps "
                               f"must stay within {SHARE:.0%} of it: ≥ {need} steps); using lr={FALLBACK_LR:g} "
                               "(set train.lr, or train more steps)")
    return SearchPlan(steps_each=steps, max_candidates=n, held_out=held, cost=n * (steps + eval_cost))


def split_for_search(n_rows: int, held: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices) of the training examples, chosen by ``seed``."""
    order = list(range(n_rows))
    random.Random(seed * 7919 + 1).shuffle(order)
    return sorted(order[held:]), sorted(order[:held])


def snapshot(lm) -> dict[str, torch.Tensor]:
    """Copies of ``lm``'s trainable tensors (the adapter's initial factors, to start every candidate from)."""
    return {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}


def restore(lm, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if n in saved:
                p.copy_(saved[n])


def search_lr(lm, examples: list, pad_id: int, tc, plan: SearchPlan, device) -> SearchResult:
    """Run ``plan`` on ``lm`` (a LoraModel, its adapter at its initial weights) and ``examples`` (the prepared
    training examples); ``lm``'s weights and torch's generator are left as they were found."""
    t0 = time.time()
    start, rng = snapshot(lm), torch.get_rng_state()
    train_ids, held_ids = split_for_search(len(examples), plan.held_out, tc.seed)
    held = [examples[i] for i in held_ids]
    scores: dict[int, float] = {}

    def score(i: int) -> float:
        if i not in scores:
            restore(lm, start)
            torch.set_rng_state(rng)
            scores[i] = _candidate(lm, examples, train_ids, held, pad_id, tc, plan.grid[i], plan.steps_each, device)
        return scores[i]

    best = plan.start
    score(best)
    for direction in (-1, 1):  # down while it improves; if the first step down did not, up while it improves
        j, moved = best + direction, False
        while 0 <= j < len(plan.grid) and len(scores) < plan.max_candidates and j not in scores:
            if score(j) < scores[best]:
                best, moved = j, True
                j += direction
            else:
                break
        if moved:
            break
    restore(lm, start)
    torch.set_rng_state(rng)
    lm.zero_grad(set_to_none=True)
    ops.clear_mask_cache()
    tried = [{"lr": plan.grid[i], "eval_loss": loss} for i, loss in scores.items()]
    return SearchResult(plan.grid[best], tried, plan.steps_each, plan.held_out, time.time() - t0)


def _candidate(lm, examples, train_ids, held, pad_id, tc, lr: float, steps: int, device) -> float:
    """The held-out loss after ``steps`` steps at ``lr`` (the run's schedule over ``steps``); inf if it diverged."""
    cfg = dataclasses.replace(tc, lr=lr)
    opt = make_optimizer(lm, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc.scheduler, int(tc.warmup_ratio * steps), steps))
    params = [p for p in lm.parameters() if p.requires_grad]
    per_step = tc.batch_size * tc.grad_accum
    per_epoch = max(1, math.ceil(len(train_ids) / per_step))
    lm.train()
    for step in range(steps):
        rows = [train_ids[i] for i in global_batch(step, len(train_ids), per_epoch, per_step, tc.seed)]
        n_tokens = sum(sum(1 for v in examples[i].labels[1:] if v != ops.IGNORE_INDEX) for i in rows)
        total = 0.0
        for k in range(0, len(rows), tc.batch_size):
            batch = devices.to_device(collate([examples[i] for i in rows[k:k + tc.batch_size]], pad_id), device)
            loss_sum, _ = response_loss_sum(lm, batch)
            (loss_sum / max(n_tokens, 1)).backward()
            total += loss_sum.item()
        if not math.isfinite(total):
            opt.zero_grad(set_to_none=True)
            return math.inf
        torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm or math.inf)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    loss = eval_loss(lm, held, pad_id, tc.eval_batch_size)["loss"]
    lm.train()
    return loss if math.isfinite(loss) else math.inf


def resolve_lr(lm, examples: list, pad_id: int, tc, out: Path, run_steps: int, rank: int, device,
               progress: bool = True) -> SearchResult:
    """The rate of an ``lr: auto`` run: the one its directory records (a resumed run), else a new search (or the
    fallback, said in a note), written to ``out`` before training starts. Under torchrun every process searches
    alike (before any sharding) and rank 0's choice is used by all."""
    done = load_result(out)
    if done is not None:
        if rank == 0 and progress:
            print(f"lr search: done before, lr {done.lr:.1e} ({out / RESULT})", flush=True)
        return done
    plan = plan_search(len(examples), run_steps, tc.batch_size * tc.grad_accum)
    result = search_lr(lm, examples, pad_id, tc, plan, device) if plan.runs else fallback(plan)
    if dist.is_initialized() and dist.get_world_size() > 1:
        chosen = [result.lr]
        dist.broadcast_object_list(chosen, src=0)
        result.lr = chosen[0]
    if rank == 0:
        save_result(result, out)
        if progress or result.candidates:
            print("\n".join(result.lines()), flush=True)
    return result


def fallback(plan: SearchPlan) -> SearchResult:
    """The result of a search that could not run: the fallback rate, with the plan's note said once."""
    warnings.warn(f"train.lr=auto: {plan.note}", ConfigWarning, stacklevel=3)
    return SearchResult(FALLBACK_LR, note=plan.note)


def save_result(result: SearchResult, out: Path) -> None:
    """``lr_search.json`` (what a resumed run reads) and ``lr_search.png`` (held-out loss against the rate)."""
    save_json(dataclasses.asdict(result), out / RESULT)
    if result.candidates:
        _plot(result, out / PLOT)


def load_result(out: Path) -> SearchResult | None:
    """The search a run made before (None if it made none: a new run, or one killed during its search)."""
    path = out / RESULT
    if not path.is_file():
        return None
    try:
        return SearchResult(**json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError):
        return None  # a damaged file: the search runs again (it is deterministic)


def _plot(result: SearchResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted((c["lr"], c["eval_loss"]) for c in result.candidates if math.isfinite(c["eval_loss"]))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
    chosen = [c["eval_loss"] for c in result.candidates if c["lr"] == result.lr]
    if chosen and math.isfinite(chosen[0]):
        ax.plot([result.lr], chosen, "r*", markersize=12, label=f"chosen {result.lr:.1e}")
        ax.legend()
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"held-out loss after {result.steps_each} steps")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
