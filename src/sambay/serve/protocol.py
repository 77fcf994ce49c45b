"""Between the OpenAI wire format and the scheduler: requests → (prompt ids, SamplingParams), outputs → JSON.

`prepare_chat` / `prepare_completion` apply the chat template (or encode the raw prompt), check the
context and build `SamplingParams`; unset sampling fields take the server's defaults (the model card's,
as vLLM takes generation_config's). `ResponseBuilder` turns the scheduler's `Output`s of one request
into a whole response or into stream chunks. For chat, each choice's text goes through a
`ReasoningParser`: the `<think>` trace becomes ``reasoning_content``, the rest ``content``.
No I/O here, so the assembly is testable with hand-made outputs.

JSON has no NaN or Infinity (RFC 8259): a logprob that is not finite goes out as -9999.0, the floor vLLM
gives -inf (a token masked by top-k / top-p), and `json_text` writes every response and chunk, replacing
any non-finite number that slipped through rather than sending what clients cannot parse.

`check_prompt_length` refuses a prompt whose characters alone prove it too long, before the tokenizer
spends seconds on megabytes of text.

Reasoning budgets and grammars (`structured_fields`): a chat completion is a reasoning request (its reply
opens the model's ``<think>`` block, after which a grammar starts); a completion's prompt is raw text, so
its grammar applies from the first token and a reasoning budget is refused. A grammar is compiled and
checked here, so an invalid schema, an unsupported ``response_format`` type or a regex nothing satisfies
is a 400 before the request is queued.
"""

from __future__ import annotations

import functools
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _json_str  # a str as JSON, non-ASCII kept (as ensure_ascii=False)

from sambay.generate import SamplingParams, TokenLogprob
from sambay.generate.guided import GuidedDecoding, grammar_compiler
from sambay.generate.requests import Output
from sambay.serve import schemas
from sambay.serve.errors import APIError
from sambay.text.reasoning import ReasoningParser
from sambay.tokenizer import Tokenizer


@dataclass(frozen=True)
class Prepared:
    """A request ready for `EngineCore.submit`."""

    prompt: list[int]
    params: SamplingParams


def check_prompt_length(req: schemas.ChatCompletionRequest | schemas.CompletionRequest, max_length: int,
                        max_token_chars: int) -> None:
    """Refuse (413) a text prompt that cannot fit the context, without tokenizing it.

    A token covers at most ``max_token_chars`` characters (the longest token's bytes: a character takes at
    least one), so a text of more than ``(max_length - 1) * max_token_chars`` characters makes at least
    ``max_length`` tokens, leaving no room to generate. For chat, the bound counts each message's content
    without the whitespace at its ends (a marker with ``rstrip`` swallows whitespace after it): a chat
    template writes every message's content and adds its own text (this model's does), so the prompt is
    at least that long. Costs a string length per message (a join of content parts), not a tokenization.
    """
    if isinstance(req, schemas.CompletionRequest):
        chars = len(req.prompt) if isinstance(req.prompt, str) else 0
    else:
        chars = sum(len(m.text().strip()) for m in req.messages)
    if chars > (max_length - 1) * max_token_chars:
        raise APIError(413, f"the prompt has {chars} characters, more than any text of {max_length} tokens (this "
                       f"server's context, prompt + completion) can hold", param="messages",
                       code="context_length_exceeded")


def prepare_chat(req: schemas.ChatCompletionRequest, tokenizer: Tokenizer, max_length: int,
                 defaults: SamplingParams) -> Prepared:
    """Chat template → prompt ids; the request's sampling fields → `SamplingParams`."""
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    try:
        prompt = tokenizer.apply_chat_template(messages)
    except ValueError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    return Prepared(prompt, _params(req, len(prompt), max_length, defaults, logprobs,
                                    req.max_completion_tokens or req.max_tokens,
                                    structured_fields(req, tokenizer, chat=True)))


