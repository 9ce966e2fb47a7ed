"""Iteration-level scheduling (continuous batching, as vLLM, TGI and LoRAX): one decode step at a time over every
active sequence, each with its own adapter; new requests join between steps and finished ones leave.

``policy`` "continuous" admits whenever there is room; "static" admits a new batch only when the last one has
finished; "sequential" runs one request at a time (the baselines the benchmark compares). Batches are bounded in
sequences (``max_batch``) and in tokens (``max_batch_tokens``: prompt + max_tokens of every active sequence). A
request whose adapter needs a slot while every slot is pinned waits; one that fails fails alone.

With a loader (``loader_threads`` ≥ 1, the third design), an adapter that is neither in a slot nor in host memory is
read on the loader's threads while decoding goes on: before each admission the scheduler asks the loader for the
adapters the waiting requests need (first needed first, at most ``max_cpu_loras``, kept from host eviction until
admitted), and "continuous" admits a request once its adapter is in host memory, passing over requests whose
adapter is still being read. A failed read fails the requests that wait for that adapter, with the error a read on
the scheduler's thread gives. "static" and "sequential" keep their order (they wait for a read the loader started
while the previous batch ran). Without a loader a cold adapter is read on the scheduler's thread when its request
joins (the first two designs), and every running sequence waits meanwhile.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .engine import Engine, Sampler, Sampling
from .loader import AdapterLoader
from .registry import AdapterRegistry, NoFreeSlot, NotLoaded, ServingError

POLICIES = ("continuous", "static", "sequential")
_ids = itertools.count()


@dataclass
class Sequence:
    """One request in flight. ``emit(kind, data)`` is called from the scheduler's thread: ("text", delta),
    then once ("done", finish_reason) or ("error", ServingError)."""

    prompt: list[int]
    adapter: str | None  # None: the base model
    params: Sampling
    emit: Callable[[str, object], None]
    id: int = field(default_factory=lambda: next(_ids))
    out: list[int] = field(default_factory=list)
    slot: int | None = None
    text: str = ""
    sent: int = 0
    finish: str | None = None
    cancelled: bool = False
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class Counters:
    requests: int = 0
    finished: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    steps: int = 0


class Scheduler:
    """Owns the model: every forward runs on its one thread."""

    def __init__(self, engine: Engine, registry: AdapterRegistry, tokenizer, eos_ids: set[int], max_batch: int = 32,
                 max_batch_tokens: int = 16384, policy: str = "continuous", batch_prefill: bool = True,
                 prefill_tokens: int = 4096, loader_threads: int = 0, join_wait: float = 5.0,
                 read_wait: float = 0.25):
        """``batch_prefill``: the requests that join between two steps are prefilled together, in left-padded
        forwards of at most ``prefill_tokens`` tokens (False: one at a time, the first design). ``loader_threads``:
        read cold adapters on that many threads while decoding goes on (0: on this thread, as the first two
        designs). ``join_wait``: with a loader and nothing running, how long (s) at most the first requests wait
        for the reads of the others that fit the batch, so that they join in one prefill rather than one small
        prefill each (a closed loop of clients sends requests in waves; while a batch runs, requests join at each
        step as their adapters arrive). ``read_wait``: while a batch runs, how long admission waits for the reads
        of the requests that fit, as a share of the last decode step (a read much shorter than a step then joins at
        once, as it would on this thread; a long one never holds the batch longer than that share)."""
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.batch_prefill, self.prefill_tokens, self.join_wait = batch_prefill, prefill_tokens, join_wait
        self.read_wait, self._last_step = read_wait, 0.0
        self.engine, self.registry, self.tok, self.eos = engine, registry, tokenizer, eos_ids
        self.max_batch = 1 if policy == "sequential" else max_batch
        self.max_tokens, self.policy = max_batch_tokens, policy
        self.waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []
        self.counters = Counters()
        self._wake = threading.Condition()
        self._stop = False
        self._news = False  # a request came or a read finished since the last admission
        self.loader = AdapterLoader(registry, loader_threads, self._notify) if loader_threads else None
        self._thread = threading.Thread(target=self._loop, name="loratune-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)
        if self.loader is not None:
            self.loader.stop()

    def submit(self, seq: Sequence) -> Sequence:
        with self._wake:
            self.waiting.append(seq)
            self.counters.requests += 1
            self._news = True
            self._wake.notify()
        return seq

    def _notify(self) -> None:
        """The loader finished a read (on its thread): admission may take a waiting request now."""
        with self._wake:
            self._news = True
            self._wake.notify()

    def queue_length(self) -> int:
        return len(self.waiting)

    # --- the loop ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self.waiting and not self.active:
                    self._wake.wait(timeout=1.0)
                if not self._stop and not self.active and not self._news:
                    # nothing runs and the last admission took nothing (adapters being read): wait for news
                    self._wake.wait(timeout=0.1)
                if self._stop:
                    break
                self._news = False
            try:
                self._admit()
                if self.active:
                    self._step()
            except Exception as e:  # a failing step fails its sequences, never the server
                err = e if isinstance(e, ServingError) else ServingError(f"generation failed: {e}", status=500)
                for seq in self.active:
                    self._fail(seq, err)
                self.active = []
                self.engine.drop([])
        for seq in [*self.active, *self.waiting]:
            self._fail(seq, ServingError("the server is shutting down", status=503))

    def _budget(self, seqs) -> int:
        return sum(len(s.prompt) + s.params.max_tokens for s in seqs)

    def _admit(self) -> None:
        with self._wake:
            candidates = list(self.waiting)
        if self.loader is not None:
            candidates = self._prefetch(candidates)
        if self.policy == "static" and self.active:
            return
        lazy = self.loader is not None and self.policy == "continuous"  # pass over requests whose adapter is read
        if lazy and not self.active and self._reading_ahead(candidates[:self.max_batch]) \
                and time.perf_counter() - candidates[0].queued_at < self.join_wait:
            return  # nothing runs: let the reads for the batch finish, then join together (a read's end wakes us)
        if lazy and self.active:
            self._await_reads(candidates[:self.max_batch - len(self.active)])
        joined, kvs = [], []
        for seq in candidates:
            if len(self.active) + len(joined) >= self.max_batch:
                break
            if self._budget([*self.active, *joined, seq]) > self.max_tokens and (self.active or joined):
                break
            if seq.cancelled:
                self._leave(seq)
                continue
            try:
                if seq.adapter is not None:
                    seq.slot = self.registry.acquire(seq.adapter, load=not lazy)
                if not self.batch_prefill:
                    logits, kv = self.engine.prefill(seq.prompt, seq.slot)
            except (NoFreeSlot, NotLoaded):
                continue  # stays in the queue, in its place
            except Exception as e:
                self._leave(seq)
                self._fail(seq, e if isinstance(e, ServingError) else ServingError(f"generation failed: {e}", 500))
                continue
            self._leave(seq)
            if self.batch_prefill:
                joined.append(seq)  # prefilled together below
            elif not self._started(seq, logits):
                joined.append(seq)
                kvs.append(kv)
        if joined and self.batch_prefill:
            joined, kvs = self._prefill_together(joined)
        if joined:
            self.engine.join(kvs)
            self.active += joined

    def _await_reads(self, seqs: list[Sequence]) -> None:
        """Wait (a read's end wakes us) until the adapters of ``seqs`` are read, at most ``read_wait`` of a step."""
        deadline = time.perf_counter() + self.read_wait * self._last_step
        while self._reading_ahead(seqs):
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            with self._wake:
                if not self._news:
                    self._wake.wait(left)
                self._news = False

    def _reading_ahead(self, seqs: list[Sequence]) -> bool:
        """Whether the loader is reading (or about to read) the adapter of one of ``seqs`` (one it was not asked for,
        beyond the ``max_cpu_loras`` it reads ahead, is not waited for)."""
        return any(s.adapter is not None and self.loader.reading(s.adapter) for s in seqs)

    def _leave(self, seq: Sequence) -> None:
        with self._wake:
            self.waiting.remove(seq)
            self._news = True  # the queue moved: the next admission may take more

    def _prefetch(self, candidates: list[Sequence]) -> list[Sequence]:
        """Fail the waiting requests whose adapter failed to read or was unloaded; have the loader read (and the
        registry keep) the adapters the others need, first needed first, at most ``max_cpu_loras``. The rest."""
        failures = self.loader.take_failures()
        keep, need = [], []
        for seq in candidates:
            name, where, err = seq.adapter, "slot", None
            if name is not None and not seq.cancelled:
                err = failures.get(name)
                if err is None:
                    try:
                        where = self.registry.state(name)
                    except ServingError as e:  # unloaded while it waited: 404, as at admission
                        err = e
            if err is not None:
                self._leave(seq)
                self._fail(seq, err)
                continue
            keep.append(seq)
            if where != "slot" and name not in need and len(need) < self.registry.max_cpu_loras:
                need.append(name)
        self.registry.protect(need)
        self.loader.want(need)
        return keep

    def _started(self, seq: Sequence, logits) -> bool:
        """Count the prompt and sample the first token; True if ``seq`` finished already."""
        self.counters.prompt_tokens += len(seq.prompt)
        seq.sampler = Sampler(seq.params)
        return self._advance(seq, logits)

    def _prefill_together(self, seqs: list[Sequence]) -> tuple[list[Sequence], list]:
        """Prefill the joining sequences in one forward (in chunks of at most ``prefill_tokens`` padded tokens); if
        a chunk fails, its sequences are retried one at a time, so a bad one fails alone. The ones still running
        and their caches."""
        chunks, chunk = [], []
        for seq in sorted(seqs, key=lambda s: len(s.prompt)):  # similar lengths together: less padding
            if chunk and (len(chunk) + 1) * len(seq.prompt) > self.prefill_tokens:
                chunks.append(chunk)
                chunk = []
            chunk.append(seq)
        chunks.append(chunk)
        running, kvs = [], []
        for chunk in chunks:
            try:
                outs = self.engine.prefill_many([s.prompt for s in chunk], [s.slot for s in chunk])
            except Exception:
                outs = []
                for seq in chunk:
                    try:
                        outs.append(self.engine.prefill(seq.prompt, seq.slot))
                    except Exception as e:
                        self._fail(seq, e if isinstance(e, ServingError) else
                                   ServingError(f"generation failed: {e}", 500))
                        outs.append(None)
            for seq, got in zip(chunk, outs):
                if got is not None and not self._started(seq, got[0]):
                    running.append(seq)
                    kvs.append(got[1])
        return running, kvs

    def _step(self) -> None:
        t0 = time.perf_counter()
        logits = self.engine.decode([s.out[-1] for s in self.active], [s.slot for s in self.active])
        self._last_step = time.perf_counter() - t0
        self.counters.steps += 1
        keep = [i for i, seq in enumerate(self.active) if not self._advance(seq, logits[i])]
        if len(keep) < len(self.active):
            self.active = [self.active[i] for i in keep]
            self.engine.drop(keep)

    def _advance(self, seq: Sequence, logits) -> bool:
        """Sample one token for ``seq`` and tell its client; True if it has finished (and left)."""
        if seq.cancelled:
            self._finish(seq, None)
            return True
        token = seq.sampler(logits)
        seq.out.append(token)
        self.counters.completion_tokens += 1
        text = self.tok.decode(seq.out, skip_special_tokens=True) if token not in self.eos else seq.text
        reason = "stop" if token in self.eos else None
        stops = seq.params.stop
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1) if stops else -1
        if cut >= 0:
            text, reason = text[:cut], "stop"
        if reason is None and len(seq.out) >= seq.params.max_tokens:
            reason = "length"
        seq.text = text
        safe = len(text) if reason else len(text) - max((len(s) for s in stops), default=1) + 1
        while safe > seq.sent and text[safe - 1] == "\ufffd":  # half of a multi-byte character: wait for the rest
            safe -= 1
        if safe > seq.sent:
            seq.emit("text", text[seq.sent:safe])
            seq.sent = safe
        if reason:
            self._finish(seq, reason)
            return True
        return False

    def _finish(self, seq: Sequence, reason: str | None) -> None:
        if seq.adapter is not None and seq.slot is not None:
            self.registry.release(seq.adapter)
            seq.slot = None
        seq.finish = reason or "cancelled"
        self.counters.finished += 1
        if reason:
            seq.emit("done", reason)

    def _fail(self, seq: Sequence, err: Exception) -> None:
        if seq.adapter is not None and seq.slot is not None:
            self.registry.release(seq.adapter)
            seq.slot = None
        self.counters.failed += 1
        seq.emit("error", err)
