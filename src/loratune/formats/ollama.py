"""An Ollama model folder: the GGUF file(s) and a ``Modelfile`` (``FROM``, ``ADAPTER``, ``TEMPLATE``, ``SYSTEM``,
``PARAMETER stop``), for ``ollama create NAME -f DIR/Modelfile``.

Ollama's ``TEMPLATE`` is a Go template, not the Jinja chat template transformers uses, and a wrong one is the
classic cause of gibberish after an export. ``translate_chat_template`` derives the Go template from the Jinja one
by rendering it (through the tokenizer's own ``apply_chat_template``) on probe conversations and cutting the text
into the pieces a role-tagged template is made of: the role header around the role's name, the end-of-turn text
and the generation prompt. It then checks that those pieces rebuild the Jinja output exactly on several
conversations (with and without a system prompt, one turn and several); a template that does not fit that shape
(Mistral's [INST] folding, dates written into the system prompt, ...) gives None, and the Modelfile then has no
``TEMPLATE`` line, so Ollama falls back to the chat template inside the GGUF file. A default system prompt that the
Jinja template inserts when none is given becomes the ``SYSTEM`` line unless the adapter has one of its own.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import fsutil
from ..fsutil import atomic_dir, save_json, write_text
from .gguf import ExportError

MODELFILE = "Modelfile"
MARKER = ".loratune-export.json"  # written into every folder this module writes
Render = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> prompt text
_S, _U1, _A1, _U2 = "SYSPROBE7", "USERPROBE1", "ASSTPROBE1", "USERPROBE2"


@dataclass(frozen=True)
class OllamaTemplate:
    """A chat template as Ollama wants it: the Go ``template``, the ``stops`` that end a turn, and the
    ``default_system`` prompt the original inserts when a conversation has none (None: it inserts none)."""

    template: str
    stops: list[str]
    default_system: str | None


def _msgs(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


def translate_chat_template(render: Render, bos_token: str | None = None, eos_token: str | None = None
                            ) -> OllamaTemplate | None:
    """The Ollama form of the chat template that ``render`` applies (e.g. ``lambda m, g:
    tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g)``), or None where it is not a role-tagged
    template that rebuilds exactly. A leading ``bos_token`` is left out (llama.cpp adds BOS itself)."""
    try:
        full = render(_msgs(("system", _S), ("user", _U1), ("assistant", _A1), ("user", _U2)), True)
        bare = render(_msgs(("user", _U1)), True)
    except Exception:  # a template that refuses a system role, or any conversation like these
        return None
    # A template may start with the BOS text (Llama 3) or merely use that token as its role marker (SmolLM2's BOS is
    # <|im_start|>): try keeping it first, then leaving it out.
    for bos in dict.fromkeys(("", bos_token or "")):
        found = _translate(render, full, bare, bos, eos_token)
        if found is not None:
            return found
    return None


def _translate(render: Render, full: str, bare: str, bos: str, eos_token: str | None) -> OllamaTemplate | None:
    pos, cut = [], 0
    for probe in (_S, _U1, _A1, _U2):
        cut = full.find(probe, cut)
        if cut < 0:
            return None
        pos.append(cut)
    p0 = full[:pos[0]]
    p0 = p0[len(bos):] if bos and p0.startswith(bos) else p0
    p1, p2 = full[pos[0] + len(_S):pos[1]], full[pos[1] + len(_U1):pos[2]]
    p3, p4 = full[pos[2] + len(_A1):pos[3]], full[pos[3] + len(_U2):]
    if "system" not in p0:
        return None
    before, after = p0.split("system", 1)

    def head(role: str) -> str:
        return before + role + after

    if not p2.endswith(head("assistant")):
        return None
    end = p2[: len(p2) - len(head("assistant"))]
    if p1 != end + head("user") or p3 != end + head("user") or not p4.startswith(end):
        return None
    gen = p4[len(end):]
    default = _default_system(bare, bos, head, end)

    def rebuild(messages: list[dict], system: str | None) -> str:
        text = bos if full.startswith(bos) else ""
        if system:
            text += head("system") + system + end
        for m in messages:
            text += head(m["role"]) + m["content"] + end
        return text + gen

    convs = [_msgs(("user", _U1)), _msgs(("user", _U1), ("assistant", _A1), ("user", _U2))]
    try:
        for conv in convs:
            if render([{"role": "system", "content": _S}, *conv], True) != rebuild(conv, _S):
                return None
            if render(conv, True) != rebuild(conv, default):
                return None
    except Exception:
        return None
    pieces = (head("system"), end, before, after, gen)
    if any("{{" in p or '"""' in p for p in pieces) or (default and '"""' in default):
        return None
    go = ("{{ if .System }}" + head("system") + "{{ .System }}" + end + "{{ end }}"
          '{{ range .Messages }}{{ if ne .Role "system" }}' + before + "{{ .Role }}" + after + "{{ .Content }}" + end
          + "{{ end }}{{ end }}" + gen)
    stops = [s for s in dict.fromkeys((end.strip(), before.strip(), (eos_token or "").strip())) if s]
    return OllamaTemplate(go, stops, default)


def _default_system(bare: str, bos: str, head: Callable[[str], str], end: str) -> str | None:
    """The system prompt a template writes into a conversation that has none (None where it writes none)."""
    text = bare[len(bos):] if bos and bare.startswith(bos) else bare
    if not text.startswith(head("system")):
        return None
    stop = text.find(end + head("user") + _U1)
    return text[len(head("system")):stop] if stop > 0 else None


def modelfile_text(model_file: str, template: OllamaTemplate | None, system_prompt: str | None,
                   adapter_file: str | None = None) -> str:
    """A Modelfile: ``FROM ./model_file`` (and ``ADAPTER ./adapter_file``), the template, the system prompt (the
    adapter's own, else the template's default) and one ``PARAMETER stop`` per stop."""
    lines = ["# written by loratune export", f"FROM ./{model_file}"]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    if template is not None:
        lines.append(f'TEMPLATE """{template.template}"""')
    system = system_prompt if system_prompt is not None else (template.default_system if template else None)
    if system:
        if '"""' in system:
            raise ExportError('the system prompt contains """, which a Modelfile cannot quote; change the prompt '
                              "(or pass --system-prompt)")
        lines.append(f'SYSTEM """{system}"""')
    for stop in template.stops if template else []:
        lines.append(f"PARAMETER stop {_quote(stop)}")
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def check_out_dir(out: Path, overwrite: bool = False) -> None:
    """Refuse an ``out`` this export must not write (``fsutil.check_out_dir``; its parent must exist)."""
    fsutil.check_out_dir(out, MARKER, "loratune export", overwrite, example="ollama/", parent_must_exist=True,
                         error=ExportError)


