"""The HTTP side of `python -m apps.server`: parse and validate, hand jobs to the engine, stream the
answers. Every error is OpenAI's JSON with its status; a bad request never touches the others."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from apps.server_engine import Engine, Ticket
from apps.server_metrics import Metrics
from apps.server_prompt import Job, PromptBuilder, RequestError
from apps.server_protocol import ChatRequest, CompletionRequest, ErrorBody, ErrorResponse, ModelCard, ModelList
from apps.server_responses import Reply

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


@dataclass
class ServerState:
    engine: Engine
    builder: PromptBuilder
    metrics: Metrics
    model_id: str
    created: int
    api_key: str | None
    max_body_bytes: int


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
            429: "rate_limit_error", 503: "server_error"}.get(status, "invalid_request_error" if status < 500
                                                                    else "server_error")
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


class _TooLarge(Exception):
    pass


class Gate:
    """ASGI middleware: the API key, the body size limit, and requests counted by endpoint and status."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, status = scope["path"], [500]
        endpoint = path if path in ENDPOINTS else "other"

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                return await refusal(scope, receive, counted_send)
            await self.app(scope, self._limited(scope, receive), counted_send)
        except _TooLarge:
            await error_response(413, f"request body larger than {self.state.max_body_bytes} bytes")(
                scope, receive, counted_send)
        finally:
            self.state.metrics.requests.labels(endpoint, str(status[0])).inc()

    def _refusal(self, scope: dict) -> JSONResponse | None:
        headers = dict(scope["headers"])
        key = self.state.api_key
        if key is not None and scope["path"] != "/health":
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return error_response(401, "missing or invalid API key (Authorization: Bearer KEY)", None,
                                      "invalid_api_key")
        size = headers.get(b"content-length")
        if size is not None and size.isdigit() and int(size) > self.state.max_body_bytes:
            return error_response(413, f"request body larger than {self.state.max_body_bytes} bytes")
        return None

    def _limited(self, scope: dict, receive: Any) -> Any:
        seen = [0]

        async def limited() -> dict:
            message = await receive()
            seen[0] += len(message.get("body", b""))
            if seen[0] > self.state.max_body_bytes:
                raise _TooLarge()
            return message

        return limited


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="llama4-local", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Gate, state=state)

    @app.exception_handler(RequestError)
    async def refused(_: Request, e: RequestError) -> JSONResponse:
        return error_response(e.status, str(e), e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", None, "invalid_json")
        where = ".".join(loc) or "body"
        return error_response(400, f"{where}: {first.get('msg', 'invalid value')}", where, "invalid_value")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(e).__name__}: {e}")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return ModelList(data=[ModelCard(id=state.model_id, created=state.created)]).model_dump()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request) -> Response:
        jobs = await asyncio.to_thread(state.builder.chat_jobs, req)
        top = req.top_logprobs or 0
        return await _answer(state, request, jobs, Reply("chat", state.model_id, len(jobs[0].prompt), req.n,
                                                        req.logprobs, top), req)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        jobs = await asyncio.to_thread(state.builder.completion_jobs, req)
        reply = Reply("completion", state.model_id, len(jobs[0].prompt), req.n, req.logprobs is not None,
                      req.logprobs or 0)
        return await _answer(state, request, jobs, reply, req)

    return app


async def _answer(state: ServerState, request: Request, jobs: list[Job], reply: Reply, req: Any) -> Response:
    tickets = state.engine.submit(jobs)
    try:
        for _ in tickets:  # every job accepted (a uid) or the first refusal
            _, item = await tickets[0].events.get()
            if isinstance(item, RequestError):
                raise item
    except BaseException:
        for t in tickets:
            state.engine.cancel(t)
        raise
    if req.stream:
        usage = req.stream_options is not None and req.stream_options.include_usage
        return StreamingResponse(_stream(state, tickets, reply, usage), media_type="text/event-stream")
    return await _collect(state, request, tickets, reply)


async def _events(tickets: list[Ticket]) -> AsyncIterator[tuple[int, Any]]:
    """(index, event) until every job has finished."""
    open_jobs = len(tickets)
    while open_jobs:
        index, item = await tickets[0].events.get()
        if getattr(item, "finish_reason", None) is not None:
            open_jobs -= 1
        yield index, item


async def _collect(state: ServerState, request: Request, tickets: list[Ticket], reply: Reply) -> Response:
    """Wait for every choice; a client that goes away meanwhile has its rows cancelled."""

    async def gather() -> Response:
        async for index, e in _events(tickets):
            if e.finish_reason == "error":
                return error_response(500, e.error or "generation failed")
            reply.choices[index].add(e, state.builder.tokenizer)
        return JSONResponse(reply.response().model_dump())

    async def disconnected() -> Response:
        while not await request.is_disconnected():
            await asyncio.sleep(0.05)
        return Response(status_code=499)

    tasks = [asyncio.create_task(gather()), asyncio.create_task(disconnected())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return next(iter(done)).result()
    finally:
        for task in tasks:
            task.cancel()
        for t in tickets:
            state.engine.cancel(t)


def _sse(model: Any) -> str:
    return f"data: {model.model_dump_json()}\n\n"


async def _stream(state: ServerState, tickets: list[Ticket], reply: Reply, usage: bool) -> AsyncIterator[str]:
    """SSE chunks, then the usage chunk when asked, then [DONE]; a client that leaves cancels its rows."""
    try:
        for t in tickets:
            first = reply.first_chunk(t.index)
            if first is not None:
                yield _sse(first)
        async for index, e in _events(tickets):
            if e.finish_reason == "error":
                yield "data: " + json.dumps({"error": {"message": e.error, "type": "server_error"}}) + "\n\n"
                continue
            entry = reply.choices[index].add(e, state.builder.tokenizer)
            chunk = reply.chunk(index, e, entry)
            if chunk is not None:
                yield _sse(chunk)
        if usage:
            yield _sse(reply.usage_chunk())
        yield "data: [DONE]\n\n"
    finally:
        for t in tickets:
            state.engine.cancel(t)
