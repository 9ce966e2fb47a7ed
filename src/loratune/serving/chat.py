"""What ``loratune train`` saves beside an adapter for chat: its chat template and system prompt."""

from __future__ import annotations

import json
from pathlib import Path


def chat_files(path: Path) -> tuple[str | None, str | None]:
    """The chat template and system prompt saved beside an adapter (by ``loratune train``), or None each."""
    template = prompt = None
    jinja = path / "chat_template.jinja"
    try:
        if jinja.is_file() and jinja.resolve().is_relative_to(path):
            template = jinja.read_text(encoding="utf-8")
        tc = path / "tokenizer_config.json"
        if template is None and tc.is_file() and tc.resolve().is_relative_to(path):
            template = json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
        pf = path / "loratune_prompt.json"
        if pf.is_file() and pf.resolve().is_relative_to(path):
            prompt = json.loads(pf.read_text(encoding="utf-8")).get("system_prompt")
    except (OSError, ValueError):
        pass
    return (template if isinstance(template, str) else None), (prompt if isinstance(prompt, str) else None)
