"""The OpenAI-compatible HTTP API over one model: /v1/models, /v1/completions,
/v1/chat/completions (streamed as server-sent events when asked), /health and /metrics.

One generation runs at a time on the model (see worker.Engine); requests wait their turn in a
bounded FIFO queue. The server maps requests to SpeculativeGenerator calls and streams each
verification step's committed tokens; the decoding itself is the library's."""
from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from ..compat import chat_template_ids
from ..generator import methods as all_methods
from .errors import APIError, bad_request, install_handlers
from .formats import Reply
from .metrics import CONTENT_TYPE, Metrics
from .stream import DONE, sse
from .validation import GenerationRequest, parse_body, parse_chat, parse_completion
from .worker import ClientGone, Engine, Failed, Finished, Job, TextPiece

__all__ = ["create_app"]

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
DEFAULT_CHAT_TOKENS_NO_LIMIT = 1024  # chat's default (the rest of the context) for a model that names no limit
CLIENT_CLOSED = 499  # nginx's status for "the client closed the request": what the request log records


def create_app(lm: Any, method: str = "auto", options: dict[str, Any] | None = None, *, api_key: str | None = None,
               queue_size: int = 16, model_name: str | None = None) -> FastAPI:
    """An ASGI app serving `lm` (a LoadedModel: it needs its tokenizer) with `method` and its
    `options` (those of SpeculativeGenerator) as the default; a request picks another with
    `"verispec": {"method": ..., "options": {...}}`. One generation at a time; at most
    `queue_size` requests wait, more get a 503. With `api_key`, every route but /health needs
    `Authorization: Bearer <api_key>`. The model's id in the API is `model_name` (default lm.name).
    Run it with uvicorn (`verispec serve` does)."""
    if getattr(lm, "tokenizer", None) is None:
        raise ValueError(f"model {getattr(lm, 'name', '?')!r} has no tokenizer; the server needs one to turn text "
                         "into token ids")
    metrics = Metrics()
    engine = Engine(lm, method, options, queue_size, metrics)
    api = _API(lm, engine, model_name or str(lm.name))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()

    # no /docs or /openapi.json: they would be unauthenticated routes, and the API is OpenAI's
    app = FastAPI(title="verispec", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics = engine, metrics
    install_handlers(app)
    app.add_middleware(_RequestCounter, metrics=metrics)
    app.add_api_route("/health", _health, methods=["GET"])
    router = APIRouter(dependencies=[Depends(_require_key(api_key))])
    router.add_api_route("/metrics", api.metrics, methods=["GET"])
    router.add_api_route("/v1/models", api.list_models, methods=["GET"])
    router.add_api_route("/v1/models/{model_id:path}", api.get_model, methods=["GET"])
    router.add_api_route("/v1/completions", api.completions, methods=["POST"])
    router.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])
    app.include_router(router)
    return app


async def _health() -> dict[str, str]:
    return {"status": "ok"}


def _require_key(api_key: str | None):
    """The dependency that checks `Authorization: Bearer <key>` (a no-op without a key)."""
    async def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "You didn't provide an API key: send it as the header 'Authorization: Bearer KEY'",
                           None, "invalid_api_key")
        # compare_digest: the time taken does not tell how much of a guess was right
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided", None, "invalid_api_key")
    return check


