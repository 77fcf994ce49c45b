"""OpenAI-compatible request and response types (pydantic), for /v1/chat/completions, /v1/completions, /v1/models.

Requests are validated here: types, ranges and required fields (a violation becomes a 422 in OpenAI's
error format, see `sambay.serve.errors`). Unknown request fields are ignored, as OpenAI-compatible
servers do, so clients that send optional fields we do not implement (``user``, ...) still work.
Responses follow the OpenAI wire format; the reasoning trace travels in ``reasoning_content`` (the field
name vLLM and DeepSeek use), next to ``content``. ``model`` may be omitted: a server serves one model.

Extensions beyond OpenAI's parameters: ``top_k`` (-1 or 0 = off), ``min_p``, ``repetition_penalty``, and
vLLM's ``guided_choice`` / ``guided_regex``.

Reasoning and structured outputs (`sambay.generate.constraints`): ``max_reasoning_tokens`` bounds the
``<think>`` block of a chat completion (0 skips it); OpenAI's ``reasoning_effort`` names a budget:
``low`` = 1,024, ``medium`` = 4,096, ``high`` = 16,384 tokens (`REASONING_EFFORT_BUDGETS`). ``response_format``
``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"schema": {...}}}``, ``guided_choice``
and ``guided_regex`` constrain the answer (after the reasoning, for chat). Usage reports
``completion_tokens_details.reasoning_tokens`` in every response.

Numeric domain (`sambay.generate.sampling` gives the reasons): every number finite (``NaN``, ``Infinity``
and ``1e999`` are refused, though Python's JSON parser reads them); ``temperature`` in [0, 2], greedy
below 1e-5; ``repetition_penalty`` in [0.01, 10]; presence and frequency penalties in [-2, 2]. Each
field's description states its bounds; a value outside them is a 422 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sambay.generate.sampling import GREEDY_TEMPERATURE, PRESENCE_PENALTY_RANGE, REPETITION_PENALTY_RANGE

_Penalty = Annotated[float, Field(ge=PRESENCE_PENALTY_RANGE[0], le=PRESENCE_PENALTY_RANGE[1])]


# reasoning_effort → max_reasoning_tokens. This model's traces run to a few thousand tokens on competition
# math (the model card's examples allow 32K): low keeps a short check, medium most traces, high all but the longest.
REASONING_EFFORT_BUDGETS = {"low": 1024, "medium": 4096, "high": 16384}


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    """OpenAI's ``response_format.json_schema``: the schema under ``schema`` (``name`` and ``strict`` are read
    and ignored: the schema is always enforced)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``{"type": "text" | "json_object" | "json_schema", "json_schema": ...}``; another type is a 400 naming
    the supported ones (checked by `sambay.serve.protocol`, not here, so the message can say what to send)."""

    model_config = ConfigDict(extra="ignore")

    type: str
    json_schema: JSONSchemaFormat | None = None


class _Request(BaseModel):
    """Sampling fields shared by both completion endpoints."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None  # None: the one model this server serves (as vLLM)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description=(
        f"In [0, 2]; below {GREEDY_TEMPERATURE:g} (0 included) decoding is greedy."))
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus mass in (0, 1]; 1 = off.")
    top_k: int | None = Field(None, ge=-1, description="Keep the k most likely tokens; -1 or 0 = off.")
    min_p: float | None = Field(None, ge=0, le=1, description="In [0, 1]; 0 = off.")
    presence_penalty: _Penalty = Field(0.0, description="In [-2, 2]; 0 = off.")
    frequency_penalty: _Penalty = Field(0.0, description="In [-2, 2]; 0 = off.")
    repetition_penalty: float | None = Field(
        None, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1],
        description=f"In [{REPETITION_PENALTY_RANGE[0]:g}, {REPETITION_PENALTY_RANGE[1]:g}]; 1 = off.")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**62)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    guided_choice: list[str] | None = Field(None, min_length=1, description="The answer is one of these strings.")
    guided_regex: str | None = Field(None, description="The answer matches this regular expression.")
    max_reasoning_tokens: int | None = Field(None, ge=0, description="Tokens inside <think> (chat); 0 skips it.")
    reasoning_effort: Literal["low", "medium", "high"] | None = Field(None, description=(
        "A reasoning budget: " + ", ".join(f"{k} = {v}" for k, v in REASONING_EFFORT_BUDGETS.items()) + " tokens."))

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 8 or not all(stops):
            raise ValueError("stop must be a non-empty string or a list of at most 8 non-empty strings")
        return stops


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of a conversation; ``content`` may be OpenAI's list of text parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Request):
    prompt: str | list[int] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: Literal[False] = False  # echoing the prompt is not supported


# responses ---------------------------------------------------------------------------------------


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0  # tokens inside <think>, tags excluded


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobInfo(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobInfo]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(BaseModel):
    """Both the response and, with ``object="text_completion"`` too, each streamed chunk (as OpenAI)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sambay"
    max_model_len: int
    parent: str | None = None  # a LoRA adapter's base model (as vLLM lists adapters); None for the base


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody

    @staticmethod
    def of(message: str, type: str, param: str | None = None, code: Any = None) -> dict:
        return ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code)).model_dump()
