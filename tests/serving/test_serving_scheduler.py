"""Continuous batching: every answer equals its adapter's offline greedy generation, whatever joins or leaves."""

from __future__ import annotations

import threading
import time

import pytest
from serving_fixtures import load_base, make_adapters, offline_greedy

from loratune.serving import POLICIES, Sampling, Sequence, Server, ServingError

PROMPTS = ["Once upon a time", "The capital of France is", "1, 2, 3, 4,", "Hello there, my friend", "def f(x):"]
NEW = 6


@pytest.fixture(scope="module")
def root(tiny_dir, tmp_path_factory):
    return make_adapters(tiny_dir, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def expected(tiny_dir, root):
    """(adapter or None, prompt) -> the offline greedy tokens."""
    _, tok = load_base(tiny_dir)
    out = {}
    for adapter in (None, "alpha", "beta", "gamma"):
        answers = offline_greedy(tiny_dir, root / adapter if adapter else None, [tok(p).input_ids for p in PROMPTS[:3]],
                                 NEW)
        out |= {(adapter, p): a for p, a in zip(PROMPTS[:3], answers)}
    for p in PROMPTS[:3]:  # the adapters do change the answers (else equality would prove little)
        assert len({tuple(out[a, p]) for a in (None, "alpha", "beta", "gamma")}) >= 3
    return out


class Collector:
    def __init__(self):
        self.text, self.result, self.done = [], None, threading.Event()

    def __call__(self, kind, data):
        if kind == "text":
            self.text.append(data)
        else:
            self.result = (kind, data)
            self.done.set()


def _run(server, jobs, stagger=None):
    seqs = []
    for adapter, prompt in jobs:
        c = Collector()
        seq = Sequence(server.tok(prompt).input_ids, adapter, Sampling(max_tokens=NEW, temperature=0), c)
        seqs.append((server.scheduler.submit(seq), c))
        if stagger is not None:
            stagger()
    for _, c in seqs:
        assert c.done.wait(120)
    return seqs


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
def test_answers_equal_offline_greedy(tiny_dir, root, expected, policy):
    model, tok = load_base(tiny_dir)
    server = Server(model, tok, "tiny", root=root, max_loras=2, max_batch=4, policy=policy).start()
    try:
        jobs = [(a, p) for p in PROMPTS[:3] for a in (None, "alpha", "beta", "gamma")]
        for (adapter, prompt), (seq, c) in zip(jobs, _run(server, jobs)):
            assert c.result[0] == "done", c.result
            want = expected[adapter, prompt]
            assert seq.out == want, (policy, adapter, prompt)
            assert "".join(c.text) == tok.decode([t for t in want if t != tok.eos_token_id], skip_special_tokens=True)
        assert server.registry.stats.evictions > 0  # 3 adapters through 2 slots
        assert not server.registry.pins
    finally:
        server.stop()


@pytest.mark.slow
def test_joins_between_steps_and_unload_while_running(tiny_dir, root, expected):
    model, tok = load_base(tiny_dir)
    server = Server(model, tok, "tiny", root=root, max_loras=3, max_batch=8).start()
    try:
        long = Collector()
        server.scheduler.submit(Sequence(tok(PROMPTS[0]).input_ids, "alpha", Sampling(max_tokens=40, temperature=0),
                                         long))
        steps = server.scheduler.counters
        while steps.steps < 2:  # the long one is running
            time.sleep(0.005)
        server.registry.unregister("alpha")  # unloaded while in use: the running request finishes
        with pytest.raises(ServingError) as e:
            server.adapter_for("alpha")
        assert e.value.status == 404
        jobs = [("beta", PROMPTS[1]), (None, PROMPTS[2]), ("gamma", PROMPTS[0])]
        for (adapter, prompt), (seq, _) in zip(jobs, _run(server, jobs)):
            assert seq.out == expected[adapter, prompt]
        assert long.done.wait(120) and long.result == ("done", "length")
        assert "alpha" not in server.registry.slots  # its slot was freed when it finished
        assert server.scheduler.counters.failed == 0
    finally:
        server.stop()


def test_sampling_is_seeded_and_stop_strings_cut(tiny_dir, root):
    model, tok = load_base(tiny_dir)
    server = Server(model, tok, "tiny", root=root).start()
    try:
        outs = []
        for _ in range(2):
            c = Collector()
            seq = server.scheduler.submit(Sequence(tok(PROMPTS[1]).input_ids, "beta",
                                                   Sampling(max_tokens=8, temperature=0.9, top_p=0.8, seed=7), c))
            assert c.done.wait(60)
            outs.append(seq.out)
        assert outs[0] == outs[1]
        full = "".join(c.text)
        stop = full[2:4] if len(full) >= 4 else full[-1:]
        c = Collector()
        server.scheduler.submit(Sequence(tok(PROMPTS[1]).input_ids, "beta",
                                         Sampling(max_tokens=8, temperature=0.9, top_p=0.8, seed=7, stop=[stop]), c))
        assert c.done.wait(60) and c.result == ("done", "stop")
        assert "".join(c.text) == full[:full.find(stop)]
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("bound", ["sequences", "tokens"])
def test_batch_bounds_in_sequences_and_tokens(tiny_dir, root, expected, bound):
    """No decode step runs more than ``max_batch`` rows (2 here), nor more rows than fit ``max_batch_tokens``
    (prompt + max_tokens each; a budget of the largest request's need holds one at a time); the answers stay the
    offline ones."""
    model, tok = load_base(tiny_dir)
    jobs = [("alpha", PROMPTS[0]), ("beta", PROMPTS[1]), (None, PROMPTS[2]), ("gamma", PROMPTS[1])]
    need = [len(tok(p).input_ids) + NEW for _, p in jobs]
    assert max(need) < 2 * min(need)  # so a budget of max(need) never fits two
    server = Server(model, tok, "tiny", root=root, max_loras=3, max_batch=2 if bound == "sequences" else 8,
                    max_batch_tokens=16384 if bound == "sequences" else max(need))
    rows = []
    decode = server.scheduler.engine.decode
    server.scheduler.engine.decode = lambda last, slots: rows.append(len(last)) or decode(last, slots)
    server.start()
    try:
        for (adapter, prompt), (seq, c) in zip(jobs, _run(server, jobs)):
            assert c.result[0] == "done" and seq.out == expected[adapter, prompt]
        assert rows and max(rows) == (2 if bound == "sequences" else 1)
    finally:
        server.stop()
