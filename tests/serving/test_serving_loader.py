"""The third design: cold adapters are read on the loader's thread while the scheduler keeps decoding; a bad adapter
fails only its requests (with the error a read on the scheduler's thread gives), an unload during a read leaves
nothing behind, the host-memory bound holds, and every answer still equals its adapter's offline one."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from serving_fixtures import ADAPTERS, load_base, make_adapters, offline_greedy
from test_serving_scheduler import NEW, PROMPTS, Collector, _run

from loratune.serving import AdapterRegistry, Sampling, Sequence, Server, ServingError
from loratune.serving import registry as registry_module


@pytest.fixture(scope="module")
def root(tiny_dir, tmp_path_factory):
    return make_adapters(tiny_dir, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def expected(tiny_dir, root):
    """(adapter, prompt, max tokens) -> the offline greedy tokens."""
    _, tok = load_base(tiny_dir)
    out = {}
    for adapter in ("alpha", "beta", "gamma"):
        answers = offline_greedy(tiny_dir, root / adapter, [tok(p).input_ids for p in PROMPTS[:3]], NEW)
        out |= {(adapter, p, NEW): a for p, a in zip(PROMPTS[:3], answers)}
    out["alpha", PROMPTS[0], 40] = offline_greedy(tiny_dir, root / "alpha", [tok(PROMPTS[0]).input_ids], 40)[0]
    return out


class SlowReads:
    """Stands in for the registry's file reader: records which thread reads which adapter, and holds the reads of
    ``held`` adapters until ``release()``."""

    def __init__(self, monkeypatch, held=()):
        self.real, self.held = registry_module.read_adapter_tensors, set(held)
        self.gate = threading.Event()
        self.started = {n: threading.Event() for n in self.held}
        self.reads: list[tuple[str, str]] = []
        self.now = self.most = 0
        self._lock = threading.Lock()
        monkeypatch.setattr(registry_module, "read_adapter_tensors", self)

    def __call__(self, path):
        name = Path(path).name
        with self._lock:
            self.reads.append((name, threading.current_thread().name))
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            if name in self.held:
                self.started[name].set()
                assert self.gate.wait(60)
            else:
                time.sleep(0.02)  # (slow enough for reads on two threads to overlap, were there two)
            return self.real(path)
        finally:
            with self._lock:
                self.now -= 1

    def release(self):
        self.gate.set()


def _submit(server, adapter, prompt, max_tokens=NEW):
    c = Collector()
    seq = server.scheduler.submit(Sequence(server.tok(prompt).input_ids, adapter,
                                           Sampling(max_tokens=max_tokens, temperature=0), c))
    return seq, c


def _wait(cond, seconds=60):
    deadline = time.time() + seconds
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.slow
@pytest.mark.parametrize("loaders", [1, 0])
def test_decoding_goes_on_while_a_cold_adapter_is_read(tiny_dir, root, expected, monkeypatch, loaders):
    """With a loader, the running request keeps producing tokens (and a later request whose adapter is in host
    memory passes the one waiting) while beta's read is held; without one (v2's behaviour) the scheduler's thread
    is stuck in the read and nothing decodes: the contrast this design removes."""
    slow = SlowReads(monkeypatch, held={"beta"})
    model, tok = load_base(tiny_dir)
    server = Server(model, tok, "tiny", root=root, max_loras=3, max_batch=8, adapter_loaders=loaders)
    server.registry.host_adapter("gamma")  # in host memory already (read on this thread)
    server.start()
    try:
        steps = server.scheduler.counters
        long, long_c = _submit(server, "alpha", PROMPTS[0], 40)
        _wait(lambda: steps.steps >= 2)
        beta, beta_c = _submit(server, "beta", PROMPTS[1])
        assert slow.started["beta"].wait(30)
        before, produced = steps.steps, len(long.out)
        gamma, gamma_c = _submit(server, "gamma", PROMPTS[2])
        if loaders:
            _wait(lambda: steps.steps >= before + 5)
            assert len(long.out) > produced  # the running request's tokens kept coming
            assert gamma_c.done.wait(60) and gamma_c.result == ("done", "length")  # passed the waiting beta
            assert not beta_c.done.is_set() and beta.slot is None
            assert server.registry.state("beta") == "reading"
        else:
            time.sleep(0.5)
            assert steps.steps == before and len(long.out) == produced and not gamma_c.done.is_set()
        slow.release()
        for c in (long_c, beta_c, gamma_c):
            assert c.done.wait(60) and c.result[0] == "done", c.result
        assert long.out == expected["alpha", PROMPTS[0], 40]
        assert beta.out == expected["beta", PROMPTS[1], NEW] and gamma.out == expected["gamma", PROMPTS[2], NEW]
        readers = {name: thread for name, thread in slow.reads}
        assert set(readers) == {"alpha", "beta", "gamma"} and len(slow.reads) == 3  # each read once
        want = "loratune-loader" if loaders else "loratune-scheduler"
        assert readers["alpha"].startswith(want) and readers["beta"].startswith(want), readers
        assert server.scheduler.counters.failed == 0 and not server.registry.pins
    finally:
        slow.release()
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("join_wait", [30.0, 0.0])
def test_with_nothing_running_the_first_requests_wait_for_the_reads_queued_with_them(tiny_dir, root, expected,
                                                                                     monkeypatch, join_wait):
    """Nothing runs, beta's read is held and alpha is in host memory: alpha waits for beta (up to join_wait) and
    both join in one prefill; with join_wait 0 alpha is served at once, beta after its read."""
    slow = SlowReads(monkeypatch, held={"beta"})
    model, tok = load_base(tiny_dir)
    server = Server(model, tok, "tiny", root=root, max_loras=3, max_batch=8)
    server.scheduler.join_wait = join_wait
    server.registry.host_adapter("alpha")
    prefills = []
    prefill_many = server.scheduler.engine.prefill_many
    server.scheduler.engine.prefill_many = lambda prompts, slots: prefills.append(len(prompts)) or prefill_many(
        prompts, slots)
    server.start()
    try:
        beta, beta_c = _submit(server, "beta", PROMPTS[1])
        assert slow.started["beta"].wait(30)
        alpha, alpha_c = _submit(server, "alpha", PROMPTS[2])
        assert alpha_c.done.wait(0.5 if join_wait else 30) == (join_wait == 0)
        assert server.scheduler.counters.steps == (0 if join_wait else NEW - 1)
        slow.release()
        assert alpha_c.done.wait(60) and beta_c.done.wait(60)
        assert alpha.out == expected["alpha", PROMPTS[2], NEW] and beta.out == expected["beta", PROMPTS[1], NEW]
        assert prefills == ([2] if join_wait else [1, 1])
    finally:
        slow.release()
        server.stop()


@pytest.fixture
def with_broken(root, tmp_path):
    """The adapters plus 'broken' (alpha's config; weights that are not safetensors) and 'nan' (alpha with a NaN)."""
    from safetensors.torch import load_file, save_file

    mixed = tmp_path / "root"
    shutil.copytree(root, mixed)
    shutil.copytree(root / "alpha", mixed / "broken")
    (mixed / "broken" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    shutil.copytree(root / "alpha", mixed / "nan")
    tensors = load_file(mixed / "nan" / "adapter_model.safetensors")
    key = next(iter(tensors))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = torch.nan
    save_file(tensors, mixed / "nan" / "adapter_model.safetensors")
    return mixed


@pytest.mark.slow
def test_a_bad_adapter_fails_only_its_requests_with_todays_error(tiny_dir, with_broken, expected):
    model, tok = load_base(tiny_dir)
    server = Server(model, tok, "tiny", root=with_broken, max_loras=3, max_batch=8).start()
    try:
        jobs = [("alpha", PROMPTS[1]), ("broken", PROMPTS[1]), ("beta", PROMPTS[2]), ("nan", PROMPTS[0]),
                ("broken", PROMPTS[2]), ("gamma", PROMPTS[2])]
        results = {}
        for (adapter, prompt), (seq, c) in zip(jobs, _run(server, jobs)):
            results.setdefault(adapter, []).append(c.result)
            if adapter in ("alpha", "beta", "gamma"):
                assert c.result == ("done", "length") and seq.out == expected[adapter, prompt, NEW]
        reference = AdapterRegistry(load_base(tiny_dir)[0], with_broken)  # the same read, on this thread
        for name in ("broken", "nan"):
            with pytest.raises(ServingError) as want:
                reference.host_adapter(name)
            for kind, err in results[name]:
                assert kind == "error" and isinstance(err, ServingError)
                assert (str(err), err.status, err.param) == (str(want.value), want.value.status, want.value.param)
        assert "NaN" in str(results["nan"][0][1])
        assert server.scheduler.counters.failed == 3 and server.scheduler.counters.finished == 3
        assert server.scheduler.loader.pending() == 0 and not server.registry.pins
    finally:
        server.stop()


@pytest.mark.slow
def test_unload_during_a_read_fails_its_requests_and_keeps_nothing(tiny_dir, root, expected, monkeypatch):
    """Two loader threads: alpha is read and served while beta's read is held; beta, unloaded meanwhile, fails with
    404 and nothing of it is kept."""
    slow = SlowReads(monkeypatch, held={"beta"})
    model, tok = load_base(tiny_dir)
    server = Server(model, tok, "tiny", root=root, max_loras=3, max_batch=8, adapter_loaders=2).start()
    try:
        beta, beta_c = _submit(server, "beta", PROMPTS[1])
        assert slow.started["beta"].wait(30)
        alpha, alpha_c = _submit(server, "alpha", PROMPTS[1])
        assert alpha_c.done.wait(60) and alpha.out == expected["alpha", PROMPTS[1], NEW]
        server.registry.unregister("beta")
        slow.release()
        assert beta_c.done.wait(60)
        kind, err = beta_c.result
        assert kind == "error" and err.status == 404 and "does not exist" in str(err)
        _wait(lambda: server.scheduler.loader.pending() == 0)
        assert "beta" not in server.registry.host and "beta" not in server.registry.slots
        assert server.registry.state("alpha") in ("slot", "host")
        # registered again (a runtime load): served as before
        server.registry.register("beta", server.registry.resolve("beta"))
        again = _run(server, [("beta", PROMPTS[2])])
        assert again[0][0].out == expected["beta", PROMPTS[2], NEW]
    finally:
        slow.release()
        server.stop()


@pytest.mark.slow
def test_limits_hold_while_reading_ahead(tiny_dir, root, expected, monkeypatch):
    """Three adapters through 1 slot and 2 host places, many requests queued: host memory never holds more than
    --max-cpu-loras, reads run on the loader's thread only (one at a time with one loader), at most one sequence
    runs (its slot is pinned), and the answers are the offline ones."""
    slow = SlowReads(monkeypatch)
    model, tok = load_base(tiny_dir)
    server = Server(model, tok, "tiny", root=root, max_loras=1, max_cpu_loras=2, max_batch=8)
    reg, seen = server.registry, []
    decode = server.scheduler.engine.decode

    def watched(last, slots):
        seen.append((len(reg.host), len(reg.protected), len(set(slots))))
        return decode(last, slots)

    server.scheduler.engine.decode = watched
    server.start()
    try:
        jobs = [(a, p) for p in PROMPTS[1:3] for a in ("alpha", "beta", "gamma")] * 2
        for (adapter, prompt), (seq, c) in zip(jobs, _run(server, jobs)):
            assert c.result == ("done", "length") and seq.out == expected[adapter, prompt, NEW], (adapter, prompt)
        assert seen and max(h for h, _, _ in seen) <= 2 and max(p for _, p, _ in seen) <= 2
        assert max(n for _, _, n in seen) == 1  # one slot: one adapter per step
        assert all(t.startswith("loratune-loader") for _, t in slow.reads) and slow.most == 1
        assert len(reg.host) <= 2 and reg.stats.evictions > 0
    finally:
        server.stop()


def test_one_read_per_adapter_across_threads_and_protected_ones_stay(tiny_dir, root, monkeypatch):
    slow = SlowReads(monkeypatch, held={"alpha"})
    reg = AdapterRegistry(load_base(tiny_dir)[0], root, max_loras=1, max_cpu_loras=2)
    got = []
    threads = [threading.Thread(target=lambda: got.append(reg.host_adapter("alpha"))) for _ in range(3)]
    for t in threads:
        t.start()
    assert slow.started["alpha"].wait(30)
    time.sleep(0.1)
    assert reg.state("alpha") == "reading"
    slow.release()
    for t in threads:
        t.join(30)
    assert len(got) == 3 and got[0] is got[1] is got[2] and reg.stats.loads == 1 and len(slow.reads) == 1
    reg.host_adapter("beta")
    reg.protect(["alpha"])  # alpha is the least recently used, but a waiting request needs it
    reg.host_adapter("gamma")
    assert set(reg.host) == {"alpha", "gamma"}
    reg.protect([])
    reg.host_adapter("beta")
    assert set(reg.host) == {"gamma", "beta"}
    with pytest.raises(registry_module.NotLoaded):
        reg.acquire("alpha", load=False)  # nothing read for it
    assert len(slow.reads) == 4 and reg.acquire("beta", load=False) == 1


def test_scaling_folded_in_fp32_equals_the_float64_route_bit_for_bit(tiny_dir, root):
    """A read folds s into B in the registry's dtype where s is exact in it (alpha's 8/4 = 2), else through float64
    (beta's rsLoRA 4/√8 and 12/√8): either way the bits the float64 route gives."""
    from safetensors.torch import load_file

    from loratune.adapters import functional as LF

    reg = AdapterRegistry(load_base(tiny_dir)[0], root)
    for name, pick in [("alpha", "q_proj"), ("beta", "q_proj"), ("beta", "down_proj")]:
        raw = load_file(root / name / "adapter_model.safetensors")
        mod = next(p for p in reg.host_adapter(name).factors if p.endswith(pick))
        cfg = ADAPTERS[name]
        alpha = cfg.get("alpha_pattern", {}).get(pick, cfg["lora_alpha"])
        b = raw[f"base_model.model.{mod}.lora_B.weight"]
        s = LF.lora_scaling(alpha, b.shape[1], cfg.get("use_rslora", False))
        assert (float(torch.tensor(s, dtype=torch.float32)) == s) == (name == "alpha")
        got = reg.host_adapter(name).factors[mod][1]
        assert torch.equal(got, (b.double() * s).float()), (name, pick)
