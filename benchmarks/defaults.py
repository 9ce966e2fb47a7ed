"""Defaults that learn (issue 23): held-out exact match and wall time of the old defaults, the automatic ones and a
small hand grid, on the quickstart's dates task (also trained with examples/dates.yaml's own settings) and four
generated tasks of other kinds: snake_case (a short transformation from camelCase, PascalCase, kebab-case or
Title Case), sentiment (a one-word answer that turns on negation and "but"), past_tense (a multi-word rewrite with
irregular verbs and third persons) and codebook (a word-for-word code into invented words, learned only from the
rows).

    python benchmarks/defaults.py --out benchmarks/results/defaults.json > benchmarks/results/defaults.log 2>&1

Every setting of a task trains on the same train file from the same seed and is scored on the same test file,
which no setting sees in training (the automatic defaults hold their early-stopping rows out of the train file, as
``data.eval_split: auto`` does for a user without an eval file). Settings:

- ``old``: the defaults before issue 23: lr 2e-4, one epoch, no eval split;
- ``auto``: only model, data and output_dir given (lr auto, epochs auto, eval_split auto);
- ``hand-<lr>``: the hand grid, ``--grid`` rates × ``--grid-epochs`` epochs, no eval split;
- ``example``: examples/dates.yaml's train settings (dates task only; its data paths replaced).

Runs go in rounds (auto, the grid's likely best and the old defaults first, for every task; then the example
config and the rest of the grid), each result appended to ``--out`` as it finishes, so that a run stopped early
still leaves a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch
import yaml

from loratune.data.dates_task import make_dates_task
from loratune.data.pipeline import prepare_eval
from loratune.training.config import load_run_config
from loratune.training.evaluate import exact_match
from loratune.training.loop import train

ROOT = Path(__file__).resolve().parents[1]

# --- generated tasks (seeded, short rows, each needing a rule the base model does not follow unprompted) ---------
_WORDS = ["big", "red", "quiet", "old", "fast", "green", "small", "happy", "cold", "bright", "dark", "soft", "user",
          "account", "file", "name", "max", "retry", "count", "total", "price", "order", "item", "list", "page",
          "size", "start", "end", "time", "zone", "load", "cache", "key", "value", "node", "path", "token", "batch"]
_POS = ["wonderful", "great", "excellent", "lovely", "delightful", "superb", "pleasant", "fantastic", "good"]
_NEG = ["terrible", "awful", "horrible", "dreadful", "poor", "disappointing", "bad", "unpleasant", "boring"]
_THING = ["the food", "the service", "the movie", "the hotel", "the book", "the concert", "the trip", "the game",
          "the room", "the staff", "the music", "the ending"]
# present → past, third person singular (-s) form first
_VERBS = {"walk": ("walks", "walked"), "play": ("plays", "played"), "cook": ("cooks", "cooked"),
          "watch": ("watches", "watched"), "clean": ("cleans", "cleaned"), "go": ("goes", "went"),
          "eat": ("eats", "ate"), "see": ("sees", "saw"), "write": ("writes", "wrote"), "buy": ("buys", "bought"),
          "read": ("reads", "read"), "drive": ("drives", "drove"), "make": ("makes", "made"),
          "take": ("takes", "took"), "find": ("finds", "found"), "bring": ("brings", "brought"),
          "study": ("studies", "studied"), "carry": ("carries", "carried"), "teach": ("teaches", "taught"),
          "sing": ("sings", "sang"), "leave": ("leaves", "left"), "have": ("has", "had"), "do": ("does", "did"),
          "catch": ("catches", "caught")}
_OBJ = {"walk": "to the park", "play": "chess", "cook": "dinner", "watch": "the news", "clean": "the kitchen",
        "go": "to school", "eat": "an apple", "see": "the ocean", "write": "a letter", "buy": "some bread",
        "read": "a book", "drive": "to work", "make": "a cake", "take": "the bus", "find": "the keys",
        "bring": "a gift", "study": "French", "carry": "the bags", "teach": "math", "sing": "a song",
        "leave": "early", "have": "lunch", "do": "the dishes", "catch": "the train"}
_SUBJ = ["I", "We", "They", "You", "He", "She", "My sister", "Our teacher"]
_WHEN = ["every day", "on Mondays", "in the morning", "at night", "often", "with friends"]


def _snake(rng: random.Random) -> tuple[str, str]:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 4))]
    style = rng.randrange(4)
    shown = (words[0] + "".join(w.capitalize() for w in words[1:]) if style == 0  # camelCase
             else "".join(w.capitalize() for w in words) if style == 1  # PascalCase
             else "-".join(words) if style == 2  # kebab-case
             else " ".join(w.capitalize() for w in words))  # Title Case
    return "Convert to snake_case: " + shown, "_".join(words)


def _sentiment(rng: random.Random) -> tuple[str, str]:
    """A review whose label turns on negation and on 'but' (the clause after it decides)."""
    def clause(label: bool) -> str:
        negated = rng.random() < 0.4
        adj = rng.choice(_POS if label != negated else _NEG)
        return f"{rng.choice(_THING)} was {'not ' if negated else ''}{adj}"

    good = rng.random() < 0.5
    text = clause(good)
    if rng.random() < 0.4:  # "A, but B": B has the other label, and decides
        good = not good
        text += ", but " + clause(good)
    return f"Sentiment (positive or negative): {text[0].upper()}{text[1:]}.", "positive" if good else "negative"


def _past(rng: random.Random) -> tuple[str, str]:
    verb = rng.choice(list(_VERBS))
    subj, when = rng.choice(_SUBJ), rng.choice(_WHEN)
    now = _VERBS[verb][0] if subj in ("He", "She", "My sister", "Our teacher") else verb
    return (f"Rewrite in the past tense: {subj} {now} {_OBJ[verb]} {when}.",
            f"{subj} {_VERBS[verb][1]} {_OBJ[verb]} {when}.")


def _codebook_words() -> dict[str, str]:
    """Each of _WORDS → an invented word (seeded, distinct): knowledge the base model cannot have."""
    rng, out = random.Random("codebook"), {}
    for w in _WORDS:
        while (code := "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(2))
               + rng.choice("nrsx")) in out.values():
            pass
        out[w] = code
    return out


_CODE = _codebook_words()


def _codebook(rng: random.Random) -> tuple[str, str]:
    """A word-for-word code learned only from the rows (each word in about 45 rows of 600): new combinations at test."""
    words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 4))]
    return "Translate to Zorbish: " + " ".join(words), " ".join(_CODE[w] for w in words)


GENERATED = {"snake_case": (_snake, "Answer with the converted text only."),
             "codebook": (_codebook, "Answer with the Zorbish words only."),
             "sentiment": (_sentiment, "Answer with one word."),
             "past_tense": (_past, "Answer with the rewritten sentence only.")}


def make_task(name: str, d: Path, n_train: int, n_test: int, seed: int = 0) -> tuple[Path, Path, str]:
    """(train file, test file, system prompt) of task ``name``; rows distinct, train and test disjoint."""
    d.mkdir(parents=True, exist_ok=True)
    if name == "dates":
        train_f, test_f = make_dates_task(d, n_train=n_train, n_eval=n_test, seed=seed)
        return Path(train_f), Path(test_f), "Answer with the date only."
    make, system = GENERATED[name]
    rng, seen, rows = random.Random(f"{name}-{seed}"), set(), []
    for _ in range(100_000):
        if len(rows) == n_train + n_test:
            break
        prompt, answer = make(rng)
        if prompt.lower() not in seen:
            seen.add(prompt.lower())
            rows.append({"prompt": prompt, "completion": answer})
    for path, part in ((d / "train.jsonl", rows[:n_train]), (d / "test.jsonl", rows[n_train:])):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return d / "train.jsonl", d / "test.jsonl", system


# --- settings ------------------------------------------------------------------------------------------------
def settings(task: str, grid: list[float], grid_epochs: float) -> list[tuple[int, str, list[str]]]:
    """(round, name, overrides) of every setting of ``task``."""
    out = [(0, "auto", [])]
    best_guess = max(grid)  # the small model's usual best: first, so that a stopped run still compares
    out.append((0, f"hand-{best_guess:g}", [f"train.lr={best_guess}", f"train.epochs={grid_epochs}",
                                            "data.eval_split=0"]))
    out.append((0, "old", ["train.lr=2e-4", "train.epochs=1", "data.eval_split=0"]))
    if task == "dates":
        ex = yaml.safe_load((ROOT / "examples" / "dates.yaml").read_text())["train"]
        out.append((1, "example", [f"train.{k}={v}" for k, v in ex.items()] + ["data.eval_split=0"]))
    out += [(2, f"hand-{lr:g}", [f"train.lr={lr}", f"train.epochs={grid_epochs}", "data.eval_split=0"])
            for lr in grid if lr != best_guess]
    return out


def run_one(task: str, name: str, overrides: list[str], files, work: Path, max_new_tokens: int,
            model: str) -> dict:
    train_f, test_f, system = files
    out = work / task / name  # (kept: a restarted benchmark resumes a run, its lr search included)
    seq = 96 if task == "dates" else 64  # (the dates rows: examples/dates.yaml's 96)
    cfg = load_run_config(None, [f"model={model}", f"data.train={train_f}", f"output_dir={out}",
                                 f"data.max_seq_len={seq}", f"data.system_prompt={system}", "train.seed=0",
                                 *overrides])
    reused = (out / "lr_search.json").is_file()  # a restarted benchmark: the search ran in the earlier process
    t0 = time.perf_counter()
    res = train(cfg, progress=False)
    wall = time.perf_counter() - t0
    test, _ = prepare_eval(dataclasses.replace(cfg.data, train=str(test_f), eval=None, eval_split=0.0),
                           res.tokenizer)
    em = exact_match(res.model, res.tokenizer, test, 32, max_new_tokens)["exact_match"]
    search = json.loads((out / "lr_search.json").read_text()) if (out / "lr_search.json").is_file() else None
    return {"task": task, "setting": name, "overrides": overrides, "exact_match": em, "train_wall_s": wall,
            "lr": res.lr, "steps": res.steps, "stopped_early": res.stopped_early, "best_step": res.best_step,
            "lr_search": search, "search_reused": reused, "n_test": len(test)}


def table(paths: list[Path]) -> str:
    """The docs' markdown table from result files: per task, each setting's exact match, wall time, rate and steps,
    and auto against the best finished hand setting (points of exact match, ratio of wall time)."""
    runs = [r for p in paths if p.is_file() for r in json.loads(p.read_text())["runs"]]
    lines = ["| task | setting | exact match | train wall s | lr | steps | note |", "|---|---|---|---|---|---|---|"]
    for task in dict.fromkeys(r["task"] for r in runs):
        mine = [r for r in runs if r["task"] == task]
        hand = [r for r in mine if r["setting"].startswith("hand-")]
        best = max(hand, key=lambda r: (r["exact_match"], -r["train_wall_s"])) if hand else None
        for r in mine:
            note = []
            if r["setting"] == "auto":
                if r["lr_search"] and r["lr_search"]["candidates"]:
                    note.append("search: " + ", ".join(f"{c['lr']:.1e}→{c['eval_loss']:.3f}"
                                                       for c in r["lr_search"]["candidates"])
                                + f" ({r['lr_search']['seconds']:.0f} s"
                                + (", in an earlier process, not in the wall time)" if r.get("search_reused")
                                   else ")"))
                if r["stopped_early"]:
                    note.append(f"stopped early, best step {r['best_step']}")
                if best:
                    note.append(f"vs best hand: {100 * (r['exact_match'] - best['exact_match']):+.1f} points, "
                                f"{r['train_wall_s'] / best['train_wall_s']:.2f}× wall time")
            lines.append(f"| {task} | {r['setting']} | {r['exact_match']:.1%} ({r['n_test']}) | "
                         f"{r['train_wall_s']:.0f} | {r['lr']:g} | {r['steps']} | {'; '.join(note)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "defaults.json"))
    ap.add_argument("--work", default="/tmp/loratune_defaults")
    ap.add_argument("--tasks", default="dates,snake_case,sentiment,past_tense,codebook")
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--grid", default="5e-4,2e-3", help="hand grid rates (comma-separated)")
    ap.add_argument("--grid-epochs", type=float, default=3)
    ap.add_argument("--rounds", default="0,1,2")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 wastes less "
                                                           "on a loaded machine")
    ap.add_argument("--table", nargs="*", help="print the markdown table of these result files and exit")
    a = ap.parse_args(argv)
    if a.table is not None:
        print(table([Path(p) for p in a.table or [a.out]]))
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    work, out = Path(a.work), Path(a.out)
    tasks = a.tasks.split(",")
    grid = [float(x) for x in a.grid.split(",")]
    files = {t: make_task(t, work / "data" / t, a.n_train, a.n_test) for t in tasks}
    results = json.loads(out.read_text())["runs"] if out.is_file() else []
    done = {(r["task"], r["setting"]) for r in results}
    plan = sorted((rnd, ti, t, name, ov) for ti, t in enumerate(tasks) for rnd, name, ov in
                  settings(t, grid, a.grid_epochs) if str(rnd) in a.rounds.split(","))
    meta = {"model": a.model, "threads": torch.get_num_threads(), "n_train": a.n_train, "n_test": a.n_test,
            "grid": grid, "grid_epochs": a.grid_epochs, "argv": sys.argv[1:],
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    for _, _, task, name, ov in plan:
        if (task, name) in done:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {task} / {name}", flush=True)
        r = run_one(task, name, ov, files[task], work, a.max_new_tokens, a.model)
        print(f"[{time.strftime('%H:%M:%S')}] {task} / {name}: exact match {r['exact_match']:.1%}, "
              f"{r['train_wall_s']:.0f} s, lr {r['lr']:g}, {r['steps']} steps", flush=True)
        results.append(r)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
