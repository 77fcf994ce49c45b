"""Streaming detokenization: deltas never split a UTF-8 character and always add up to `decode`."""

from __future__ import annotations

import random

import pytest

SPLIT_TEXTS = ["🙂👍🏽👨‍👩‍👧", "中文字符日本語のテキスト", "e\u0301 क्ष", "plain ascii", "mixed 🤖 中 text\n"]


def _stream(stream, ids):
    return [stream.push(i) for i in ids]


@pytest.mark.parametrize("text", SPLIT_TEXTS)
def test_deltas_never_hold_replacement_characters(tok, text):
    ids = tok.encode(text)
    stream = tok.detokenizer()
    deltas = _stream(stream, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + stream.finish() == text


def test_multibyte_character_split_across_tokens(tok):
    ids = tok.encode("🤖")
    pieces = [tok.token_bytes(i) for i in ids]
    assert len(ids) > 1 and all(len(p) < 4 for p in pieces), "fixture assumption: the emoji spans tokens"
    stream = tok.detokenizer()
    assert [stream.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert stream.pending
    assert stream.push(ids[-1]) == "🤖"
    assert not stream.pending


def test_random_id_streams_equal_decode(tok):
    rng = random.Random(0)
    byte_tokens = [i for i in range(256)] + [i for i in range(200, 2000)]  # many lone UTF-8 fragments
    for _ in range(200):
        ids = [rng.choice(byte_tokens) for _ in range(rng.randint(0, 30))]
        stream = tok.detokenizer()
        assert "".join(_stream(stream, ids)) + stream.finish() == tok.decode(ids)


def test_truncated_character_is_flushed_as_replacement(tok):
    ids = tok.encode("🤖")[:-1]
    stream = tok.detokenizer()
    assert "".join(_stream(stream, ids)) == ""
    assert stream.finish() == tok.decode(ids) == "\ufffd"


def test_push_many_and_skip_special(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "中文 🙂"}])
    stream = tok.detokenizer(skip_special_tokens=True)
    assert stream.push_many(ids) + stream.finish() == tok.decode(ids, skip_special_tokens=True) == "中文 🙂"
    stream = tok.detokenizer()
    assert "".join(_stream(stream, ids)) == tok.decode(ids)