def prepare_completion(req: schemas.CompletionRequest, tokenizer: Tokenizer, max_length: int,
                       defaults: SamplingParams) -> Prepared:
    """Raw prompt (text, or token ids) → prompt ids; sampling fields → `SamplingParams`."""
    if isinstance(req.prompt, str):
        prompt = tokenizer.encode(req.prompt)
    else:
        prompt = list(req.prompt)
        if not all(0 <= i < tokenizer.vocab_size for i in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    return Prepared(prompt, _params(req, len(prompt), max_length, defaults, req.logprobs, req.max_tokens,
                                    structured_fields(req, tokenizer, chat=False)))


def structured_fields(req: schemas._Request, tokenizer: Tokenizer, *, chat: bool) -> dict:
    """The `SamplingParams` fields of the request's reasoning budget and grammar (the grammar checked)."""
    budget = req.max_reasoning_tokens
    if req.reasoning_effort is not None:
        if budget is not None:
            raise APIError(400, "give max_reasoning_tokens or reasoning_effort, not both", param="reasoning_effort")
        budget = schemas.REASONING_EFFORT_BUDGETS[req.reasoning_effort]
    if budget is not None and not chat:
        raise APIError(400, "a reasoning budget applies to chat completions, whose reply opens the <think> block; "
                       "a completion's prompt is raw text", param="max_reasoning_tokens")
    guided = _guided(req)
    if guided is not None:
        try:
            grammar_compiler(tokenizer).check(guided)
        except ValueError as e:
            raise APIError(400, str(e), param=_GUIDED_PARAM[guided.kind]) from None
    return {"reasoning": chat, "max_reasoning_tokens": budget, "guided": guided}


_GUIDED_PARAM = {"json_schema": "response_format", "json_object": "response_format", "regex": "guided_regex",
                 "choice": "guided_choice"}
_FORMATS = ("text", "json_object", "json_schema")


def _guided(req: schemas._Request) -> GuidedDecoding | None:
    """The request's grammar: at most one of response_format (json_object, json_schema), guided_choice and
    guided_regex."""
    fmt = req.response_format
    if fmt is not None and fmt.type not in _FORMATS:
        raise APIError(400, f"response_format type {fmt.type!r} is not supported; use one of "
                       f"{', '.join(_FORMATS)}", param="response_format.type")
    given = [g for g in (fmt is not None and fmt.type != "text", req.guided_choice is not None,
                         req.guided_regex is not None) if g]
    if len(given) > 1:
        raise APIError(400, "give at most one of response_format (json_object, json_schema), guided_choice, "
                       "guided_regex", param="response_format")
    try:
        if req.guided_choice is not None:
            return GuidedDecoding(choice=tuple(req.guided_choice))
        if req.guided_regex is not None:
            return GuidedDecoding(regex=req.guided_regex)
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return GuidedDecoding(json_object=True)
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(400, 'response_format json_schema needs {"json_schema": {"schema": {...}}}',
                           param="response_format.json_schema")
        return GuidedDecoding.from_schema(fmt.json_schema.schema_)
    except ValueError as e:
        raise APIError(400, str(e), param="guided_choice" if req.guided_choice is not None else None) from None


def _params(req: schemas._Request, prompt_tokens: int, max_length: int, defaults: SamplingParams,
            logprobs: int | None, max_tokens: int | None, structured: dict) -> SamplingParams:
    room = max_length - prompt_tokens
    if room < 1:
        raise APIError(413, f"the prompt has {prompt_tokens} tokens; this server's context is {max_length} "
                       "tokens (prompt + completion)", param="messages", code="context_length_exceeded")
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"max_tokens = {max_tokens} plus the prompt's {prompt_tokens} tokens exceeds the "
                       f"context of {max_length} tokens", param="max_tokens", code="context_length_exceeded")
    given = {name: getattr(req, name) for name in ("temperature", "top_p", "min_p", "repetition_penalty")
             if getattr(req, name) is not None}
    if req.top_k is not None:
        given["top_k"] = max(req.top_k, 0)
    try:
        return defaults.replace(**given, presence_penalty=req.presence_penalty,
                                frequency_penalty=req.frequency_penalty, stop=tuple(req.stop or ()), seed=req.seed,
                                n=req.n, logprobs=logprobs, max_new_tokens=max_tokens or room, **structured)
    except ValueError as e:
        raise APIError(400, str(e)) from None


