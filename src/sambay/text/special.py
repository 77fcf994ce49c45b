"""Added tokens ("markers" such as `<|user|>`) and the splitter that finds them in text.

HF `tokenizers` matches added tokens before BPE runs: leftmost-longest over all added tokens, then a
matched token with `rstrip` swallows the whitespace after it and one with `lstrip` the whitespace
before it. `MarkerSplitter` reproduces that so a rendered chat string tokenizes exactly as HF's
`apply_chat_template` would, while `Tokenizer.encode` can still refuse to parse markers at all.

"Whitespace" is Rust's `char::is_whitespace` (the Unicode White_Space property), which is what
`tokenizers` uses; Python's `str.isspace` differs on U+001C..U+001F, so the set is spelled out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# Unicode White_Space (PropList.txt): the characters Rust's `char::is_whitespace` accepts.
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
WHITESPACE += "\u2028\u2029\u202f\u205f\u3000"
_WHITESPACE_RUN = re.compile(f"[{re.escape(WHITESPACE)}]*")


@dataclass(frozen=True)
class AddedToken:
    """One added token, as listed in `tokenizer.json` `added_tokens` or `added_tokens_decoder`.

    Attributes:
        id: token id (outside the BPE ranks).
        content: the literal text of the marker, e.g. `<|end|>`.
        special: True for control tokens (`decode(skip_special_tokens=True)` drops these).
        rstrip: the marker swallows the whitespace that follows it when parsed.
        lstrip: the marker swallows the whitespace that precedes it when parsed.
    """

    id: int
    content: str
    special: bool = True
    rstrip: bool = False
    lstrip: bool = False

    @classmethod
    def from_hf(cls, token_id: int, entry: dict) -> AddedToken:
        """Builds one from an HF entry (`{"content": ..., "special": ..., "rstrip": ...}`).

        Raises:
            ValueError: for `single_word` markers, which this splitter does not implement.
        """
        if entry.get("single_word", False):
            raise ValueError(f"added token {entry['content']!r}: single_word=True is not supported")
        return cls(
            id=int(token_id),
            content=entry["content"],
            special=bool(entry.get("special", False)),
            rstrip=bool(entry.get("rstrip", False)),
            lstrip=bool(entry.get("lstrip", False)),
        )

    def to_hf(self) -> dict:
        """The entry as `tokenizer.json` `added_tokens` lists it."""
        return {
            "id": self.id,
            "content": self.content,
            "single_word": False,
            "lstrip": self.lstrip,
            "rstrip": self.rstrip,
            "normalized": False,
            "special": self.special,
        }


class MarkerSplitter:
    """Splits text into plain-text pieces and added tokens, the way HF's added vocabulary does."""

    def __init__(self, tokens: Iterable[AddedToken]):
        self.by_content = {t.content: t for t in tokens}
        if any(len(c) < 2 for c in self.by_content):
            raise ValueError("added tokens must be at least two characters long")
        # Python's alternation is leftmost-first; longest-first ordering makes it leftmost-longest.
        alternatives = sorted(self.by_content, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    def split(self, text: str) -> list[str | AddedToken]:
        """Splits `text` at every marker, applying the markers' lstrip/rstrip.

        Args:
            text: the string to scan.

        Returns:
            Alternating plain strings (possibly empty ones dropped) and `AddedToken`s, in order.
        """
        if self.pattern is None:
            return [text] if text else []
        pieces: list[str | AddedToken] = []
        pos = 0
        for match in self.pattern.finditer(text):
            if match.start() < pos:  # inside whitespace already swallowed by an rstrip
                continue
            token = self.by_content[match.group()]
            before = text[pos : match.start()]
            pieces.append(before.rstrip(WHITESPACE) if token.lstrip else before)
            pieces.append(token)
            pos = match.end()
            if token.rstrip:
                pos = _WHITESPACE_RUN.match(text, pos).end()
        pieces.append(text[pos:])
        return [p for p in pieces if p != ""]
