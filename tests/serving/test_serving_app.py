"""Every endpoint through FastAPI's TestClient: shapes, streaming, runtime load/unload, and each bad request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from serving_fixtures import SYSTEM_PROMPT, TEMPLATE, load_base, make_adapters, offline_greedy

from loratune.serving import Server, create_app


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    root = make_adapters(tiny_dir, tmp_path_factory.mktemp("adapters"))
    (root / "broken").mkdir()  # registered at start, fails when first used
    (root / "broken" / "adapter_config.json").write_text((root / "alpha" / "adapter_config.json").read_text())
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    spare = make_adapters(tiny_dir, root / "more", names=("alpha",))  # a nested folder, loaded at run time
    model, tok = load_base(tiny_dir)
    server = Server(model, tok, "tiny-base", root=root, max_loras=2, max_cpu_loras=3)
    with TestClient(create_app(server)) as client:
        yield client, server, root, spare


def _err(r, status, param=None):
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["code"] == status and e["message"]
    if param is not None:
        assert e["param"] == param, e
    return e


def _events(r):
    lines = [ln for ln in r.text.split("\n\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(ln[6:]) for ln in lines[:-1]]


def test_models_health_metrics(setup):
    client, server, root, _ = setup
    data = client.get("/v1/models").json()["data"]
    by_id = {m["id"]: m for m in data}
    assert set(by_id) == {"tiny-base", "alpha", "beta", "gamma", "broken"}
    assert by_id["tiny-base"]["parent"] is None and by_id["alpha"]["parent"] == "tiny-base"
    assert all(m["object"] == "model" and m["owned_by"] for m in data)
    assert by_id["beta"]["root"] == str((root / "beta").resolve())
    assert client.get("/health").status_code == 200
    text = client.get("/metrics").text
    assert "# TYPE loratune_requests_total counter" in text and "loratune_resident_adapters" in text


def test_completion_equals_offline_greedy_and_streams_the_same(setup, tiny_dir):
    client, server, root, _ = setup
    prompt = "The capital of France is"
    ids = server.tok(prompt).input_ids
    want = offline_greedy(tiny_dir, root / "beta", [ids], 6)[0]
    want_text = server.tok.decode(want, skip_special_tokens=True)
    r = client.post("/v1/completions", json={"model": "beta", "prompt": prompt, "max_tokens": 6, "temperature": 0})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == want_text
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(want),
                             "total_tokens": len(ids) + len(want)}
    r = client.post("/v1/completions", json={"model": "beta", "prompt": prompt, "max_tokens": 6, "temperature": 0,
                                             "stream": True, "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = _events(r)
    assert all(e["object"] == "text_completion" for e in events)
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == want_text
    assert events[-2]["choices"][0]["finish_reason"] in ("length", "stop")
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == len(want)


def test_chat_uses_the_adapters_template_and_system_prompt(setup, tiny_dir):
    client, server, root, _ = setup
    msgs = [{"role": "user", "content": "hi"}]
    ids = server.tok.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT}, *msgs], chat_template=TEMPLATE,
                                         add_generation_prompt=True, tokenize=True, return_dict=False)
    assert server.prompt_ids(type("R", (), {"messages": msgs, "prompt": None})(), "gamma") == list(ids)
    want = server.tok.decode(offline_greedy(tiny_dir, root / "gamma", [list(ids)], 5)[0], skip_special_tokens=True)
    r = client.post("/v1/chat/completions", json={"model": "gamma", "messages": msgs, "max_tokens": 5,
                                                  "temperature": 0})
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == want
    assert body["usage"]["prompt_tokens"] == len(ids)
    r = client.post("/v1/chat/completions", json={"model": "gamma", "messages": msgs, "max_tokens": 5,
                                                  "temperature": 0, "stream": True})
    events = _events(r)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == want


@pytest.mark.parametrize("body, status, param", [
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "alpha"}, 400, "prompt"),
    ({"model": "alpha", "prompt": 5}, 400, "prompt"),
    ({"model": "alpha", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "alpha", "prompt": "x", "max_tokens": "9"}, 400, "max_tokens"),
    ({"model": "alpha", "prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
    ({"model": "alpha", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "alpha", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "alpha", "prompt": "x", "n": 2}, 400, "n"),
    ({"model": "alpha", "prompt": "x", "stop": [1]}, 400, "stop"),
    ({"model": "alpha", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": "alpha", "prompt": "x", "seed": 1.5}, 400, "seed"),
    ({"model": "alpha", "prompt": "x", "logprobs": 3}, 400, "logprobs"),
])
def test_bad_completion_requests(setup, body, status, param):
    client = setup[0]
    _err(client.post("/v1/completions", json=body), status, param)


def test_bad_chat_and_malformed_requests(setup):
    client, server, _, _ = setup
    _err(client.post("/v1/chat/completions", json={"model": "alpha"}), 400, "messages")
    _err(client.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "x", "content": "a"}]}),
         400, "messages[0]")
    _err(client.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user"}]}), 400,
         "messages[0].content")
    _err(client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    _err(client.post("/v1/completions", json=[1, 2]), 400)
    _err(client.post("/v1/completions", json={"model": "tiny-base", "prompt": "word " * 300}), 400, "prompt")
    _err(client.get("/v1/nothing"), 404)
    _err(client.post("/v1/completions", json={"model": "broken", "prompt": "x"}), 400)  # its file is damaged
    events = _events(client.post("/v1/completions", json={"model": "broken", "prompt": "x", "stream": True}))
    assert events[-1]["error"]["code"] == 400
    # the server still answers after all of that
    r = client.post("/v1/completions", json={"model": "tiny-base", "prompt": "ok", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


def test_runtime_load_unload_and_path_attacks(setup, tmp_path):
    client, server, root, spare = setup
    load = lambda body: client.post("/v1/load_lora_adapter", json=body)  # noqa: E731
    _err(load({"lora_path": "more/alpha"}), 400, "lora_name")
    _err(load({"lora_name": "x"}), 400, "lora_path")
    _err(load({"lora_name": "../x", "lora_path": "more/alpha"}), 400, "lora_name")
    _err(load({"lora_name": "x", "lora_path": "../../etc"}), 400, "lora_path")
    _err(load({"lora_name": "x", "lora_path": "/etc"}), 403, "lora_path")
    _err(load({"lora_name": "x", "lora_path": str(tmp_path)}), 403, "lora_path")
    _err(load({"lora_name": "x", "lora_path": "does-not-exist"}), 404, "lora_path")
    _err(load({"lora_name": "x", "lora_path": "."}), 400, "lora_path")  # the root holds no adapter files
    _err(load({"lora_name": "alpha", "lora_path": "more/alpha"}), 400, "lora_name")  # taken
    assert "x" not in server.registry.paths
    r = load({"lora_name": "late", "lora_path": "more/alpha"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'late' added successfully."
    assert "late" in {m["id"] for m in client.get("/v1/models").json()["data"]}
    def answer(model):
        return client.post("/v1/completions", json={"model": model, "prompt": "Once upon a time", "max_tokens": 6,
                                                    "temperature": 0}).json()["choices"][0]["text"]

    assert answer("late") == answer("alpha") != answer("tiny-base")  # (more/alpha holds alpha's weights)
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "late"})
    assert r.status_code == 200 and "removed successfully" in r.text
    _err(client.post("/v1/unload_lora_adapter", json={"lora_name": "late"}), 404, "lora_name")
    _err(client.post("/v1/completions", json={"model": "late", "prompt": "abc"}), 404, "model")


def test_refused_paths_read_nothing(setup, tmp_path, monkeypatch):
    """A lora_path outside the root (``..``, absolute, a symlink out of it, a symlinked weights file) is refused
    before any adapter file is opened; only a path inside the root is read."""
    import os

    from loratune.serving import registry as reg_module

    client, server, root, _ = setup
    out_dir = tmp_path / "outside-adapter"
    out_dir.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (out_dir / f).write_bytes((root / "alpha" / f).read_bytes())
    os.symlink(out_dir, root / "link-out")
    (root / "half").mkdir()
    os.symlink(out_dir / "adapter_model.safetensors", root / "half" / "adapter_model.safetensors")
    (root / "half" / "adapter_config.json").write_text((root / "alpha" / "adapter_config.json").read_text())
    reads = []
    real_config, real_tensors = reg_module.read_adapter_config, reg_module.read_adapter_tensors
    monkeypatch.setattr(reg_module, "read_adapter_config", lambda p: reads.append(p) or real_config(p))
    monkeypatch.setattr(reg_module, "read_adapter_tensors", lambda p: reads.append(p) or real_tensors(p))
    try:
        for path, status in [("../outside-adapter", 400), ("alpha/../../x", 400), (str(out_dir), 403),
                             ("link-out", 403), ("half", 403), ("/etc/passwd", 403)]:
            _err(client.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": path}), status,
                 "lora_path")
        assert reads == [] and "evil" not in server.registry.paths
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "fine", "lora_path": "alpha"}).status_code == 200
        assert reads and all(Path(p).resolve().is_relative_to(root.resolve()) for p in reads)
        client.post("/v1/unload_lora_adapter", json={"lora_name": "fine"})
    finally:
        os.unlink(root / "link-out")
        os.unlink(root / "half" / "adapter_model.safetensors")
        (root / "half" / "adapter_config.json").unlink()
        (root / "half").rmdir()


def test_unload_while_a_streamed_request_uses_the_adapter(setup):
    """Unloading an adapter mid-request: the running request finishes with that adapter's answer; new ones get 404."""
    client, server, root, _ = setup
    body = {"model": "beta", "prompt": "Tell me a story", "max_tokens": 40, "temperature": 0}
    want = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    texts, pinned = [], []
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if not texts and "beta" in server.registry.paths:  # the first chunk is out: the request is running
                pinned.append(server.registry.pins.get("beta", 0))
                assert client.post("/v1/unload_lora_adapter", json={"lora_name": "beta"}).status_code == 200
            texts.append(event)
    assert pinned == [1]  # it was unloaded while the request held its slot
    assert "error" not in texts[-1] and texts[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert "".join(e["choices"][0]["text"] for e in texts) == want
    _err(client.post("/v1/completions", json=body), 404, "model")
    assert "beta" not in server.registry.slots and not server.registry.pins.get("beta")
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "beta", "lora_path": "beta"})  # (as it was)
    assert r.status_code == 200
