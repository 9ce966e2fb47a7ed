"""The adapter registry: many PEFT adapters over one frozen base, in host memory and in stacked device slots.

Every linear layer of the base (PEFT's "all-linear") is wrapped once in an empty LoRA layer. For each one the
registry keeps stacked factors ``A (S+1, R, in)`` and ``B (S+1, out, R)`` (vLLM's ``lora_a_stacked``): slot 0 is
all zeros and stays so (the "null slot"), slots 1..S hold resident adapters, zero-padded to ``R`` (exact: padding
adds zero products) with the adapter's scaling (alpha/r, rsLoRA's alpha/√r, per-module ``alpha_pattern``) folded
into B when the adapter is loaded. A request's rows name slots through a per-call ``MixedBatch``; nothing is ever
merged into the shared base.

Two LRU caches, as vLLM's: at most ``max_cpu_loras`` adapters loaded in host memory, at most ``max_loras`` in
slots. A slot in use by a running sequence is pinned and never evicted; an adapter the scheduler has asked to keep
(``protect``: loaded ahead for waiting requests) is not evicted from host memory. Only the scheduler's thread calls
``acquire``/``release`` (which copy into the stacks, between forwards); ``register``/``unregister`` and
``host_adapter`` (reading a file) may come from any thread, and two threads asking for the same adapter share one
read. Adapter directories are read with safetensors only, from the paths registered (a runtime load never reads
outside the adapter root).
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..adapters import functional as LF
from ..adapters.batch import Factors, MixedBatch
from ..adapters.files import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config, read_adapter_tensors
from ..adapters.state import PREFIX, module_of
from ..adapters.targets import pattern_value
from ..adapters.variants import init_kind
from ..errors import AdapterFileError, LoraTuneError
from .chat import chat_files
from .layers import out_in, wrap_linear_layers

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


class ServingError(LoraTuneError):
    """A request the server refuses; ``status`` is the HTTP status, ``param`` the field at fault (or None)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param
        self.kind = kind or {400: "BadRequestError", 403: "PermissionDeniedError", 404: "NotFoundError",
                             503: "ServiceUnavailableError"}.get(status, "InternalServerError")


class NoFreeSlot(LoraTuneError):
    """Every slot holds an adapter a running sequence uses; the scheduler retries after a step."""


class NotLoaded(LoraTuneError):
    """``acquire(name, load=False)``: the adapter is neither in a slot nor in host memory (a loader reads it)."""


@dataclass
class HostAdapter:
    """An adapter loaded in host memory: per wrapped layer path, A (r, in) and s·B (out, r)."""

    name: str
    path: Path
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    chat_template: str | None = None
    system_prompt: str | None = None
    nbytes: int = 0
    load_ms: float = 0.0


@dataclass
class RegistryStats:
    loads: int = 0
    load_ms: list[float] = field(default_factory=list)
    swaps: int = 0
    swap_ms: list[float] = field(default_factory=list)
    evictions: int = 0


def check_name(name: object, param: str = "lora_name") -> str:
    """A valid adapter name, or a 400 naming ``param``."""
    if not isinstance(name, str) or not name:
        raise ServingError(f"'{param}' must be a non-empty string", param=param)
    if ".." in name or "/" in name or "\\" in name or not NAME.fullmatch(name):
        raise ServingError(f"invalid {param} {name!r}: use letters, digits, '_', '-', ':' or single dots "
                           "(no '..' or slashes), at most 128 characters", param=param)
    return name


