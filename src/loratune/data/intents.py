"""A generated intent-classification task: short requests to a voice assistant, each labelled with its intent
(``weather``, ``alarm``, ``music``, ``shopping``, ``directions``).

Rows come from templates with slots (a city, a time, an item, ...), drawn from a seed, so the task needs no
download. The held-out split is held out twice over: its sentences come from templates that training never sees
(two per intent) filled with slot values that training never sees, so its accuracy measures more than recall of
the training sentences.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..fsutil import write_text

# Per intent: templates; the last two of each list are the held-out ones (eval only).
TEMPLATES: dict[str, list[str]] = {
    "weather": ["what's the weather like in {city}", "will it rain in {city} {when}", "do I need an umbrella {when}",
                "how hot will it be in {city} {when}", "is it going to snow {when}", "weather forecast for {city}",
                "should I bring a jacket to {city} {when}", "is it sunny in {city} right now"],
    "alarm": ["wake me up at {time}", "set an alarm for {time} {when}", "cancel my {time} alarm",
              "I need to get up at {time} {when}", "change my alarm to {time}", "turn off the alarm for {time}",
              "make sure I'm awake by {time} {when}", "alarm at {time} please"],
    "music": ["play some {genre}", "put on something by {artist}", "play {genre} music", "skip this song",
              "I want to hear {artist}", "turn the music up a bit", "start my {genre} playlist",
              "can you play the latest album from {artist}"],
    "shopping": ["add {item} to my shopping list", "we are out of {item}", "put {item} on the list",
                 "remind me to buy {item} {when}", "order more {item}", "do we still need {item}",
                 "I have to pick up {item} at the store", "get {item} next time I shop"],
    "directions": ["how do I get to {place}", "directions to {place}", "how far is {place} from here",
                   "take me to {place}", "what's the fastest route to {place} {when}", "navigate to {place}",
                   "which way is {place}", "how long does it take to drive to {place}"],
}
HELD_OUT_TEMPLATES = 2
# Slot values; each list's last third is the held-out part (eval only).
SLOTS: dict[str, list[str]] = {
    "city": ["Paris", "Berlin", "Tokyo", "Chicago", "Madrid", "Toronto", "Oslo", "Cairo", "Lima", "Seoul", "Dublin",
             "Denver"],
    "when": ["today", "tomorrow", "tonight", "this weekend", "on Monday", "next week", "in the morning",
             "on Friday", "this afternoon"],
    "time": ["6 am", "7:30", "5:45 am", "noon", "8 o'clock", "9:15", "6:30 tomorrow", "quarter past seven", "10 pm"],
    "genre": ["jazz", "rock", "classical", "hip hop", "country", "reggae", "blues", "techno", "folk"],
    "artist": ["Taylor Swift", "the Beatles", "Miles Davis", "Adele", "Queen", "Bob Marley", "Coldplay", "Beyonce",
               "Nirvana"],
    "item": ["milk", "eggs", "bread", "coffee", "apples", "rice", "toothpaste", "butter", "cheese", "tomatoes",
             "olive oil", "dish soap"],
    "place": ["the airport", "the train station", "the nearest pharmacy", "downtown", "the museum", "grandma's house",
              "the stadium", "the beach", "city hall"],
}
OPENERS = ["", "", "", "hey, ", "please ", "could you ", "ok so "]  # light noise on the front of a sentence
LABELS = sorted(TEMPLATES)


def _split_slots(held_out: bool) -> dict[str, list[str]]:
    return {k: (v[len(v) - len(v) // 3:] if held_out else v[:len(v) - len(v) // 3]) for k, v in SLOTS.items()}


def intent_rows(n: int, seed: int = 0, held_out: bool = False) -> list[dict[str, str]]:
    """``n`` distinct ``{"text": ..., "label": ...}`` rows, labels in turn (balanced), deterministic in ``seed``.
    ``held_out``: from the held-out templates and slot values only (disjoint from the others)."""
    rng = random.Random(seed * 2 + held_out)
    slots = _split_slots(held_out)
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    tries = 0
    while len(rows) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise ValueError(f"cannot make {n} distinct {'held-out' if held_out else 'training'} rows; ask for fewer")
        label = LABELS[len(rows) % len(LABELS)]
        templates = TEMPLATES[label]
        template = rng.choice(templates[-HELD_OUT_TEMPLATES:] if held_out else templates[:-HELD_OUT_TEMPLATES])
        text = rng.choice(OPENERS) + template.format(**{k: rng.choice(v) for k, v in slots.items()})
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": label})
    return rows


def make_intent_task(out_dir: str | Path, n_train: int = 400, n_eval: int = 100, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` (``{"text", "label"}`` per line) under ``out_dir``; returns the
    paths. The eval rows use templates and slot values the training rows never use."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "eval.jsonl"
    for path, rows in zip(paths, (intent_rows(n_train, seed), intent_rows(n_eval, seed, held_out=True))):
        write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return paths
