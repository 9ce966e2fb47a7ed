"""Adapters in and out of PEFT-format directories.

Directories are read with safetensors only (``adapters.files``) and written whole or not at all
(``fsutil.atomic_dir``). An output directory must be new, empty, or one a compose command wrote (it holds a
``.loratune-compose.json`` marker); anything else needs ``overwrite``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .. import fsutil
from ..adapters.factors import Adapter
from ..adapters.files import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config, read_adapter_tensors
from ..errors import ConfigError, LoraTuneError
from ..fsutil import atomic_dir, save_json, save_tensors

MARKER = ".loratune-compose.json"
# Files beside an adapter that describe how to prompt it (the tokenizer and chat template `loratune train` saves,
# its system prompt): a derived adapter keeps them, so that eval/generate/chat use it as they used the original.
_COMPANIONS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
               "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
               "loratune_prompt.json")


def load_adapter(directory: str | Path) -> Adapter:
    """The adapter in a PEFT-format ``directory`` (named by its path in messages)."""
    directory = Path(directory)
    try:
        config = read_adapter_config(directory)
    except ConfigError as e:
        raise LoraTuneError(f"cannot use the adapter in {directory}: {e}") from None
    return Adapter(read_adapter_tensors(directory), config, str(directory))


def check_out_dir(out: Path, overwrite: bool = False, keep: tuple[Path, ...] = ()) -> None:
    """Refuse an ``out`` a compose command must not write (``fsutil.check_out_dir``; ``keep``: its inputs).
    Checked before any work is done."""
    fsutil.check_out_dir(out, MARKER, "a loratune compose command", overwrite, keep, example="combined/")


def save_adapter(adapter: Adapter, out: str | Path, provenance: dict | None = None,
                 companions_from: str | Path | None = None) -> None:
    """Write ``adapter`` to ``out`` in PEFT's format, with a marker holding ``provenance`` (what made it) and the
    tokenizer/prompt files of ``companions_from`` (an input adapter directory) where it has them. The directory
    appears whole (an earlier one is replaced only once the new one is complete)."""
    out = Path(out)
    d = adapter.config.to_dict()
    with atomic_dir(out) as tmp:
        save_tensors(adapter.tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        save_json(d, tmp / CONFIG_NAME)
        if companions_from is not None:
            for name in _COMPANIONS:
                src = Path(companions_from) / name
                if src.is_file():
                    shutil.copyfile(src, tmp / name)
        save_json({"written_by": "loratune compose", **(provenance or {})}, tmp / MARKER)