class _RequestCounter:
    """ASGI middleware: counts every HTTP request by route template and response status. Plain
    ASGI, not BaseHTTPMiddleware, so streamed responses and disconnects pass through untouched."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # what an exception that escapes everything becomes

        async def record_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = scope.get("route")  # set by the router on a match; unmatched paths share one label
            self.metrics.count_request(getattr(route, "path", "unmatched"), status)


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is read already: the next message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _API:
    """The routes that touch the model."""

    def __init__(self, lm: Any, engine: Engine, model_id: str):
        self.lm, self.engine, self.model_id = lm, engine, model_id
        self.methods = all_methods()
        self.created = int(time.time())
        self.context = getattr(lm.model.config, "max_position_embeddings", None)
        self.vocab = int(lm.model.config.vocab_size)
        self.chat_template = bool(getattr(lm.tokenizer, "chat_template", None))

    async def metrics(self) -> Response:
        page = self.engine.metrics.render(self.engine.queue_depth, self.engine.busy)
        return Response(page, media_type=CONTENT_TYPE)

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "verispec"}

    async def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card()]}

    async def get_model(self, model_id: str) -> dict[str, Any]:
        self._check_model(model_id)
        return self._model_card()

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    # --- one generation request: check, encode, queue, then answer whole or as a stream

    async def _generate(self, request: Request, chat: bool) -> Response:
        body = parse_body(await request.body())
        req = (parse_chat if chat else parse_completion)(body, self.methods)
        self._check_model(req.model)
        prompt_ids = self._encode_messages(req.messages) if chat else self._encode_prompt(req.prompt)
        max_tokens = self._max_tokens(len(prompt_ids), req, chat)
        job = Job(prompt_ids, replace(req.sampling, max_tokens=max_tokens), req.stop, req.choice,
                  asyncio.get_running_loop())
        self.engine.submit(job)
        reply = Reply(chat, self.model_id)
        gone = asyncio.ensure_future(_disconnected(request))
        streaming = False
        try:
            event = await job.next_event(gone)  # Started once the worker takes it, or Failed
            if isinstance(event, Failed):
                raise event.error
            if req.stream:
                streaming = True  # from here the stream owns the job (and cancels it when it ends)
                return StreamingResponse(self._events(job, reply, req.include_usage), media_type="text/event-stream",
                                         background=BackgroundTask(self.engine.cancel, job))
            return JSONResponse(await self._collect(job, reply, gone))
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        finally:
            gone.cancel()  # the stream's own disconnect listener takes over from here
            if not streaming:
                self.engine.cancel(job)  # a no-op once it finished; else stops it

    async def _collect(self, job: Job, reply: Reply, gone: asyncio.Future) -> dict[str, Any]:
        pieces = []
        while True:
            event = await job.next_event(gone)
            if isinstance(event, TextPiece):
                pieces.append(event.text)
            elif isinstance(event, Finished):
                return reply.whole("".join(pieces), event.finish_reason, event.usage())
            elif isinstance(event, Failed):
                raise event.error

    async def _events(self, job: Job, reply: Reply, include_usage: bool):
        """The server-sent events of one streamed response, one chunk per verification step."""
        try:
            opener = reply.first_chunk(include_usage)
            if opener is not None:
                yield sse(opener)
            while True:
                event = await job.next_event()
                if isinstance(event, TextPiece):
                    yield sse(reply.text_chunk(event.text, include_usage))
                elif isinstance(event, Finished):
                    yield sse(reply.final_chunk(event.finish_reason, include_usage))
                    if include_usage:
                        yield sse(reply.usage_chunk(event.usage()))
                    break
                elif isinstance(event, Failed):  # headers are sent: the error goes in the stream
                    yield sse(event.error.body())
                    break
            yield DONE
        finally:
            # reached on a client disconnect too (Starlette cancels the stream): stop the generation
            self.engine.cancel(job)

    # --- checks and encoding

    def _check_model(self, model: str) -> None:
        if model != self.model_id:
            raise APIError(404, f"The model {model!r} does not exist; this server serves {self.model_id!r}",
                           "model", "model_not_found")

    def _encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.lm.encode(prompt)
        bad = next((t for t in prompt if not 0 <= t < self.vocab), None)
        if bad is not None:
            raise bad_request(f"prompt token ids must be in [0, {self.vocab}), got {bad}", "prompt")
        return prompt

    def _encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        if not self.chat_template:
            raise bad_request(f"model {self.model_id!r} has no chat template; send a prompt to /v1/completions",
                              "messages", "no_chat_template")
        try:
            return chat_template_ids(self.lm.tokenizer, messages)
        except Exception as err:  # the template's own checks (roles that must alternate, ...)
            raise bad_request(f"the model's chat template rejected the messages: {err}", "messages") from None

    def _max_tokens(self, prompt_len: int, req: GenerationRequest, chat: bool) -> int:
        """The request's max_tokens, or the endpoint's default, checked against the context."""
        where = "messages" if chat else "prompt"
        requested = req.sampling.max_tokens
        if self.context is None:
            return requested or (DEFAULT_CHAT_TOKENS_NO_LIMIT if chat else DEFAULT_COMPLETION_TOKENS)
        if prompt_len >= self.context:
            raise bad_request(f"This model's maximum context length is {self.context} tokens, and the {where} alone "
                              f"is {prompt_len} tokens; shorten it", where, "context_length_exceeded")
        if requested is None:  # OpenAI's defaults: 16 for completions, the rest of the context for chat
            return self.context - prompt_len if chat else min(DEFAULT_COMPLETION_TOKENS, self.context - prompt_len)
        if prompt_len + requested > self.context:
            raise bad_request(f"This model's maximum context length is {self.context} tokens. However, you requested "
                              f"{prompt_len + requested} tokens ({prompt_len} in the {where}, {requested} for the "
                              "completion). Reduce the length of the prompt or max_tokens.",
                              "max_tokens", "context_length_exceeded")
        return requested
