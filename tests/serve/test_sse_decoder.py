"""`SSEDecoder`, the load generator's Server-Sent Events parser: lines end only at CR, LF or CRLF (not at
U+2028, U+2029 or U+0085, which JSON strings may hold unescaped), whatever the network chunk boundaries."""

from __future__ import annotations

import asyncio
import json

import pytest

from sambay.serve.loadgen import SSEDecoder, sse_data

SEPARATORS = {"text": "line\u2028para\u2029next\u0085end \u00e9\U0001f600"}


def feed_in_pieces(stream: bytes, size: int) -> list[str]:
    decoder = SSEDecoder()
    return [data for i in range(0, len(stream), size) for data in decoder.feed(stream[i:i + size])]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_unicode_line_separators_stay_inside_one_event(size):
    """JSON written with ensure_ascii=False keeps U+2028 etc. unescaped; str.splitlines would cut there."""
    payload = json.dumps(SEPARATORS, ensure_ascii=False)
    assert len(payload.splitlines()) == 4  # what httpx's aiter_lines would have made of it
    stream = f"data: {payload}\n\ndata: [DONE]\n\n".encode()
    assert feed_in_pieces(stream, size) == [payload, "[DONE]"]
    assert json.loads(feed_in_pieces(stream, size)[0]) == SEPARATORS


@pytest.mark.parametrize("ending", ["\r\n", "\r", "\n"])
def test_every_line_ending_and_every_cut(ending):
    """A CRLF cut between two chunks (CR at the end of one, LF at the start of the next) is one line end."""
    stream = f"data: a{ending}{ending}data: b{ending}{ending}".encode()
    for cut in range(len(stream) + 1):
        decoder = SSEDecoder()
        assert decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) == ["a", "b"], cut


def test_multibyte_characters_cut_between_chunks():
    text = "é中😀" * 3
    assert feed_in_pieces(f"data: {text}\n\n".encode(), 1) == [text]


def test_fields_comments_and_dispatch():
    stream = (b"\xef\xbb\xbf: a comment\n"  # a BOM, then a comment
              b"event: message\nid: 7\nretry: 10\ndata:first\ndata:  second\ndata\n\n"
              b"\n\n"  # blank lines without data dispatch nothing
              b"data: unfinished\n")  # no blank line yet: not dispatched
    decoder = SSEDecoder()
    assert decoder.feed(stream) == ["first\n second\n"]
    assert decoder.feed(b"\n") == ["unfinished"]


def test_sse_data_over_an_async_byte_stream():
    async def chunks():
        for piece in (b"data: x\r", b"\n\r\ndata: ", "\u2028y".encode()[:2], "\u2028y".encode()[2:], b"\n\n"):
            yield piece

    async def collect() -> list[str]:
        return [data async for data in sse_data(chunks())]

    assert asyncio.run(collect()) == ["x", "\u2028y"]