class AdapterRegistry:
    """Registered adapters (name -> directory), a host LRU of loaded ones and an LRU of device slots."""

    def __init__(self, model: nn.Module, root: str | Path | None = None, adapters: dict[str, str | Path] | None = None,
                 max_loras: int = 8, max_cpu_loras: int | None = None, max_lora_rank: int = 16):
        max_cpu_loras = max_loras if max_cpu_loras is None else max_cpu_loras
        if max_loras < 1 or max_lora_rank < 1:
            raise LoraTuneError("--max-loras and --max-lora-rank must be at least 1")
        if max_cpu_loras < max_loras:
            raise LoraTuneError(f"--max-cpu-loras ({max_cpu_loras}) must be at least --max-loras ({max_loras})")
        self.model, self.max_loras, self.max_cpu_loras, self.max_rank = model, max_loras, max_cpu_loras, max_lora_rank
        self.root = Path(root).resolve() if root is not None else None
        self.layers = wrap_linear_layers(model)
        self._path_of = {id(m): p for p, m in self.layers.items()}
        w = next(iter(self.layers.values())).weight
        self.dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        self.stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for path, layer in self.layers.items():
            out_f, in_f = out_in(layer)
            self.stacks[path] = (torch.zeros(max_loras + 1, max_lora_rank, in_f, dtype=self.dtype, device=w.device),
                                 torch.zeros(max_loras + 1, out_f, max_lora_rank, dtype=self.dtype, device=w.device))
        self.paths: dict[str, Path] = {}
        self.host: OrderedDict[str, HostAdapter] = OrderedDict()
        self.slots: OrderedDict[str, int] = OrderedDict()  # resident name -> slot, least recently used first
        self.ranks: dict[int, dict[str, int]] = {}  # slot -> {layer path: rank}
        self.pins: dict[str, int] = {}
        self.protected: set[str] = set()  # kept in host memory for waiting requests (see ``protect``)
        self._reading: dict[str, Future] = {}  # name -> the read in progress, shared by every thread that asks
        self.stats = RegistryStats()
        self._lock = threading.RLock()
        if self.root is not None:
            if not self.root.is_dir():
                raise LoraTuneError(f"adapter root {root} is not a directory; pass the folder whose subfolders are "
                                    "PEFT adapters")
            for d in sorted(self.root.iterdir()):
                if d.is_dir() and (d / CONFIG_NAME).is_file() and NAME.fullmatch(d.name) and ".." not in d.name:
                    self.paths[d.name] = d.resolve()
        for name, path in (adapters or {}).items():
            check_name(name, "adapter name")
            self.paths[name] = Path(path).resolve()

    # --- names and files ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        with self._lock:
            return list(self.paths)

    def resolve(self, lora_path: object) -> Path:
        """``lora_path`` (relative to the root, or absolute) as a real directory inside the adapter root; 403 if it
        (or a symlink in it, or one of its two files) points outside, 400 if it names ``..``."""
        if not isinstance(lora_path, str) or not lora_path:
            raise ServingError("'lora_path' must be a non-empty string", param="lora_path")
        if self.root is None:
            raise ServingError("runtime adapter loading needs an adapter root: start the server with --adapters DIR",
                               status=403, param="lora_path")
        if ".." in Path(lora_path).parts or "\x00" in lora_path:
            raise ServingError("'lora_path' must not contain '..'", param="lora_path")
        given = Path(lora_path)
        real = (given if given.is_absolute() else self.root / given).resolve()
        files = [real / CONFIG_NAME, real / WEIGHTS_NAME]
        if not all(p.resolve().is_relative_to(self.root) for p in [real, *files]):
            raise ServingError(f"'lora_path' {lora_path!r} is outside the adapter root", status=403,
                               param="lora_path")
        if not real.is_dir():
            raise ServingError(f"no adapter found at 'lora_path' {lora_path!r}", status=404, param="lora_path")
        return real

    def register(self, name: str, path: Path, preload: bool = True) -> None:
        """Add adapter ``name`` at ``path`` (already resolved); loaded now (so a bad file fails here) if ``preload``."""
        check_name(name)
        with self._lock:
            if name in self.paths:
                raise ServingError(f"adapter '{name}' is already loaded; unload it first or pick another name",
                                   param="lora_name")
        if preload:
            host = self._read(name, path)
            with self._lock:
                self._put_host(host)
        with self._lock:
            self.paths[name] = path

    def unregister(self, name: str) -> None:
        """Forget ``name``: new requests get 404; running sequences keep their slot until they finish."""
        with self._lock:
            if name not in self.paths:
                raise ServingError(f"the adapter `{name}` does not exist", status=404, param="lora_name")
            del self.paths[name]
            self.host.pop(name, None)
            if name in self.slots and not self.pins.get(name):
                self._free(name)

    def host_adapter(self, name: str) -> HostAdapter:
        """``name`` in host memory (loading it on demand, evicting the least recently used). A read already under
        way for ``name`` on another thread is waited for, not repeated; a failed read raises its error in every
        caller. An adapter unregistered (or registered again elsewhere) during the read is not kept: 404."""
        with self._lock:
            if name in self.host:
                self.host.move_to_end(name)
                return self.host[name]
            if name not in self.paths:
                raise ServingError(f"the model `{name}` does not exist", status=404, param="model")
            path, reading = self.paths[name], self._reading.get(name)
            if reading is None:
                reading = self._reading[name] = Future()
                mine = True
            else:
                mine = False
        if not mine:
            return reading.result()
        try:
            host = self._read(name, path)
            with self._lock:
                if self.paths.get(name) != path:  # unloaded while it was read: nothing of it stays
                    raise ServingError(f"the model `{name}` does not exist (it was unloaded)", status=404,
                                       param="model")
                self._put_host(host)
        except BaseException as e:
            reading.set_exception(e)
            raise
        finally:
            with self._lock:
                self._reading.pop(name, None)
        reading.set_result(host)
        return host

    def state(self, name: str) -> str:
        """Where ``name`` is: "slot", "host" (loaded, not in a slot), "reading" or "disk"; 404 if not registered."""
        with self._lock:
            if name not in self.paths:
                raise ServingError(f"the model `{name}` does not exist", status=404, param="model")
            return ("slot" if name in self.slots else "host" if name in self.host else
                    "reading" if name in self._reading else "disk")

    def protect(self, names) -> None:
        """Keep ``names`` in host memory until the next call (the adapters waiting requests need; at most
        ``max_cpu_loras`` of them, so the host LRU never grows past its bound)."""
        with self._lock:
            self.protected = set(list(names)[:self.max_cpu_loras])

    def _put_host(self, host: HostAdapter) -> None:
        self.host[host.name] = host
        self.host.move_to_end(host.name)
        while len(self.host) > self.max_cpu_loras:  # (an adapter in a slot has its copy there; it may go)
            victim = next((n for n in self.host if n not in self.protected), None)
            if victim is None:
                break
            del self.host[victim]

    def _read(self, name: str, path: Path) -> HostAdapter:
        t0 = time.perf_counter()
        try:
            cfg = read_adapter_config(path)
            found = read_adapter_tensors(path)
        except AdapterFileError as e:
            raise ServingError(f"cannot load adapter '{name}': {e}", param="lora_path") from None
        if cfg.bias != "none" or cfg.modules_to_save:
            raise ServingError(f"adapter '{name}' trains biases or whole modules (bias={cfg.bias!r}, modules_to_save="
                               f"{cfg.modules_to_save}); the server applies LoRA factors on linear layers only",
                               param="lora_path")
        variant = ("an AdaLoRA adapter" if getattr(cfg, "use_adalora", False) else "a DoRA adapter" if cfg.use_dora
                   else f"an adapter initialized with init_lora_weights={cfg.init_lora_weights}"
                   if init_kind(cfg.init_lora_weights) else None)
        if variant:  # not ΔW = s·B·A on the base this server holds: merge it, or convert/train a plain LoRA
            raise ServingError(f"adapter '{name}' is {variant}; the server applies plain LoRA (ΔW = s·B·A on "
                               "the original base): serve the merged model (loratune merge), or save PiSSA/OLoRA "
                               "adapters with convert_to_lora=True", param="lora_path")
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        sums = []  # per module, the float64 sums of A and B: finite exactly when every value is (no overflow in f64)
        for key, a in found.items():
            if not key.endswith(".lora_A.weight"):
                if not key.endswith(".lora_B.weight"):
                    raise ServingError(f"adapter '{name}' has tensor '{key}', which the server cannot apply per "
                                       "request (LoRA on linear layers only)", param="lora_path")
                continue
            mod = module_of(key)
            b = found.get(f"{PREFIX}{mod}.lora_B.weight")
            layer = self.layers.get(mod)
            if layer is None or b is None:
                raise ServingError(f"adapter '{name}' does not fit this base model: '{mod}' is not one of its linear "
                                   "layers" if layer is None else f"adapter '{name}' lacks lora_B for '{mod}'",
                                   param="lora_path")
            out_f, in_f = out_in(layer)
            r = a.shape[0]
            if a.shape != (r, in_f) or b.shape != (out_f, r) or not (a.is_floating_point() and b.is_floating_point()):
                raise ServingError(f"adapter '{name}': module '{mod}' needs A ({r}, {in_f}) and B ({out_f}, {r}), the "
                                   f"file has {tuple(a.shape)} and {tuple(b.shape)}; made for another base model?",
                                   param="lora_path")
            if r > self.max_rank:
                raise ServingError(f"adapter '{name}' has rank {r} at '{mod}', above --max-lora-rank {self.max_rank}; "
                                   f"restart the server with --max-lora-rank {r}", param="lora_path")
            sums += [a.sum(dtype=torch.float64), b.sum(dtype=torch.float64)]
            s = LF.lora_scaling(pattern_value(cfg.alpha_pattern, mod, cfg.lora_alpha), r, cfg.use_rslora)
            factors[mod] = (a.to(self.dtype).contiguous(), self._scaled(b, s))
        if not factors:
            raise ServingError(f"adapter '{name}' holds no LoRA factors", param="lora_path")
        finite = torch.stack(sums).isfinite()  # (one check per adapter: per tensor it cost ~3x the whole read)
        if not finite.all():
            mod = list(factors)[int((~finite).nonzero()[0]) // 2]
            raise ServingError(f"adapter '{name}': '{mod}' holds NaN or infinite values", param="lora_path")
        template, prompt = chat_files(path)
        nbytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in factors.values())
        ms = 1000 * (time.perf_counter() - t0)
        with self._lock:
            self.stats.loads += 1
            self.stats.load_ms.append(ms)
        return HostAdapter(name, path, factors, template, prompt, nbytes, ms)

    def _scaled(self, b: torch.Tensor, s: float) -> torch.Tensor:
        """s·B in the registry's dtype, rounded once: where s is exact in that dtype, the product of two of its
        numbers is exact in float64, so multiplying in the dtype itself gives the same bits as the float64 route,
        without the float64 copy (which took most of a read's time)."""
        b = b.to(self.dtype)
        if s == 1.0:
            return b.contiguous()
        if float(torch.tensor(s, dtype=self.dtype)) == s:
            return (b * s).contiguous()
        return (b.to(torch.float64) * s).to(self.dtype).contiguous()

    # --- slots (the scheduler's thread) ------------------------------------------------------------
    def acquire(self, name: str, load: bool = True) -> int:
        """Pin ``name`` in a slot (copying it in if needed) and return the slot; NoFreeSlot if all are pinned.
        ``load=False``: NotLoaded, without reading anything, if it is neither in a slot nor in host memory."""
        with self._lock:
            if name in self.slots:
                self.slots.move_to_end(name)
                self.pins[name] = self.pins.get(name, 0) + 1
                return self.slots[name]
            if name not in self.paths:
                raise ServingError(f"the model `{name}` does not exist", status=404, param="model")
            host = self.host.get(name)  # (held here: a read on another thread may evict it meanwhile)
            if host is None and not load:
                raise NotLoaded(f"adapter '{name}' is not in host memory yet")
            if host is not None:
                self.host.move_to_end(name)
            used = set(self.slots.values())
            free = [s for s in range(1, self.max_loras + 1) if s not in used]
            if not free:
                victim = next((n for n in self.slots if not self.pins.get(n)), None)
                if victim is None:
                    raise NoFreeSlot(f"all {self.max_loras} adapter slots are in use")
                free = [self._free(victim)]
                self.stats.evictions += 1
        host = host or self.host_adapter(name)
        with self._lock:
            slot = free[0]
            self._copy_in(slot, host)
            self.slots[name] = slot
            self.pins[name] = self.pins.get(name, 0) + 1
            return slot

    def release(self, name: str) -> None:
        """Unpin one use of ``name``; an adapter unregistered meanwhile leaves its slot now."""
        with self._lock:
            self.pins[name] = max(0, self.pins.get(name, 0) - 1)
            if not self.pins[name]:
                del self.pins[name]
                if name not in self.paths and name in self.slots:
                    self._free(name)

    def _free(self, name: str) -> int:
        slot = self.slots.pop(name)
        self.ranks.pop(slot, None)  # (the stale factors stay until overwritten; no batch names the slot)
        return slot

    @torch.no_grad()
    def _copy_in(self, slot: int, host: HostAdapter) -> None:
        t0 = time.perf_counter()
        ranks = {}
        for path, (A, B) in self.stacks.items():
            A[slot].zero_()
            B[slot].zero_()
            if path in host.factors:
                a, b = host.factors[path]
                A[slot, :a.shape[0]].copy_(a)
                B[slot, :, :a.shape[0]].copy_(b)
                ranks[path] = a.shape[0]
        self.ranks[slot] = ranks
        self.stats.swaps += 1
        self.stats.swap_ms.append(1000 * (time.perf_counter() - t0))

    # --- batches -------------------------------------------------------------------------------------
    def batch(self, slots: list[int | None], fast: bool = True, cache_mb: float = 256.0) -> MixedBatch:
        """The per-call metadata for rows using these slots (None: the base). ``fast=False``: the first design's
        paths only (kept as a benchmark contestant); ``cache_mb``: memory the batch may keep per-layer copies of its
        adapters' factors in, for reuse over decode steps (see ``MixedBatch.concatenated``)."""
        used = [s for s in slots if s is not None]
        rmax = max((r for s in set(used) for r in self.ranks.get(s, {}).values()), default=1)
        stacks, ranks, path_of = self.stacks, dict(self.ranks), self._path_of

        def factors(layer, slot):
            path = path_of[id(layer)]
            r = ranks.get(slot, {}).get(path)
            if r is None:
                return None
            A, B = stacks[path]
            return Factors(A[slot, :r], B[slot, :, :r])

        def stacked(layer):
            A, B = stacks[path_of[id(layer)]]
            return A[:, :rmax], B[:, :, :rmax]

        return MixedBatch(slots, factors, self.layers.values(), stacks=stacked, fast=fast,
                          cache_bytes=int(cache_mb * 2**20))

    def resident(self) -> int:
        with self._lock:
            return len(self.slots)
