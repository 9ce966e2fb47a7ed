"""One real uvicorn server on loopback, driven by the official openai client (streaming and not)."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
import uvicorn
from serving_fixtures import load_base, make_adapters, offline_greedy

from loratune.serving import Server, create_app


@pytest.mark.slow
def test_openai_client_against_uvicorn(tiny_dir, tmp_path):
    root = make_adapters(tiny_dir, tmp_path / "adapters", names=("alpha", "beta"))
    model, tok = load_base(tiny_dir)
    server = Server(model, tok, "tiny-base", root=root)
    config = uvicorn.Config(create_app(server), host="127.0.0.1", port=0, log_level="warning")
    web = uvicorn.Server(config)
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    try:
        for _ in range(600):
            if web.started:
                break
            time.sleep(0.05)
        port = web.servers[0].sockets[0].getsockname()[1]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                               http_client=httpx.Client(trust_env=False), max_retries=0)
        assert {m.id for m in client.models.list()} == {"tiny-base", "alpha", "beta"}
        prompt = "The capital of France is"
        want = tok.decode(offline_greedy(tiny_dir, root / "beta", [tok(prompt).input_ids], 6)[0],
                          skip_special_tokens=True)
        r = client.completions.create(model="beta", prompt=prompt, max_tokens=6, temperature=0)
        assert r.choices[0].text == want and r.usage.completion_tokens >= 1
        chunks = list(client.completions.create(model="beta", prompt=prompt, max_tokens=6, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
        assert chunks[-1].usage.total_tokens == r.usage.total_tokens
        chat = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4, temperature=0)
        streamed = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=4, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="x")
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="beta", prompt="x", max_tokens=100_000)
    finally:
        web.should_exit = True
        thread.join(timeout=20)