@dataclass
class _Choice:
    """One sample's text so far."""

    parser: ReasoningParser | None
    content: str = ""
    reasoning: str = ""
    tokens: int = 0
    reasoning_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def feed(self, text: str, finished: bool) -> tuple[str, str]:
        """Account for a text delta; returns the (reasoning, content) it releases."""
        if self.parser is None:
            self.content += text
            return "", text
        parts = [self.parser.feed(text)] + ([self.parser.finish()] if finished else [])
        reasoning, content = "".join(p.reasoning for p in parts), "".join(p.content for p in parts)
        self.reasoning, self.content = self.reasoning + reasoning, self.content + content
        return reasoning, content


class ResponseBuilder:
    """Assembles one request's outputs into a response (`response`) or SSE chunks (`chunks`).

    Args:
        chat: chat.completion (reasoning split, message logprobs) or text_completion.
        model: the model name to report.
        n: samples.
        prompt_tokens: for usage.
        tokenizer: renders logprob tokens.
    """

    def __init__(self, *, chat: bool, model: str, n: int, prompt_tokens: int, tokenizer: Tokenizer):
        self.chat, self.model, self.prompt_tokens, self.tokenizer = chat, model, prompt_tokens, tokenizer
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.choices = [_Choice(ReasoningParser() if chat else None) for _ in range(n)]

    @property
    def usage(self) -> dict:
        completion = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion,
                "completion_tokens_details": {"reasoning_tokens": sum(c.reasoning_tokens for c in self.choices)}}

    def add(self, output: Output) -> list[dict]:
        """Account for one output; returns the stream chunks it makes (one per advanced choice)."""
        chunks = []
        for d in output.deltas:
            reasoning, content = self._advance(d)
            logprobs = None if d.logprob is None else self._logprobs([d.logprob])
            chunks.append(self._chunk(d.sample_index, reasoning, content, logprobs, d.finish_reason))
        return chunks

    def events(self, output: Output) -> str:
        """As `add`, rendered as SSE events: the text ``data: <chunk JSON>\\n\\n`` per chunk.

        The hot path of a stream (one call per token per request). A chunk without logprobs is written
        from a per-request JSON prefix, encoding only the delta text (C-accelerated), instead of building
        and serialising a dict: the same bytes as ``json.dumps(chunk, ensure_ascii=False)``, at a third of
        the cost (tested)."""
        events = []
        for d in output.deltas:
            if d.logprob is not None:
                events += [sse_event(chunk) for chunk in self.add(Output((d,), time=output.time))]
                continue
            reasoning, content = self._advance(d)
            finish = "null" if d.finish_reason is None else _json_str(d.finish_reason)
            if not self.chat:
                body = f'"text": {_json_str(content)}'
            else:
                parts = ([f'"content": {_json_str(content)}'] if content else []) + (
                    [f'"reasoning_content": {_json_str(reasoning)}'] if reasoning else [])
                body = f'"delta": {{{", ".join(parts)}}}'
            tail = f'"logprobs": null, "finish_reason": {finish}}}]}}\n\n'
            events.append(f"{self._prefix}{d.sample_index}, {body}, {tail}")
        return "".join(events)

    @functools.cached_property
    def _prefix(self) -> str:
        """``data: {"id": ..., "choices": [{"index": `` of this request's chunks."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return (f'data: {{"id": {_json_str(self.id)}, "object": "{kind}", "created": {self.created}, '
                f'"model": {_json_str(self.model)}, "choices": [{{"index": ')

    def _advance(self, d) -> tuple[str, str]:
        """Account for one sample's delta; returns the (reasoning, content) text it releases."""
        choice = self.choices[d.sample_index]
        choice.tokens += 1
        choice.finish_reason = d.finish_reason
        if d.reasoning_tokens is not None:
            choice.reasoning_tokens = d.reasoning_tokens
        if d.logprob is not None:
            choice.logprobs.append(d.logprob)
        return choice.feed(d.text, d.finish_reason is not None)

    def first_chunks(self) -> list[dict]:
        """Chat streams open each choice with the assistant role (as OpenAI); completions have none."""
        if not self.chat:
            return []
        return [self._envelope([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]) for i in range(len(self.choices))]

    def usage_chunk(self) -> dict:
        """The last chunk of a stream with ``include_usage``: no choices, the usage."""
        return {**self._envelope([]), "usage": self.usage}

    def response(self) -> dict:
        """The whole (non-streaming) response."""
        choices = []
        for i, c in enumerate(self.choices):
            logprobs = self._logprobs(c.logprobs) if c.logprobs else None
            if self.chat:
                message = {"role": "assistant", "content": c.content, "reasoning_content": c.reasoning or None}
                choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": c.finish_reason})
            else:
                choices.append({"index": i, "text": c.content, "logprobs": logprobs, "finish_reason": c.finish_reason})
        kind = schemas.ChatCompletion if self.chat else schemas.Completion
        return kind(id=self.id, created=self.created, model=self.model, choices=choices,
                    usage=self.usage).model_dump(exclude_none=False)

    def _envelope(self, choices: list[dict]) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def _chunk(self, index: int, reasoning: str, content: str, logprobs: dict | None, finish: str | None) -> dict:
        if not self.chat:
            return self._envelope([{"index": index, "text": content, "logprobs": logprobs, "finish_reason": finish}])
        delta = {}
        if content:
            delta["content"] = content
        if reasoning:
            delta["reasoning_content"] = reasoning
        return self._envelope([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])

    def _logprobs(self, items: list[TokenLogprob]) -> dict:
        if self.chat:
            return {"content": [{**self._token(t.token_id, t.logprob),
                                 "top_logprobs": [self._token(i, lp) for i, lp in t.top]} for t in items]}
        tokens = [self._token(t.token_id, t.logprob)["token"] for t in items]
        offsets = [0]
        for token in tokens[:-1]:
            offsets.append(offsets[-1] + len(token))
        return {"tokens": tokens, "token_logprobs": [finite_logprob(t.logprob) for t in items],
                "top_logprobs": [{self._token(i, lp)["token"]: finite_logprob(lp) for i, lp in t.top} for t in items],
                "text_offset": offsets}

    def _token(self, token_id: int, logprob: float) -> dict:
        data = self.tokenizer.token_bytes(token_id) if token_id < self.tokenizer.vocab_size else b""
        return {"token": data.decode("utf-8", errors="replace"), "logprob": finite_logprob(logprob),
                "bytes": list(data)}


LOGPROB_FLOOR = -9999.0  # what -inf becomes on the wire (vLLM's and other OpenAI-compatible servers' value)


def finite_logprob(logprob: float) -> float:
    """A logprob as JSON can carry it: -inf (a masked token) and NaN become `LOGPROB_FLOOR`, +inf 0."""
    if math.isfinite(logprob):
        return max(logprob, LOGPROB_FLOOR)
    return 0.0 if logprob > 0 else LOGPROB_FLOOR


def json_text(data) -> str:
    """``data`` as JSON (non-ASCII kept), never with NaN or Infinity: `json.dumps` refuses them, and only
    then are the non-finite numbers replaced (`finite_logprob`), so the common case costs one dump."""
    try:
        return json.dumps(data, ensure_ascii=False, allow_nan=False)
    except ValueError:  # a non-finite float
        return json.dumps(_finite(data), ensure_ascii=False, allow_nan=False)


def _finite(data):
    if isinstance(data, float):
        return finite_logprob(data) if not math.isfinite(data) else data
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    return data


def sse_event(data: dict) -> str:
    """One Server-Sent Event carrying ``data`` as JSON."""
    return f"data: {json_text(data)}\n\n"
