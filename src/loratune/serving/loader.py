"""Cold adapters read off the scheduler's thread (the third design): a small pool of loader threads reads and checks
the adapters that waiting requests name, while the scheduler keeps decoding the running ones.

Reading an r=16 all-linear adapter of a 135M model (safetensors read, shape/rank/finiteness checks, scaling folded
into B in float64) took ~0.3 s on the loaded VM; done on the scheduler's thread, every running sequence waited that
long. Here the scheduler only says which adapters its waiting requests need (``want``, at most ``max_cpu_loras``,
which the registry also keeps from eviction); a request joins once its adapter is in host memory. The loader reads
through ``AdapterRegistry.host_adapter``, so it reads exactly what a request on the scheduler's thread would: the
registered path (inside the adapter root for runtime loads), safetensors only, every check, and the same error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from .registry import AdapterRegistry, ServingError


class AdapterLoader:
    """Reads adapters into ``registry``'s host memory on ``workers`` threads; ``on_done()`` after each read."""

    def __init__(self, registry: AdapterRegistry, workers: int = 1, on_done: Callable[[], None] | None = None):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.registry, self.workers, self.on_done = registry, workers, on_done
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loratune-loader")
        self._lock = threading.Lock()
        self._wanted: set[str] = set()
        self._pending: set[str] = set()  # submitted, not finished
        self._failed: dict[str, ServingError] = {}
        self.reads = 0  # reads this loader finished (ok or not)

    def want(self, names: Iterable[str]) -> None:
        """The adapters the waiting requests need, first needed first: start reading each one not in host memory
        and not being read. A queued read of a name no longer wanted is skipped when its turn comes."""
        names = list(names)
        todo = []
        with self._lock:
            self._wanted = set(names)
            for name in names:
                try:
                    cold = name not in self._pending and self.registry.state(name) == "disk"
                except ServingError:  # unloaded meanwhile: its requests get the 404 from the scheduler
                    cold = False
                if cold:
                    self._pending.add(name)
                    todo.append(name)
        for name in todo:
            self._pool.submit(self._load, name)

    def pending(self) -> int:
        """Reads submitted and not finished."""
        with self._lock:
            return len(self._pending)

    def reading(self, name: str) -> bool:
        """Whether a read of ``name`` is queued or under way here."""
        with self._lock:
            return name in self._pending

    def take_failures(self) -> dict[str, ServingError]:
        """The reads that failed since the last call, name -> the error its requests fail with."""
        with self._lock:
            out, self._failed = self._failed, {}
        return out

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _load(self, name: str) -> None:
        err = None
        with self._lock:
            wanted = name in self._wanted
        if wanted:
            try:
                self.registry.host_adapter(name)
            except ServingError as e:
                err = e
            except Exception as e:  # noqa: BLE001  (a broken read fails its requests, never the loader)
                err = ServingError(f"cannot load adapter '{name}': {type(e).__name__}: {e}", status=500)
        with self._lock:
            self._pending.discard(name)
            self.reads += wanted
            if err is not None:
                self._failed[name] = err
        if self.on_done is not None:
            self.on_done()
