"""The OpenAI/vLLM wire format: request validation (a 400 naming the field) and the response and chunk shapes."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .engine import Sampling
from .registry import ServingError

MAX_STOPS = 4


@dataclass
class Parsed:
    """A validated completion or chat request."""

    model: str
    sampling: Sampling
    stream: bool
    include_usage: bool
    prompt: str | None = None  # completions
    messages: list[dict] | None = None  # chat


def error_body(err: ServingError) -> dict:
    """vLLM's (and OpenAI's) error shape; ``code`` is the HTTP status."""
    return {"error": {"message": str(err), "type": err.kind, "param": err.param, "code": err.status}}


def _bad(field: str, what: str) -> ServingError:
    return ServingError(f"'{field}' {what}", param=field)


def _number(body: dict, field: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(field)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(field, f"must be a number, got {v!r}")
    if v > hi or v < lo or (lo_open and v == lo):
        raise _bad(field, f"must be {'>' if lo_open else '>='} {lo:g} and <= {hi:g}, got {v!r}")
    return float(v)


def _int(body: dict, field: str, default: int | None, lo: int) -> int | None:
    v = body.get(field)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(field, f"must be a whole number, got {v!r}")
    if v < lo:
        raise _bad(field, f"must be at least {lo}, got {v}")
    return v


def _stops(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise _bad("stop", f"must be a non-empty string or a list of at most {MAX_STOPS} of them")
    return stops


def parse(body: Any, chat: bool) -> Parsed:
    """Validate a /v1/completions (or, with ``chat``, /v1/chat/completions) body."""
    if not isinstance(body, dict):
        raise ServingError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "is required: the base model's id or an adapter's name (see GET /v1/models)")
    if _int(body, "n", 1, 1) != 1:
        raise _bad("n", "must be 1: one completion per request")
    for name, allowed in (("logprobs", (None, False)), ("best_of", (None, 1)), ("suffix", (None,)),
                          ("tools", (None, [])), ("functions", (None, []))):
        if body.get(name) not in allowed:
            raise _bad(name, "is not supported by this server")
    max_tokens = _int(body, "max_completion_tokens", None, 1) if chat else None
    max_tokens = _int(body, "max_tokens", max_tokens if max_tokens is not None else 16, 1)
    seed = _int(body, "seed", None, -(2 ** 63))
    sampling = Sampling(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
                        seed=None if seed is None else seed % (2 ** 63), stop=_stops(body))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", f"must be true or false, got {stream!r}")
    opts = body.get("stream_options")
    if opts is not None and (not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool)):
        raise _bad("stream_options", "must be an object such as {\"include_usage\": true}")
    include_usage = bool(opts and opts.get("include_usage"))
    parsed = Parsed(model, sampling, stream, include_usage)
    if chat:
        parsed.messages = _messages(body.get("messages"))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise _bad("prompt", "is required and must be a string (one prompt per request)")
        parsed.prompt = prompt
    return parsed


def _messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "is required: a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise _bad(field, "must be an object with a role of system, user or assistant")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad(f"{field}.content", "parts must all be text parts")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad(f"{field}.content", "must be a string")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(chat: bool, rid: str, model: str, text: str, finish: str, use: dict) -> dict:
    """A whole (non-streaming) completion."""
    choice = {"index": 0, "finish_reason": finish, "logprobs": None}
    choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": use}


def chunk(chat: bool, rid: str, model: str, text: str | None, finish: str | None, first: bool = False,
          use: dict | None = None) -> dict:
    """One streamed chunk; ``text`` None and ``use`` given: the final usage-only chunk (``choices: []``)."""
    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model}
    if use is not None:
        return body | {"choices": [], "usage": use}
    if chat:
        delta = ({"role": "assistant", "content": text or ""} if first else {"content": text}) if text is not None \
            or first else {}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return body | {"choices": [choice]}
