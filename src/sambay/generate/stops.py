"""Stop strings over a stream of text deltas.

A stop string may span several tokens and may start in the middle of one (a token "lo\\n" followed by
"##" completes the stop string "\\n##"). `StopStringMatcher` therefore works on text, not tokens:
- the output is truncated right before the earliest occurrence of any stop string (which is not
  emitted), as OpenAI and vLLM do;
- a suffix that could still grow into a stop string is held back, and released as soon as the next
  delta shows it cannot (or by `flush()` when the sequence ends for another reason).

Text already emitted never contains a prefix of a stop string at its end, so a match can only start
inside the held-back text or the new delta: only those are searched.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Feed text deltas; get the text that is safe to emit and whether a stop string was reached.

    Args:
        stops: the stop strings (non-empty).

    Example:
        >>> m = StopStringMatcher(["\\n##"])
        >>> m.feed("Hello\\n")
        ('Hello', False)
        >>> m.feed("##x")
        ('', True)
    """

    def __init__(self, stops: Sequence[str]):
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = tuple(stops)
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        """Consume one delta.

        Args:
            delta: the next piece of text.

        Returns:
            (text to emit now, True once a stop string has been reached). After a stop, further
            deltas are ignored.
        """
        if self.stopped:
            return "", True
        text = self._held + delta
        if not self.stops:
            self._held = ""
            return text, False
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped, self._held = True, ""
            return text[: min(found)], True
        keep = max(_partial_length(text, s) for s in self.stops)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """Release the held-back text (the sequence ended for another reason)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


def _partial_length(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for length in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:length]):
            return length
    return 0
