"""The OpenAI-compatible HTTP API over the continuous-batching scheduler (FastAPI).

    GET  /health                 200 {"status": "ok"}; 503 while shutting down
    GET  /metrics                Prometheus text (`sambay.serve.metrics`)
    GET  /v1/models              the served model and its LoRA adapters (``sambay serve --lora NAME=DIR``)
    POST /v1/completions         raw-text completion, streaming (SSE) or not
    POST /v1/chat/completions    chat completion; the <think> trace in ``reasoning_content``

Routes only map HTTP to the runtime: `protocol` prepares requests and assembles responses, `runtime`
submits and streams, `errors` answers every failure in OpenAI's format. A request body is read as JSON
whatever its Content-Type (as OpenAI's and vLLM's servers do: ``curl -d`` sends form-urlencoded), and
``model`` may be omitted: it defaults to the base model. A request whose ``model`` names a LoRA adapter
runs with it, batched with requests of other adapters and of the base; an unknown name is a 404. Streams
are Server-Sent Events, ``data: {json}\\n\\n`` per chunk, ending with ``data: [DONE]\\n\\n``; a request
aborted by shutdown ends its stream with an error event. With ``api_key`` set, /v1 routes need
``Authorization: Bearer KEY`` (the scheme in any case, RFC 7235; the key compared in constant time); a
refusal is a 401 with ``WWW-Authenticate: Bearer``.

Before any work on a request: a string holding a lone UTF-16 surrogate (``"\\ud800"``, valid JSON but
not Unicode text), in any field, is a 400 naming the field; a text prompt whose length alone rules it
out is a 413 (`protocol.check_prompt_length`). Responses are counted in /metrics by route template, and
every path no route matches shares one label, ``unmatched``: labels by raw path grew without bound.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from sambay.serve import schemas
from sambay.serve.errors import APIError, install_handlers
from sambay.serve.protocol import (
    Prepared,
    ResponseBuilder,
    check_prompt_length,
    json_text,
    prepare_chat,
    prepare_completion,
    sse_event,
)
from sambay.serve.runtime import Runtime

_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def _json_body(schema: type[BaseModel]):
    """A dependency: the request body parsed as JSON whatever its Content-Type, then validated as ``schema``.

    FastAPI's own body parameter reads JSON only under ``application/json`` and reports anything else as
    "not a JSON object", which turned away clients that send JSON under another type (``curl -d``)."""

    async def parse(http: HTTPRequest) -> BaseModel:
        raw = await http.body()
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, bytes that are not UTF-8, deep nesting
            raise APIError(400, f"the request body must be a JSON object; it is not valid JSON ({e})",
                           code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, f"the request body must be a JSON object, got {_JSON_TYPES[type(data)]}",
                           code="invalid_json")
        if (where := _lone_surrogate(data)) is not None:
            raise APIError(400, f"{where}: a string holds a lone UTF-16 surrogate (such as \\ud800), which is not "
                           "Unicode text; send valid text", param=where, code="invalid_unicode")
        try:
            return schema.model_validate(data)
        except ValidationError as e:  # answered as a 422 naming the field, by `errors`
            raise RequestValidationError(e.errors(include_url=False)) from None

    return parse


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(data: dict) -> str | None:
    """The dotted path (``messages.0.content``) of the first string, key or value, that holds a lone surrogate.

    `json.loads` makes one from a ``\\ud800`` escape without its pair, or from the UTF-8-like bytes of one
    (it decodes with ``surrogatepass``); such a string cannot be encoded as UTF-8, so the tokenizer or the
    response would fail later. Iterative: the body may nest as deep as the parser allows."""
    stack: list[tuple[tuple[str, ...], object]] = [((), data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and _SURROGATE.search(value):
                return ".".join(path) or "body"
        elif isinstance(value, dict):
            for key, item in value.items():
                if not key.isascii() and _SURROGATE.search(key):
                    return ".".join((*path, ascii(key)))
                stack.append(((*path, key), item))
        elif isinstance(value, list):
            stack.extend(((*path, str(i)), item) for i, item in enumerate(value))
    return None


ChatBody = Annotated[schemas.ChatCompletionRequest, Depends(_json_body(schemas.ChatCompletionRequest))]
CompletionBody = Annotated[schemas.CompletionRequest, Depends(_json_body(schemas.CompletionRequest))]


def create_app(runtime: Runtime) -> FastAPI:
    """The FastAPI application serving ``runtime``."""
    app = FastAPI(title="sambay", docs_url=None, redoc_url=None)
    install_handlers(app)
    app.state.runtime = runtime

    app.add_middleware(_CountResponses, counter=runtime.metrics.http)

    def authorize(request: HTTPRequest) -> None:
        if runtime.api_key is not None and not _is_authorized(request.headers.get("authorization", ""),
                                                               runtime.api_key):
            raise APIError(401, "missing or invalid API key (Authorization: Bearer KEY)", code="invalid_api_key")

    @app.get("/health")
    async def health() -> JSONResponse:
        if runtime.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok", **runtime.scheduler.stats()})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(runtime.metrics.render(), media_type=runtime.metrics.content_type)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        base = runtime.model_name
        cards = [schemas.ModelCard(id=name, created=0, max_model_len=runtime.max_length,
                                   parent=None if name == base else base) for name in (base, *runtime.adapters)]
        return schemas.ModelList(data=cards).model_dump()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(body: ChatBody, http: HTTPRequest):
        adapter = _check_model(runtime, body)
        check_prompt_length(body, runtime.max_length, runtime.max_token_chars)
        prepared = await run_in_threadpool(prepare_chat, body, runtime.tokenizer, runtime.max_length,
                                           runtime.defaults)
        return await _complete(runtime, body, prepared, http, chat=True, adapter=adapter)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionBody, http: HTTPRequest):
        adapter = _check_model(runtime, body)
        check_prompt_length(body, runtime.max_length, runtime.max_token_chars)
        prepared = await run_in_threadpool(prepare_completion, body, runtime.tokenizer, runtime.max_length,
                                           runtime.defaults)
        return await _complete(runtime, body, prepared, http, chat=False, adapter=adapter)

    return app


def _is_authorized(header: str, api_key: str) -> bool:
    """Whether an Authorization header is ``Bearer <api_key>``: the scheme in any case (RFC 7235 section
    2.1), then one or more spaces; the key compared in constant time."""
    scheme, _, credentials = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), api_key.encode())


def _check_model(runtime: Runtime, body: schemas._Request) -> int:
    """The LoRA adapter slot the request's model names (0: the base model); an omitted model is the base (as
    vLLM), an unknown one a 404."""
    return 0 if body.model is None else runtime.check_model(body.model)


class _CountResponses:
    """Counts responses by route and status. Plain ASGI: Starlette's ``@app.middleware("http")`` would pass
    every chunk of every stream through an extra channel and task, a cost paid per generated token.

    The label is the matched route's template (the router puts the route in the scope); a path no route
    matches is ``unmatched``. Raw paths made one time series per distinct URL: 30,000 random paths grew
    /metrics to 60 MB, and each scrape then blocked the event loop for most of a second."""

    def __init__(self, app, counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                route = scope.get("route")
                path = getattr(route, "path", None) or "unmatched"
                self.counter.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


async def _complete(runtime: Runtime, body: schemas._Request, prepared: Prepared, http: HTTPRequest, *, chat: bool,
                    adapter: int = 0):
    """Submit; answer with a stream of chunks or, once finished, the whole response."""
    request, stream = runtime.submit(prepared, adapter)
    model = runtime.adapters[adapter - 1] if adapter else runtime.model_name
    builder = ResponseBuilder(chat=chat, model=model, n=prepared.params.n,
                              prompt_tokens=len(prepared.prompt), tokenizer=runtime.tokenizer)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = _sse(builder, runtime.batches(request, stream), include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    async for output in runtime.outputs(request, stream, http):
        if output.error:
            raise APIError(503, output.error, code="aborted")
        builder.add(output)
    return Response(json_text(builder.response()), media_type="application/json")


async def _sse(builder: ResponseBuilder, batches: AsyncIterator, include_usage: bool) -> AsyncIterator[str]:
    """The events of a stream; the chunks of the outputs that arrived together go out in one write."""
    yield "".join(sse_event(chunk) for chunk in builder.first_chunks())
    async for batch in batches:
        events = []
        for output in batch:
            if output.error:
                events.append(sse_event(schemas.ErrorResponse.of(output.error, "server_error", code="aborted")))
                yield "".join(events)
                yield "data: [DONE]\n\n"
                return
            events.append(builder.events(output))
        if events:
            yield "".join(events)
    if include_usage:
        yield sse_event(builder.usage_chunk())
    yield "data: [DONE]\n\n"
