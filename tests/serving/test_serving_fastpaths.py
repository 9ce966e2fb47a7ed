"""The second design's speed-ups answer exactly as the first: batched prefill equals one prompt at a time, the
engine's reused per-step batch, a failing batched prefill retried alone, and ``design="v1"`` still serving."""

from __future__ import annotations

import pytest
import torch
from serving_fixtures import load_base, make_adapters
from test_serving_scheduler import PROMPTS, _run

from loratune.serving import Server


@pytest.fixture(scope="module")
def root(tiny_dir, tmp_path_factory):
    return make_adapters(tiny_dir, tmp_path_factory.mktemp("adapters"))


def _server(tiny_dir, root, **kw):
    model, tok = load_base(tiny_dir)
    return Server(model, tok, "tiny", root=root, max_loras=3, max_batch=8, **kw)


def test_batched_prefill_equals_one_at_a_time(tiny_dir, root):
    server = _server(tiny_dir, root)
    engine, reg = server.scheduler.engine, server.registry
    prompts = [server.tok(p).input_ids for p in PROMPTS[:3]] + [server.tok(PROMPTS[0] + " and more words").input_ids]
    assert len({len(p) for p in prompts}) > 1  # different lengths: the batch is left-padded
    slots = [reg.acquire("alpha"), None, reg.acquire("beta"), reg.acquire("gamma")]
    together = engine.prefill_many(prompts, slots)
    for ids, slot, (logits, kv) in zip(prompts, slots, together):
        want_logits, want_kv = engine.prefill(ids, slot)
        assert torch.allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
        for (k, v), (wk, wv) in zip(kv, want_kv, strict=True):
            assert k.shape == wk.shape and torch.allclose(k, wk, atol=1e-5) and torch.allclose(v, wv, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("design", ["v1", "v2", "v3"])
def test_both_designs_answer_alike_and_a_failed_batched_prefill_is_retried_alone(tiny_dir, root, design,
                                                                                 monkeypatch):
    server = _server(tiny_dir, root, design=design)
    calls = []
    if design != "v1":
        def broken(prompts, slots):
            calls.append(len(prompts))
            raise RuntimeError("batched prefill broke")
        monkeypatch.setattr(server.scheduler.engine, "prefill_many", broken)
    server.start()
    try:
        jobs = [(a, p) for p in PROMPTS[:2] for a in (None, "alpha", "beta", "gamma")]
        got = {(a, p): seq.out for (a, p), (seq, c) in zip(jobs, _run(server, jobs)) if c.result[0] == "done"}
    finally:
        server.stop()
    assert len(got) == len(jobs)  # every request answered (one at a time, after the batched prefill failed)
    assert server.scheduler.batch_prefill == (design != "v1") and server.scheduler.engine.fast == (design != "v1")
    assert (server.scheduler.loader is not None) == (design == "v3")
    if design != "v1":
        assert calls and max(calls) > 1
    reference = _server(tiny_dir, root).start()
    try:
        want = {(a, p): seq.out for (a, p), (seq, _) in zip(jobs, _run(reference, jobs))}
    finally:
        reference.stop()
    assert got == want


def test_unknown_design_is_refused(tiny_dir, root):
    with pytest.raises(Exception, match="design must be one of v1, v2, v3"):
        _server(tiny_dir, root, design="v9")
