"""The server's streams through the official `openai` client and through the load generator's SSE parser.

Text holding U+2028, U+2029 or U+0085 (which the server writes unescaped, as ``ensure_ascii=False`` does)
cannot be forced out of the random test model, so those streams are the server's own serialisation
(`ResponseBuilder` and the app's event writer) of hand-made outputs, served through an httpx mock
transport in chunks that cut characters and lines. The live server's streams are compared as well: the
chunks `sse_data` reads from the raw bytes are those the `openai` client yields.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from sambay.generate import SequenceDelta
from sambay.generate.requests import Output
from sambay.serve.app import _sse
from sambay.serve.loadgen import SSEDecoder, sse_data
from sambay.serve.protocol import ResponseBuilder
from tests.serve.conftest import MODEL

PIECES = ["line\u2028", "para\u2029", "next\u0085", "end é", "😀 done"]
CHAT = [{"role": "user", "content": "Say something."}]


def server_stream(engine, *, chat: bool) -> bytes:
    """The bytes the app writes for a stream of `PIECES` (one output per piece), with usage."""
    builder = ResponseBuilder(chat=chat, model=MODEL, n=1, prompt_tokens=3, tokenizer=engine.tokenizer)
    last = len(PIECES) - 1
    outputs = [Output((SequenceDelta(0, 0, 0, 100 + k, text, None, "stop" if k == last else None),),
                      finished=k == last) for k, text in enumerate(PIECES)]

    async def batches():
        for output in outputs:
            yield [output]

    async def write() -> str:
        return "".join([event async for event in _sse(builder, batches(), include_usage=True)])

    return asyncio.run(write()).encode()


def mock_client(stream: bytes, piece: int = 5) -> openai.OpenAI:
    """An `openai` client whose every request is answered with ``stream``, sent ``piece`` bytes at a time."""
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=[stream[i:i + piece] for i in range(0, len(stream), piece)])

    http = httpx.Client(transport=httpx.MockTransport(answer))
    return openai.OpenAI(base_url="http://127.0.0.1:9/v1", api_key="unused", max_retries=0, http_client=http)


@pytest.mark.parametrize("chat", [False, True])
def test_line_separators_in_the_text_survive_openai_and_sse_data(engine, chat):
    stream = server_stream(engine, chat=chat)
    assert "\u2028".encode() in stream  # written unescaped
    with mock_client(stream) as client:
        if chat:
            chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            chunks = list(client.completions.create(model=MODEL, prompt="x", stream=True))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "".join(PIECES) and chunks[-1].usage.completion_tokens == len(PIECES)
    decoder = SSEDecoder()
    events = [data for i in range(0, len(stream), 3) for data in decoder.feed(stream[i:i + 3])]
    assert events[-1] == "[DONE]" and [json.loads(e) for e in events[:-1]] == [c.model_dump(exclude_unset=True)
                                                                               for c in chunks]


@pytest.mark.parametrize("chat", [False, True])
def test_live_streams_read_alike_by_openai_and_sse_data(server, client, chat):
    kwargs = {"model": MODEL, "max_tokens": 8, "temperature": 0, "stream": True}
    kwargs |= {"messages": CHAT} if chat else {"prompt": "Once upon a time"}
    expected = [anonymous(c.model_dump(exclude_unset=True))
                for c in (client.chat.completions if chat else client.completions).create(**kwargs)]

    async def read() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url) as http, http.stream(
                "POST", "/v1/chat/completions" if chat else "/v1/completions", json=kwargs) as response:
            return [data async for data in sse_data(response.aiter_bytes())]

    events = asyncio.run(read())
    assert events[-1] == "[DONE]" and [anonymous(json.loads(e)) for e in events[:-1]] == expected


def anonymous(chunk: dict) -> dict:
    """A chunk without what differs between two requests (its id and second)."""
    return {k: v for k, v in chunk.items() if k not in ("id", "created")}
