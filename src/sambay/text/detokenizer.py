"""Streaming detokenization: token ids in, text deltas out.

Byte-level BPE tokens are byte strings, and one UTF-8 character (an emoji, a CJK ideograph) is often
split over two or three tokens. Decoding each token on its own would print U+FFFD for the halves;
instead the bytes go through an incremental UTF-8 decoder, which holds an incomplete trailing
sequence until the bytes that complete it arrive. Bytes that can never become valid UTF-8 are
replaced by U+FFFD at once, exactly as `Tokenizer.decode` would replace them, so the concatenated
deltas always equal `decode(all_ids)`.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterable


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas.

    Args:
        token_bytes: id -> the token's bytes (`Tokenizer.token_bytes`); b"" for ids to drop.

    Example:
        >>> stream = tokenizer.detokenizer()
        >>> "".join(stream.push(i) for i in ids) + stream.finish() == tokenizer.decode(ids)
        True
    """

    def __init__(self, token_bytes: Callable[[int], bytes]):
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feeds one id; returns the text it completes (possibly "", never a partial character)."""
        return self._decoder.decode(self._token_bytes(token_id))

    def push_many(self, token_ids: Iterable[int]) -> str:
        """Feeds several ids; returns the text they complete."""
        return self._decoder.decode(b"".join(map(self._token_bytes, token_ids)))

    def finish(self) -> str:
        """Ends the stream: an incomplete trailing character becomes U+FFFD, as `decode` renders it."""
        return self._decoder.decode(b"", final=True)

    @property
    def pending(self) -> bool:
        """True while bytes of an incomplete character are held back."""
        return bool(self._decoder.getstate()[0])
