"""The reasoning parser: one-shot cases, and streaming equal to one-shot for every way of chunking."""

from __future__ import annotations

import random

import pytest

from sambay.text.reasoning import ReasoningParser, ReasoningSplit, split_reasoning

CASES = {
    "full": ("<think>\nx = 2\n</think>\n\nThe answer is 2.", ReasoningSplit("\nx = 2\n", "The answer is 2.")),
    "no think block": ("Just an answer.\n", ReasoningSplit("", "Just an answer.\n")),
    "unterminated": ("<think>still going <thi", ReasoningSplit("still going <thi", "")),
    "text before": ("Sure. <think>hm</think>Done", ReasoningSplit("hm", "Sure. Done")),
    "only newlines stripped": ("<think>r</think>\r\n\n  indented", ReasoningSplit("r", "  indented")),
    "lookalike tags": (
        "<thinking> <think/> a < think>",
        ReasoningSplit("", "<thinking> <think/> a < think>"),
    ),
    "lookalike close": ("<think>a </thin k> </think", ReasoningSplit("a </thin k> </think", "")),
    "second block is content": (
        "<think>a</think>b<think>c</think>",
        ReasoningSplit("a", "b<think>c</think>"),
    ),
    "empty": ("", ReasoningSplit("", "")),
    "empty think": ("<think></think>", ReasoningSplit("", "")),
    "tag prefix at end": ("answer <", ReasoningSplit("", "answer <")),
    "unicode": ("<think>🤔 中文</think>\n答案 🙂", ReasoningSplit("🤔 中文", "答案 🙂")),
}


def _stream(chunks, **kwargs) -> ReasoningSplit:
    parser = ReasoningParser(**kwargs)
    outputs = [parser.feed(chunk) for chunk in chunks] + [parser.finish()]
    return ReasoningSplit("".join(o.reasoning for o in outputs), "".join(o.content for o in outputs))


@pytest.mark.parametrize("name", list(CASES))
def test_one_shot(name):
    text, expected = CASES[name]
    assert split_reasoning(text) == expected


@pytest.mark.parametrize("name", list(CASES))
def test_streaming_every_split_point_and_chunking(name):
    text, expected = CASES[name]
    for cut in range(len(text) + 1):
        assert _stream([text[:cut], text[cut:]]) == expected, cut
    for cut_a in range(len(text) + 1):
        for cut_b in range(cut_a, len(text) + 1):
            assert _stream([text[:cut_a], text[cut_a:cut_b], text[cut_b:]]) == expected, (cut_a, cut_b)
    assert _stream(list(text)) == expected
    assert _stream([text[i : i + 2] for i in range(0, len(text), 2)]) == expected
    rng = random.Random(name)
    for _ in range(50):
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 6))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert _stream(chunks) == expected, chunks


def test_streaming_releases_lookalikes_promptly():
    parser = ReasoningParser()
    assert parser.feed("a <th") == ReasoningSplit("", "a ")
    assert parser.feed("ank you") == ReasoningSplit("", "<thank you")
    assert parser.feed("<think>") == ReasoningSplit("", "")
    assert parser.in_reasoning
    assert parser.feed("r</") == ReasoningSplit("r", "")
    assert parser.feed("b>") == ReasoningSplit("</b>", "")
    assert parser.feed("</think>\n") == ReasoningSplit("", "")
    assert not parser.in_reasoning
    assert parser.feed("\n") == ReasoningSplit("", "")
    assert parser.feed("\nx\n") == ReasoningSplit("", "x\n")
    assert parser.finish() == ReasoningSplit("", "")


def test_finish_releases_a_held_partial_tag():
    parser = ReasoningParser()
    assert parser.feed("<think>abc</thi") == ReasoningSplit("abc", "")
    assert parser.finish() == ReasoningSplit("</thi", "")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("x = 2\n</think>\n\nAnswer", ReasoningSplit("x = 2\n", "Answer")),
        ("no close yet", ReasoningSplit("no close yet", "")),
    ],
)
def test_start_in_reasoning(text, expected):
    assert split_reasoning(text, start_in_reasoning=True) == expected
    for cut in range(len(text) + 1):
        assert _stream([text[:cut], text[cut:]], start_in_reasoning=True) == expected
