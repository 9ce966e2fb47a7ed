"""The Modelfile (formats/ollama.py): the bundled chat template translated to Ollama's Go template, its stops and
default system prompt, and the printed `ollama create` / `vllm serve` lines."""

from __future__ import annotations

import re

import pytest
from transformers import AutoTokenizer

from loratune.formats.gguf import ExportError
from loratune.formats.ollama import (
    modelfile_text,
    ollama_create_line,
    translate_chat_template,
    vllm_serve_line,
    write_ollama_dir,
)
from loratune.models import resolve_model_path


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))


def _render(tok):
    return lambda m, g: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g)


def render_go(template: str, system: str | None, messages: list[dict]) -> str:
    """Ollama's rendering of the template shape translate_chat_template writes, done by hand: ``{{ if .System }}X
    {{ end }}{{ range .Messages }}{{ if ne .Role "system" }}Y{{ end }}{{ end }}Z`` with .System, .Role, .Content
    substituted (Ollama puts the Modelfile's SYSTEM in .System where the conversation has no system message)."""
    m = re.fullmatch(r"\{\{ if \.System \}\}(.*?)\{\{ end \}\}\{\{ range \.Messages \}\}"
                     r'\{\{ if ne \.Role "system" \}\}(.*?)\{\{ end \}\}\{\{ end \}\}(.*)', template, re.S)
    assert m, template
    sys_part, msg_part, tail = m.groups()
    text = sys_part.replace("{{ .System }}", system) if system else ""
    for msg in messages:
        if msg["role"] != "system":
            text += msg_part.replace("{{ .Role }}", msg["role"]).replace("{{ .Content }}", msg["content"])
    return text + tail


def test_bundled_chat_template_translates_and_renders_like_jinja(tok):
    t = translate_chat_template(_render(tok), tok.bos_token, tok.eos_token)
    assert t is not None
    assert t.stops == ["<|im_end|>", "<|im_start|>"]
    assert t.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    convs = [[{"role": "user", "content": "Convert to ISO date: 5 March 2021"}],
             [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"},
              {"role": "user", "content": "and now?\nTwo lines."}]]
    for conv in convs:
        for system in (None, "Answer with the date only."):
            full = ([{"role": "system", "content": system}] if system else []) + conv
            assert render_go(t.template, system or t.default_system, full) == _render(tok)(full, True)


def test_modelfile_content(tok):
    t = translate_chat_template(_render(tok), tok.bos_token, tok.eos_token)
    text = modelfile_text("base.gguf", t, "Answer with the date only.", "adapter.gguf")
    lines = text.splitlines()
    assert lines[1:3] == ["FROM ./base.gguf", "ADAPTER ./adapter.gguf"]
    assert 'TEMPLATE """' + t.template + '"""' in text
    assert 'SYSTEM """Answer with the date only."""' in text  # the adapter's prompt wins over the default
    assert lines[-2:] == ['PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"']
    merged = modelfile_text("model.gguf", t, None)
    assert "ADAPTER" not in merged and f'SYSTEM """{t.default_system}"""' in merged
    with pytest.raises(ExportError, match='"""'):
        modelfile_text("m.gguf", t, 'say """hi"""')
    assert "TEMPLATE" not in modelfile_text("m.gguf", None, None)  # Ollama then uses the GGUF's own template


def test_an_untranslatable_template_gives_none():
    def mistral_like(messages, gen):  # the system prompt folded into the first [INST]
        sys = next((m["content"] for m in messages if m["role"] == "system"), "")
        out = "<s>"
        for m in (m for m in messages if m["role"] != "system"):
            out += f"[INST] {sys} {m['content']} [/INST]" if m["role"] == "user" else f"{m['content']}</s>"
            sys = ""
        return out

    assert translate_chat_template(mistral_like, "<s>", "</s>") is None


def test_printed_lines(tmp_path):
    assert ollama_create_line(tmp_path / "o", "dates") == f"ollama create dates -f {tmp_path / 'o' / 'Modelfile'}"
    line = vllm_serve_line("/m/smollm2", tmp_path / "ad", "dates", 12)
    assert line == f"vllm serve /m/smollm2 --enable-lora --lora-modules dates={tmp_path / 'ad'} --max-lora-rank 16"
    assert vllm_serve_line("/m", tmp_path, "x", 8).endswith("--max-lora-rank 8")


def test_ollama_folder_rules(tmp_path):
    def models(tmp):
        (tmp / "model.gguf").write_bytes(b"GGUF")
        return "model.gguf", None

    out = write_ollama_dir(tmp_path / "o", models, None, "be brief")
    assert sorted(p.name for p in out.iterdir()) == [".loratune-export.json", "Modelfile", "model.gguf"]
    write_ollama_dir(tmp_path / "o", models, None, None)  # an earlier export's folder may be replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ExportError, match="--overwrite"):
        write_ollama_dir(mine, models, None, None)
    assert (mine / "notes.txt").read_text() == "keep"
    with pytest.raises(ExportError, match="does not exist"):
        write_ollama_dir(tmp_path / "missing" / "o", models, None, None)
