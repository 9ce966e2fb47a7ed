"""The data layer's types and names: the ``data`` config section, a tokenized example, the preparation report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError, closest
from ..ops import IGNORE_INDEX

FORMATS = ("prompt_completion", "alpaca", "messages", "sharegpt", "text")
READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
EXTENSIONS = ", ".join(READERS)
TEXT_SUFFIXES = (".txt", ".text", ".md")  # refused (one example per line? per file?), with how to convert
ROW_HINTS = {".jsonl": 'one JSON object per line, e.g. {"prompt": "...", "completion": "..."}',
             ".json": "a JSON list of objects", ".csv": "a header line naming the columns, then one line per row",
             ".parquet": "one row per example"}
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
IGNORE = IGNORE_INDEX  # the label of a token without loss, as transformers reads it
Row = tuple[int, list[dict]]  # (row number in the file, chat messages)
REQUIRED = {"prompt_completion": ("prompt", "completion"), "alpaca": ("instruction", "output"),
            "messages": ("messages",), "sharegpt": ("conversations",), "text": ("text",)}


@dataclass
class DataConfig:
    """The ``data`` section of a run config.

    ``eval`` is a held-out file; without one, ``eval_split`` (a fraction in [0, 1)) of the cleaned train rows
    is held out, chosen by the seed; ``auto`` (the run config's default) holds out a small share when there is no
    eval file (``pipeline.held_out_count``) and nothing when there is. ``overlength`` is ``drop`` or ``truncate``
    (rows over ``max_seq_len`` tokens). ``chat_template`` overrides the tokenizer's Jinja template;
    ``system_prompt`` is prepended to rows that have no system message.
    """

    train: str
    eval: str | None = None
    eval_split: float | str = 0.0  # or auto (the run config's default; pipeline.held_out_count)
    format: str = "auto"
    max_seq_len: int = 512
    packing: bool = False
    train_on_prompt: bool = False
    overlength: str = "drop"
    chat_template: str | None = None
    system_prompt: str | None = None
    text_column: str = "text"  # task: classification reads these columns (training/classify.py)
    text_pair_column: str | None = None
    label_column: str = "label"

    def __post_init__(self) -> None:
        if self.format != "auto" and self.format not in FORMATS:
            raise DataError(f"unknown data format '{self.format}'{closest(self.format, FORMATS)}; "
                            f"use auto or one of: {', '.join(FORMATS)}")
        if self.overlength not in ("drop", "truncate"):
            raise DataError(f"data.overlength must be 'drop' or 'truncate', got {self.overlength!r}")
        if self.max_seq_len < 2:
            raise DataError(f"data.max_seq_len must be ≥ 2, got {self.max_seq_len}")
        if self.chat_template is not None and "{{" not in self.chat_template and "{%" not in self.chat_template:
            self.chat_template = _template_file(self.chat_template)  # not a template: the path of one
        if isinstance(self.eval_split, str):
            if self.eval_split != "auto":
                raise DataError(f"data.eval_split must be a fraction in [0, 1) or auto, got {self.eval_split!r}")
        elif not 0.0 <= self.eval_split < 1.0:
            raise DataError(f"data.eval_split must be a fraction in [0, 1) or auto, got {self.eval_split}")


def _template_file(path: str) -> str:
    """The Jinja template held in the file ``path`` (``data.chat_template`` given as a path)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data.chat_template={path!r} is neither a Jinja template (no {{{{ or {{% in it) nor an "
                        "existing file; give the template text or the path of a file that holds it")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"data.chat_template: cannot read {p} as text ({e}); save it as UTF-8") from None


@dataclass
class Example:
    """One tokenized row. ``labels`` align with ``input_ids`` (-100 = no loss; the model shifts them).

    ``prompt_ids`` is the prompt with the generation prompt appended and ``reference`` the last assistant
    answer, for generation-based evaluation (empty/None for text rows and packed rows). ``position_ids``
    is set only on packed rows: it restarts at 0 at each packed example.
    """

    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int] = field(default_factory=list)
    reference: str | None = None
    position_ids: list[int] | None = None


@dataclass
class Step:
    """One line of the preparation report: ``count`` rows affected by step ``name``; ``detail`` says which."""

    name: str
    count: int
    detail: str = ""


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    report: list[Step]
    format: str

    def report_lines(self) -> list[str]:
        """The report as printable lines, e.g. ``train: exact duplicates removed: 3``."""
        return [f"{s.name}: {s.count}" + (f" ({s.detail})" if s.detail else "") for s in self.report]
