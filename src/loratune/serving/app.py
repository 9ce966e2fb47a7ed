"""The HTTP routes, with vLLM's conventions so existing OpenAI clients work unchanged.

``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``model`` picks the adapter; the
base's id is no adapter; ``stream: true`` sends server-sent events ending ``data: [DONE]``),
``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``, ``GET /health``, ``GET /metrics``. Every error
is ``{"error": {"message", "type", "param", "code"}}`` with ``code`` the HTTP status.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from . import protocol
from .registry import ServingError, check_name
from .server import Server


def _error(err: ServingError) -> JSONResponse:
    return JSONResponse(protocol.error_body(err), status_code=err.status)


async def _body(request: Request) -> dict:
    try:
        body = json.loads(await request.body() or b"null")
    except ValueError as e:
        raise ServingError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ServingError("the request body must be a JSON object")
    return body


def create_app(server: Server, manage_lifecycle: bool = True) -> FastAPI:
    """The FastAPI app over ``server``; with ``manage_lifecycle`` the app starts and stops its scheduler."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        if manage_lifecycle:
            server.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                server.stop()

    app = FastAPI(title="loratune serve", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(ServingError)
    async def _serving_error(_request, err: ServingError):
        return _error(err)

    @app.exception_handler(HTTPException)
    async def _http_error(_request, exc: HTTPException):
        return _error(ServingError(str(exc.detail), status=exc.status_code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        return _error(ServingError(f"invalid request: {exc.errors()[0].get('msg', exc)}"))

    @app.exception_handler(Exception)
    async def _internal(_request, exc: Exception):
        return _error(ServingError(f"internal error: {type(exc).__name__}: {exc}", status=500))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": server.models()}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        body = await _body(request)
        name = check_name(body.get("lora_name"))
        path = server.registry.resolve(body.get("lora_path"))
        if name == server.base_id:
            raise ServingError(f"'{name}' is the base model's id; pick another lora_name", param="lora_name")
        await asyncio.to_thread(server.registry.register, name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        body = await _body(request)
        name = check_name(body.get("lora_name"))
        server.registry.unregister(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(server, await _body(request), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(server, await _body(request), chat=True)

    return app


async def _generate(server: Server, body: dict, chat: bool) -> Response:
    req = protocol.parse(body, chat)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(kind: str, data) -> None:  # called on the scheduler's thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, (kind, data))
        except RuntimeError:  # the client's loop is gone
            if seq is not None:
                seq.cancelled = True

    seq = None
    seq, n_prompt = await asyncio.to_thread(server.submit, req, emit)
    rid = protocol.new_id(chat)
    if not req.stream:
        parts = []
        try:
            while True:
                kind, data = await events.get()
                if kind == "text":
                    parts.append(data)
                elif kind == "error":
                    raise data if isinstance(data, ServingError) else ServingError(str(data), status=500)
                else:
                    return JSONResponse(protocol.response(chat, rid, req.model, "".join(parts), data,
                                                          protocol.usage(n_prompt, len(seq.out))))
        except asyncio.CancelledError:
            seq.cancelled = True
            raise

    async def stream() -> AsyncIterator[str]:
        first = True
        try:
            if chat:
                yield _sse(protocol.chunk(chat, rid, req.model, "", None, first=True))
                first = False
            while True:
                kind, data = await events.get()
                if kind == "text":
                    yield _sse(protocol.chunk(chat, rid, req.model, data, None, first=first))
                    first = False
                elif kind == "error":
                    err = data if isinstance(data, ServingError) else ServingError(str(data), status=500)
                    yield _sse(protocol.error_body(err))
                    break
                else:
                    yield _sse(protocol.chunk(chat, rid, req.model, None if chat else "", data))
                    if req.include_usage:
                        yield _sse(protocol.chunk(chat, rid, req.model, None, None,
                                                  use=protocol.usage(n_prompt, len(seq.out))))
                    break
            yield "data: [DONE]\n\n"
        finally:
            if seq.finish is None:
                seq.cancelled = True  # the client went away: the scheduler drops it at the next step

    return StreamingResponse(stream(), media_type="text/event-stream")


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
