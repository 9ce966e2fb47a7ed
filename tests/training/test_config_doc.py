"""docs/config.md is the run config's key table, generated from the config's dataclasses: it must be current and
describe every key (a key added without a line in scripts/config_doc.py fails here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("config_doc", ROOT / "scripts" / "config_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_key_has_a_description():
    page = _script().render()
    assert "| MISSING |" not in page, [line for line in page.splitlines() if "| MISSING |" in line]


def test_docs_config_md_is_current():
    assert (ROOT / "docs" / "config.md").read_text() == _script().render(), \
        "docs/config.md is stale: python3 scripts/config_doc.py > docs/config.md"


def test_descriptions_name_only_real_keys():
    doc = _script()
    import dataclasses

    for _, cls, text in doc.SECTIONS:
        assert set(text) <= {f.name for f in dataclasses.fields(cls)}, cls
