"""The FastAPI application: OpenAI routes over one engine and its worker thread.

Every request is checked before it is queued (schema, model name, context room), so a bad request
costs no generation time. Streaming answers are server-sent events in OpenAI's chunk format ending
with ``data: [DONE]``; an error after the stream has started is sent as one ``data: {"error": ...}``
event, which the ``openai`` client raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from mobilemoe.errors import MobileMoEError
from mobilemoe.runtime.sampling import SamplingParams
from mobilemoe.serve import protocol as P
from mobilemoe.serve.worker import Job, Worker

log = logging.getLogger("mobilemoe.serve")
_POLL_S = 0.25  # how often a waiting non-streaming request checks whether its client is still there


@dataclass
class ServeSettings:
    model_name: str
    max_tokens: int = 128  # for requests that give no max_tokens (capped by the context room)
    sampling: SamplingParams = field(default_factory=SamplingParams)  # defaults for omitted fields
    queue_size: int = 16  # requests waiting beyond the one being generated
    request_timeout_s: float = 300.0  # queue wait + generation
    chat_stop_ids: list[int] | None = None  # ids that end a chat reply (default: the chat format's stop_ids)
    text_stop_ids: list[int] | None = None  # ids that end a plain completion (default: its eos_ids)


class _Server:
    """Request checks and the bridge between the event loop and the worker thread."""

    def __init__(self, engine, chat_format, settings: ServeSettings) -> None:
        self.engine, self.chat, self.settings = engine, chat_format, settings
        self.worker = Worker(engine, chat_format.tokenizer, settings.queue_size)
        self.created = int(time.time())

    # ---------------------------------------------------------------- checks
    def check_model(self, name: str) -> None:
        if name != self.settings.model_name:
            raise P.APIError(404, f"the model {name!r} does not exist; this server serves "
                                  f"{self.settings.model_name!r}", param="model", code="model_not_found")

    def prompt_ids(self, req: P.ChatRequest | P.CompletionRequest) -> list[int]:
        try:
            if isinstance(req, P.ChatRequest):
                return self.chat.prompt_ids(req.message_dicts())
            if isinstance(req.prompt, str):
                return self.chat.text_ids(req.prompt)
        except MobileMoEError as exc:  # a bad role, a template that refuses the messages
            raise P.APIError(400, str(exc), param="messages") from None
        V = self.engine.config.vocab_size
        if not req.prompt or any(not 0 <= t < V for t in req.prompt):
            raise P.APIError(400, f"prompt: expected a non-empty list of token ids in [0, {V})", param="prompt")
        return list(req.prompt)

    def token_budget(self, n_prompt: int, requested: int | None) -> int:
        """max_new_tokens for a prompt of ``n_prompt`` tokens; 400 if it cannot fit the KV cache.

        The last sampled token is never fed back, so n_prompt + max_new - 1 positions are used.
        """
        limit = self.engine.backend.max_seq_len
        if n_prompt == 0:
            raise P.APIError(400, "the prompt is empty", param="messages")
        room = limit - n_prompt + 1
        if n_prompt <= limit and requested is None:
            return min(self.settings.max_tokens, room)
        if n_prompt > limit or requested > room:
            raise P.APIError(400, f"this model's context is {limit} tokens; the request has {n_prompt} prompt "
                                  f"tokens and asks for {requested if requested is not None else 'at least 1'} "
                                  "completion tokens", param="max_tokens", code="context_length_exceeded")
        return requested

    def sampling(self, req: P.ChatRequest | P.CompletionRequest) -> SamplingParams:
        d = self.settings.sampling
        pick = lambda value, default: default if value is None else value  # noqa: E731
        try:
            return SamplingParams(temperature=pick(req.temperature, d.temperature), top_k=pick(req.top_k, d.top_k),
                                  top_p=pick(req.top_p, d.top_p), seed=pick(req.seed, d.seed))
        except MobileMoEError as exc:
            raise P.APIError(400, str(exc)) from None

    def stop_ids(self, chat: bool) -> list[int]:
        given = self.settings.chat_stop_ids if chat else self.settings.text_stop_ids
        if given is not None:
            return given
        return self.chat.stop_ids if chat else self.chat.eos_ids

    # ---------------------------------------------------------------- running a job
    def start(self, req: P.ChatRequest | P.CompletionRequest) -> tuple[Job, asyncio.Queue, int]:
        """Check ``req`` and queue its job; returns the job, its event queue and the prompt length."""
        self.check_model(req.model)
        stops = req.stop_strings()
        sampling = self.sampling(req)
        ids = self.prompt_ids(req)
        budget = self.token_budget(len(ids), req.token_limit())
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def post(event: tuple[Any, ...]) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is closed (shutdown): nobody is listening
                pass

        job = Job(ids, budget, sampling, self.stop_ids(isinstance(req, P.ChatRequest)), stops,
                  time.monotonic() + self.settings.request_timeout_s, post)
        self.worker.submit(job)
        return job, events, len(ids)

    async def events(self, job: Job, events: asyncio.Queue, request: Request | None) -> AsyncIterator[tuple]:
        """The job's events until it is done; raises APIError (timeout, generation error).

        Leaving early (client gone, cancelled task, closed generator) cancels the job, so the
        worker stops it at the next token. ``request`` given: poll for a disconnected client (only
        where no one else reads the request's receive channel: streaming responses do).
        """
        try:
            while True:
                left = job.deadline - time.monotonic()
                if left <= 0:
                    raise P.APIError(504, f"the request took longer than {self.settings.request_timeout_s:g} s "
                                          "(the server's --request-timeout)", type="server_error",
                                     code="request_timeout")
                try:
                    event = await asyncio.wait_for(events.get(), min(left, _POLL_S))
                except asyncio.TimeoutError:
                    if request is not None and await request.is_disconnected():
                        return
                    continue
                if event[0] == "error":
                    raise event[1]
                yield event
                if event[0] == "done":
                    return
        finally:
            job.cancelled.set()  # no-op for a finished job; frees the worker from an abandoned one


def _error_response(exc: P.APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.code == "queue_full" else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def create_app(engine, chat_format, settings: ServeSettings) -> FastAPI:
    """The OpenAI-compatible app over ``engine`` (a :class:`mobilemoe.runtime.engine.Engine`) and
    ``chat_format`` (:func:`mobilemoe.data.chat_format.load_chat_format`)."""
    server = _Server(engine, chat_format, settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        server.worker.close()  # the worker thread ends after the job it is on

    app = FastAPI(title="mobilemoe", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(P.APIError)
    async def _api_error(_: Request, exc: P.APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:  # unknown route, wrong method
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(P.APIError(exc.status_code, str(exc.detail), type=kind))

    def model_card() -> dict[str, Any]:
        return {"id": settings.model_name, "object": "model", "created": server.created, "owned_by": "mobilemoe"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        server.check_model(name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(server, request, P.parse_request(await request.body(), P.ChatRequest), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(server, request, P.parse_request(await request.body(), P.CompletionRequest),
                               chat=False)

    return app


async def _complete(server: _Server, request: Request, req, chat: bool):
    job, events, n_prompt = server.start(req)
    rid, name = P.new_id("chatcmpl" if chat else "cmpl"), server.settings.model_name
    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return StreamingResponse(_sse(server, job, events, rid, name, n_prompt, chat, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    parts, finish, n_out = [], "length", 0
    async for event in server.events(job, events, request):
        if event[0] == "text":
            parts.append(event[1])
        else:
            _, finish, n_out = event
    use = P.usage(n_prompt, n_out)
    body = (P.chat_body if chat else P.completion_body)(rid, name, "".join(parts), finish, use)
    return JSONResponse(body)


async def _sse(server: _Server, job: Job, events: asyncio.Queue, rid: str, name: str, n_prompt: int,
               chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """The SSE body of a streamed completion."""
    if chat:  # OpenAI opens a chat stream with the role
        yield P.sse(P.chat_chunk(rid, name, {"role": "assistant", "content": ""}))
    try:
        async for event in server.events(job, events, None):
            if event[0] == "text":
                chunk = P.chat_chunk(rid, name, {"content": event[1]}) if chat else \
                    P.completion_chunk(rid, name, event[1])
                yield P.sse(chunk)
                continue
            _, finish, n_out = event
            yield P.sse(P.chat_chunk(rid, name, {}, finish) if chat else P.completion_chunk(rid, name, "", finish))
            if include_usage:
                use = P.usage(n_prompt, n_out)
                yield P.sse(P.chat_chunk(rid, name, None, use=use) if chat else
                            P.completion_chunk(rid, name, None, use=use))
    except P.APIError as exc:  # the status line is already sent: the error travels as an event
        yield P.sse(exc.body())
    yield P.sse("[DONE]")
