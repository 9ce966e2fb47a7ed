"""``loratune train``: a run from a YAML config, or ``--dry-run`` to check it and estimate its time."""

from __future__ import annotations

import time
from pathlib import Path

from .. import devices, settings
from ..adapters import get_lora_model
from ..data import collate, format_example, prepare
from ..devices import model_device, to_device
from ..models import load_base_model
from ..training.config import dump_run_config, load_run_config
from ..training.evaluate import response_loss_sum
from ..training.loop import fit_to_model, train
from ..training.lr_search import EVAL_COST, GRID, SHARE, plan_search
from ..training.optim import AUTO_MAX_ROWS, AUTO_MIN_ROWS, AUTO_PASSES, eval_every, total_steps
from ..training.rundir import check_output_dir
from .output import print_summary


def cmd_train(args) -> int:
    cfg = load_run_config(args.config, args.overrides)
    if cfg.task == "classification":  # an encoder with a label head: its own loop, reports and dry run
        from .classify import cmd_train_classifier

        return cmd_train_classifier(cfg, args)
    if args.dry_run:
        return dry_run(cfg, args.overwrite)
    result = train(cfg, overwrite=args.overwrite, progress=not args.no_progress)
    if result.rank == 0:  # under torchrun, one summary, not one per process
        print_summary(result.history, result.seconds, result.adapter_dir)
    return 0


def dry_run(cfg, overwrite: bool = False) -> int:
    config_text = dump_run_config(cfg)
    print("# resolved config\n" + config_text)
    check_output_dir(Path(cfg.output_dir), config_text, overwrite)  # (read-only) what the run would refuse
    device = devices.resolve_device(cfg.train.device, key="train.device")
    dtype = devices.resolve_dtype(cfg.model.dtype, device, key="model.dtype")
    print(f"# runs on {device} in {str(dtype).removeprefix('torch.')} (train.device={cfg.train.device}, "
          f"model.dtype={cfg.model.dtype}, train.distributed={cfg.train.distributed}, "
          f"train.compile={str(cfg.train.compile).lower()})")
    model, tok = load_base_model(cfg.model.name, dtype=dtype, device=device, **cfg.model.load_kwargs())
    data = prepare(fit_to_model(cfg.data, model), tok, seed=cfg.train.seed)
    print("# data")
    for line in data.report_lines():
        print("  " + line)
    print("# one tokenized example ([[...]] = trained tokens)")
    print(format_example(tok, data.train[0]))
    lm = get_lora_model(model, cfg.lora_config())
    lm.print_trainable_parameters()
    world = settings.get().world_size
    _, steps = total_steps(len(data.train), cfg.train, world)
    seconds = _time_one_batch(lm, data.train[:cfg.train.batch_size], tok.pad_token_id)
    step_s = cfg.train.grad_accum * seconds
    search_steps = print_plan(cfg.train, len(data.train), len(data.eval), steps, world)
    est = steps * step_s
    print(f"estimated training time on this machine: ~{est / 60:.1f} min ({steps} steps × {cfg.train.grad_accum} "
          f"batch(es) of {cfg.train.batch_size} rows × {seconds:.2f} s measured for one batch"
          f"{'' if world == 1 else ' per process'}; evaluation not included)")
    if search_steps:
        print(f"estimated lr search time: ≤ ~{search_steps * step_s / 60:.1f} min (≤ {search_steps:.0f} "
              f"step-equivalents); in all ≤ ~{(est + search_steps * step_s) / 60:.1f} min")
    return 0


def print_plan(tc, n_train: int, n_eval: int, steps: int, world: int) -> float:
    """The ``# plan`` lines: the rate (given, or the search's grid and cost), the length (given, or epochs auto's
    budget, evaluations and early stopping). Returns the search's worst-case cost in step-equivalents (0: none)."""
    print("# plan")
    cost = 0.0
    if tc.auto_lr:
        plan = plan_search(n_train, steps, tc.batch_size * tc.grad_accum)
        if plan.runs:
            cost = plan.cost
            print(f"  lr: auto: a search on the training data before the run: rates {GRID[0]:.1e}…{GRID[-1]:.1e} "
                  f"(half decades, starting at {plan.grid[plan.start]:.1e}), at most {plan.max_candidates} rates × "
                  f"{plan.steps_each} steps, scored on {plan.held_out} held-out training rows; ≤ {cost:.0f} "
                  f"step-equivalents ({SHARE:.0%} of the run's {steps} steps; an evaluation counts "
                  f"{EVAL_COST:.2f} of a step per batch)")
        else:
            print(f"  lr: auto: {plan.note}")
    else:
        print(f"  lr: {tc.lr:g} (given)")
    every = eval_every(tc, steps) if n_eval else 0
    if tc.auto_epochs:
        print(f"  length: epochs auto: {steps} steps ({AUTO_PASSES} passes over {n_train} rows, at least "
              f"{AUTO_MIN_ROWS} and at most {AUTO_MAX_ROWS} row-passes, at {tc.batch_size * tc.grad_accum * world} "
              "rows a step)")
    else:
        print(f"  length: {steps} steps (" + (f"train.max_steps={tc.max_steps})" if tc.max_steps
                                               else f"train.epochs={tc.epochs:g})"))
    if not n_eval:
        print("  evaluation: none (no eval rows: no early stopping; give data.eval or data.eval_split)")
    else:
        print(f"  evaluation: on {n_eval} rows " + (f"every {every} steps and " if every else "") + "at the end"
              + (f"; early stopping after {tc.patience} evaluations without the eval loss falling"
                 + (f" by more than {tc.threshold:g}" if tc.threshold else "") if tc.patience
                 else "") + ("; the best evaluation's adapter is kept" if tc.keep_best else ""))
    return cost


def _time_one_batch(lm, rows, pad_id: int) -> float:
    """Seconds for one forward + backward on ``rows`` (the second of two runs: the first warms up)."""
    lm.train()
    batch = to_device(collate(rows, pad_id), model_device(lm))
    for _ in range(2):
        start = time.perf_counter()
        response_loss_sum(lm, batch)[0].backward()
        seconds = time.perf_counter() - start
    lm.zero_grad(set_to_none=True)
    return seconds


