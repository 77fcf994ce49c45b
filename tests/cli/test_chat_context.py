"""`sambay chat` keeps the session when the conversation outgrows the model's context (issue 12: it used to
exit with "prompt of N tokens leaves no room"): the oldest exchanges go, the system message stays, and a
message too long to fit alone is refused without losing the history."""

from __future__ import annotations

import io
import itertools
import sys

import pytest

from sambay.cli import __main__ as cli
from sambay.cli import chat
from sambay.generate import Engine
from tests.conftest import random_model, small_config

MAX_LEN = 48
REPLY = 3  # --max-new-tokens: the room kept for a reply (below MAX_LEN // 4)
MESSAGE = "one two three four five six seven eight nine ten"  # ten tokens; one exchange is about 20


@pytest.fixture(scope="module")
def short_engine(engine) -> Engine:
    """The tiny random model, with a context of MAX_LEN tokens."""
    config = small_config(vocab_size=200064, d_model=16, n_heads=4, n_kv_heads=2, d_ff=16, max_seq_len=MAX_LEN)
    return Engine(random_model(config), engine.tokenizer)


def chat_through(monkeypatch, capsys, engine: Engine, lines: list[str], *flags: str) -> tuple[int, str, list]:
    """Run `sambay chat` in-process on ``lines``; the exit code, stdout and the prompts the engine was given."""
    prompts, stream = [], engine.stream

    def recording(batch, params):
        prompts.append(list(batch[0]))
        return stream(batch, params)

    monkeypatch.setattr(engine, "stream", recording)
    monkeypatch.setattr(chat, "load_engine", lambda options, console: engine)
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    code = cli.main(["chat", "--model", "unused", "--max-new-tokens", str(REPLY), "--temperature", "0", *flags])
    return code, capsys.readouterr().out, prompts


def test_the_oldest_exchanges_go_and_the_system_message_stays(monkeypatch, capsys, short_engine):
    decode = short_engine.tokenizer.decode
    code, out, prompts = chat_through(monkeypatch, capsys, short_engine, [f"{i} {MESSAGE}" for i in range(4)],
                                      "--system", "Be brief.")
    assert code == 0 and out.count(f"({REPLY} tokens, ") == 4, out  # every message was answered
    assert f"outgrew the model's context of {MAX_LEN} tokens: dropped the 2 oldest messages" in out
    assert all(len(p) + REPLY <= MAX_LEN for p in prompts)
    assert all(decode(p).startswith("<|system|>Be brief.<|end|><|user|>") for p in prompts)
    last = decode(prompts[-1])
    assert f"3 {MESSAGE}" in last and f"0 {MESSAGE}" not in last


def test_a_message_too_long_to_fit_alone_is_refused_and_the_session_goes_on(monkeypatch, capsys, short_engine):
    too_long = " ".join([MESSAGE] * 5)
    code, out, prompts = chat_through(monkeypatch, capsys, short_engine, ["hello", too_long, "again"])
    assert code == 0 and out.count(f"({REPLY} tokens, ") == 2, out
    assert "message not sent: with the system message it takes" in out and f"context is {MAX_LEN}" in out
    assert len(prompts) == 2
    assert "hello" in short_engine.tokenizer.decode(prompts[1])  # the history before the refused message is kept


def test_each_turn_prefills_only_what_is_new(monkeypatch, capsys, engine):
    """The prefix cache (issue 15): turn after turn, the conversation so far is served from the cache, and
    the replies are those of a chat without it."""
    config = small_config(vocab_size=200064, d_model=16, n_heads=4, n_kv_heads=2, d_ff=16, max_seq_len=1024)
    model = random_model(config)
    system = " ".join(f"rule {i}." for i in range(60))  # about 180 tokens: a full block of 128 and more
    lines = [f"{i} {MESSAGE}" for i in range(3)]
    replies = []
    for gb in ("0", "0.01"):
        fresh = Engine(model, engine.tokenizer)
        code, out, prompts = chat_through(monkeypatch, capsys, fresh, lines, "--system", system,
                                          "--prefix-cache-memory-gb" if gb == "0" else "--prefix-cache-gb", gb)
        assert code == 0 and all(a == b[: len(a)] for a, b in itertools.pairwise(prompts)), out
        replies.append([line for line in out.splitlines() if "tokens/s" not in line])
        hits = fresh._core.stats()["prefix_cache_hits"]
        assert hits == (0 if gb == "0" else 2 * 128), hits  # turns 2 and 3 start from the system prompt's block
    assert replies[0] == replies[1]
