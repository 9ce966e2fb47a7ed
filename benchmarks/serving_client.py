"""The load test's two ends for benchmarks/serving.py: a ``loratune serve`` process on loopback, and the concurrent
streaming clients that time each request (latency, time to first token) and keep its text."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ``loratune serve`` with ``loratune.serving.server.DESIGN`` set first: "v3" (the default), "v2" or "v1"
SERVE = ("import sys, loratune.serving.server as s; s.DESIGN = sys.argv[1]; from loratune.cli import main; "
         "sys.exit(main(sys.argv[2:]))")


def start_server(args, flags: list[str], log: Path, design: str = "v3") -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-c", SERVE, design, "serve", "--model", args.model, "--port", str(port),
           "--max-lora-rank", str(args.rank), "--max-batch", str(args.clients), "--served-model-name", "base",
           "--adapter-loaders", str(getattr(args, "loaders", 1)), *flags]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start within 600 s")


async def client_run(url: str, jobs: list[tuple[str, str]], clients: int, max_tokens: int, limit: float,
                     stagger: float = 0.0) -> dict:
    """Run ``jobs`` from ``clients`` concurrent clients, each sending its next request when the last one ends;
    ``stagger``: client i starts i·stagger/clients s late, so arrivals spread over the steps instead of coming in
    waves (with equal ``max_tokens`` the clients otherwise start, finish and send again together)."""
    import httpx

    results: list[dict | None] = [None] * len(jobs)
    next_job = iter(range(len(jobs)))
    start = time.perf_counter()

    async def one(client, i):
        model, prompt = jobs[i]
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        t0, first, text, usage, error = time.perf_counter(), None, [], None, None
        try:
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                else:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        ev = json.loads(line[6:])
                        if "error" in ev:
                            error = ev["error"]["message"]
                        elif ev.get("usage"):
                            usage = ev["usage"]
                        elif ev["choices"] and ev["choices"][0]["text"]:
                            first = first or time.perf_counter()
                            text.append(ev["choices"][0]["text"])
        except Exception as e:  # noqa: BLE001  (a failed request is counted, not fatal)
            error = f"{type(e).__name__}: {e}"
        end = time.perf_counter()
        results[i] = {"latency": end - t0, "ttft": (first or end) - t0, "text": "".join(text), "error": error,
                      "tokens": usage["completion_tokens"] if usage else 0}

    async def worker(client, k):
        await asyncio.sleep(k * stagger / clients)
        for i in next_job:
            if time.perf_counter() - start > limit:
                return
            await one(client, i)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:
        await asyncio.gather(*(worker(client, k) for k in range(clients)))
    wall = time.perf_counter() - start
    return {"wall": wall, "results": results}