def write_ollama_dir(out: str | Path, write_models: Callable[[Path], tuple[str, str | None]],
                     template: OllamaTemplate | None, system_prompt: str | None, overwrite: bool = False) -> Path:
    """Write the folder ``out`` whole (``fsutil.atomic_dir``): ``write_models(tmp)`` writes the GGUF file(s) into
    the temp folder and returns (model file name, adapter file name or None); then the Modelfile and a marker."""
    out = Path(out)
    check_out_dir(out, overwrite)
    with atomic_dir(out) as tmp:
        model_file, adapter_file = write_models(tmp)
        write_text(tmp / MODELFILE, modelfile_text(model_file, template, system_prompt, adapter_file))
        save_json({"written_by": "loratune export", "format": "ollama"}, tmp / MARKER)
    return out


def copy_file(src: Path, dst: Path) -> None:
    """Copy a (large) file, e.g. the base GGUF beside an adapter."""
    shutil.copyfile(src, dst)


def ollama_create_line(out: Path, name: str) -> str:
    """The command that imports the folder into Ollama."""
    return f"ollama create {name} -f {out / MODELFILE}"


VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values


def vllm_serve_line(base_hf_dir: str | Path, adapter_dir: str | Path, name: str, max_rank: int) -> str:
    """The ``vllm serve`` line that serves the PEFT adapter directory as model ``name`` on the HF base."""
    rank = next((r for r in VLLM_RANKS if r >= max_rank), max_rank)
    return (f"vllm serve {base_hf_dir} --enable-lora --lora-modules {name}={Path(adapter_dir).resolve()} "
            f"--max-lora-rank {rank}")
