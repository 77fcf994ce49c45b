"""Generation: pure prefill / decode / sample functions, and an `Engine` that streams completions.

The loop is gpt-fast's, in small pieces:
    prefill(model, tokens, cache, lengths)  → (b, vocab) logits of each row's last prompt token
    decode_step(model, token, cache)        → (b, vocab) logits after one more token per row
    sample(logits, params, generators)      → (b,) tokens, on the device, no sync  (`sampling.py`)

`Engine` adds what a caller needs around them: one cache per call with static shapes, ragged batches
of prompts (right-padded, ``lengths=``), n samples per prompt that share ONE prefill (the prompt rows
are prefilled through a view of the cache's leading rows, then `SambaYCache.copy_rows` fans them out),
stop conditions, incremental detokenization and streaming.

Notable features:
- `decode_step` is a pure function of (model, token, cache) with static shapes: finished rows keep
  decoding (their tokens are ignored) rather than shrinking the batch. A compiled or CUDA-graph
  version plugs in through ``Engine(decode=...)``, and so does ``prefill``.
- One host sync per step: the sampled tokens (and logprobs) come to the host together, once, for
  detokenization and every row's stop checks; penalty statistics are updated on the device.
- Rows are laid out sample-major (row ``j * b + i`` is sample j of prompt i), so the prompts occupy
  the leading rows. A seeded request's sample j draws its noise from a generator seeded ``seed + j``,
  whatever else is in the batch.
- Stop conditions: a stop token id (default: the eos ids of the model directory's
  `generation_config.json`) ends a sequence with finish reason "stop"; it counts as a generated token
  but adds no text. Stop strings end it too and are cut from the text (`stops.py`). Reaching
  ``max_new_tokens`` (or the model's `max_seq_len`) gives "length".
- Logits of embedding rows the tokenizer does not define (the release has 200064 rows, 200029 ids)
  are masked, so every generated id decodes.
- Runs under `torch.inference_mode` (entered around each step only, never left on while the caller
  holds the stream).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import Tensor

from sambay.cache import SambaYCache
from sambay.generate.outputs import SequenceDelta, SequenceState, TokenLogprob
from sambay.generate.sampling import PenaltyState, Sampled, SamplingParams, make_generator, sample
from sambay.model.sambay import SambaY
from sambay.tokenizer import Tokenizer

Prompt = str | Sequence[int]


def prefill(model: SambaY, tokens: Tensor, cache: SambaYCache, lengths: Tensor | None = None) -> Tensor:
    """Consume the prompts; return the next-token logits.

    Args:
        model: the language model.
        tokens: (b, t) int64 prompt ids, right-padded when ``lengths`` is given.
        cache: b rows; advanced by each row's prompt length.
        lengths: (b,) valid tokens per row (None: all t).

    Returns:
        (b, vocab) logits after each row's last prompt token.
    """
    return model(tokens, cache, lengths=lengths)[:, -1]


def decode_step(model: SambaY, token: Tensor, cache: SambaYCache) -> Tensor:
    """Consume one token per row; return the next-token logits.

    Args:
        model: the language model.
        token: (b, 1) int64.
        cache: b rows; advanced by one.

    Returns:
        (b, vocab) logits.

    The inputs are not validated (``check_inputs=False``): each check would read a value back to the
    host. `Engine` guarantees them: sampled ids are below vocab_size and the cache has room.
    """
    return model(token, cache, check_inputs=False)[:, -1]


def leading_rows(cache: SambaYCache, rows: int) -> SambaYCache:
    """A cache made of views of the first ``rows`` rows of ``cache``: writes through it land in ``cache``."""

    def cut(state):
        return replace(state, **{f.name: getattr(state, f.name)[:rows] for f in fields(state) if f.name != "rows"})

    return SambaYCache(
        mamba=[cut(s) for s in cache.mamba],
        sliding=[cut(s) for s in cache.sliding],
        full=[cut(s) for s in cache.full],
        seqlens=cache.seqlens[:rows],
        max_length=cache.max_length,
    )


@dataclass
class Completion:
    """One finished sequence (from `Engine.generate`)."""

    prompt_index: int
    sample_index: int
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class _Batch:
    """Prompts as one right-padded tensor."""

    tokens: Tensor  # (b, t) int64
    lengths: Tensor  # (b,) int64
    max_new_tokens: int  # after capping by the model's max_seq_len


class Engine:
    """Streams completions of a batch of prompts from one model.

    Args:
        model: the language model (in eval mode, on its device).
        tokenizer: text ↔ ids; None for token-only use (no text, no stop strings).
        stop_token_ids: default stop ids for requests that name none (default: the tokenizer's,
            i.e. its directory's generation_config eos ids).
        prefill: the prefill function (e.g. a compiled one).
        decode: the decode-step function (e.g. a compiled or CUDA-graph one).
    """

    def __init__(
        self,
        model: SambaY,
        tokenizer: Tokenizer | None = None,
        *,
        stop_token_ids: Sequence[int] | None = None,
        prefill: Callable[..., Tensor] = prefill,
        decode: Callable[[SambaY, Tensor, SambaYCache], Tensor] = decode_step,
    ):
        self.model, self.tokenizer = model, tokenizer
        if stop_token_ids is None:
            stop_token_ids = tokenizer.stop_token_ids() if tokenizer is not None else ()
        self.stop_token_ids = tuple(stop_token_ids)
        self._prefill, self._decode = prefill, decode
        vocab = model.config.vocab_size
        self._unused = None
        if tokenizer is not None and tokenizer.vocab_size < vocab:
            self._unused = torch.arange(vocab, device=model.device) >= tokenizer.vocab_size  # (vocab,) bool

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        tokenizer_dir: str | Path | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
        progress: bool = True,
        cuda_graphs: bool | None = None,
    ) -> Engine:
        """Load a model directory (weights, tokenizer, generation_config.json) into an Engine.

        Args:
            model_dir: checkpoint directory (see `sambay.load_model`).
            tokenizer_dir: where the tokenizer files are (default: ``model_dir``).
            device, dtype, backend, progress: as for `sambay.load_model`.
            cuda_graphs: replay decode steps from a CUDA graph (default: on when the model is on a GPU).
        """
        from sambay.checkpoint import load_model
        from sambay.tokenizer import load_tokenizer

        model = load_model(model_dir, device=device, dtype=dtype, backend=backend, progress=progress)
        tokenizer = load_tokenizer(tokenizer_dir or model_dir)
        config_file = Path(model_dir) / "generation_config.json"
        generation_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        stop_ids = tokenizer.stop_token_ids(generation_config)
        if cuda_graphs if cuda_graphs is not None else model.device.type == "cuda":
            from sambay.generate.cuda_graphs import CudaGraphDecode

            return cls(model, tokenizer, stop_token_ids=stop_ids, decode=CudaGraphDecode())
        return cls(model, tokenizer, stop_token_ids=stop_ids)

    def encode(self, prompt: Prompt) -> list[int]:
        """Prompt ids: a string is encoded as plain text (no chat template), ids are passed through."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass prompts as token ids")
            return self.tokenizer.encode(prompt)
        return [int(i) for i in prompt]

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """Run `stream` to the end.

        Returns:
            ``result[i][j]``: sample j of prompt i.
        """
        ids = [self.encode(p) for p in prompts]
        results = [[Completion(i, j, len(p)) for j in range(params.n)] for i, p in enumerate(ids)]
        for step in self.stream(ids, params):
            for d in step:
                c = results[d.prompt_index][d.sample_index]
                c.token_ids.append(d.token_id)
                c.text += d.text
                if d.logprob is not None:
                    c.logprobs.append(d.logprob)
                c.finish_reason = d.finish_reason
        return results

    @torch.inference_mode()
    def stream(self, prompts: Sequence[Prompt], params: SamplingParams) -> Iterator[list[SequenceDelta]]:
        """Generate; yield, after every step, one delta per sequence that was still running.

        Args:
            prompts: b prompts (strings are encoded as plain text, see `encode`), of any lengths.
            params: sampling parameters shared by every prompt; ``params.n`` samples each.

        Yields:
            Per step, a list of `SequenceDelta` (sequence order: prompt-major). A sequence's last delta
            carries its finish reason; the stream ends when every sequence has finished.
        """
        batch = self._batch([self.encode(p) for p in prompts], params)
        b, n = batch.tokens.shape[0], params.n
        stop_ids = frozenset(self.stop_token_ids if params.stop_token_ids is None else params.stop_token_ids)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        device = self.model.device
        cache = self.model.new_cache(
            batch_size=b * n, max_length=int(batch.lengths.max()) + batch.max_new_tokens, device=device
        )
        seeds = [None if params.seed is None else params.seed + j for j in range(n) for _ in range(b)]
        generators = [make_generator(seed, device) for seed in seeds]  # one per row, sample-major
        penalties = None
        if params.has_penalties:
            vocab = self.model.config.vocab_size
            penalties = PenaltyState.from_prompts(batch.tokens, batch.lengths, vocab).repeat(n)
        seqs = [SequenceState(self.tokenizer, params, stop_ids, batch.max_new_tokens) for _ in range(b * n)]

        logits = self._prefill(self.model, batch.tokens, leading_rows(cache, b), batch.lengths)  # (b, vocab)
        if n > 1:
            rows = torch.arange(b, device=device)
            cache.copy_rows(rows.repeat(n - 1), torch.arange(b, b * n, device=device))
            logits = logits.repeat(n, 1)  # (b * n, vocab)
        while True:
            out = sample(self.mask_unused(logits), params, generators, penalties)
            if penalties is not None:
                penalties.update(out.tokens)
            yield self._step(seqs, out, b, n)
            if all(s.finish_reason for s in seqs):
                return
            logits = self._decode(self.model, out.tokens.view(-1, 1), cache)

    def _batch(self, prompts: list[list[int]], params: SamplingParams) -> _Batch:
        if not prompts or any(not p for p in prompts):
            raise ValueError("need at least one prompt, and every prompt needs at least one token")
        vocab, max_len = self.model.config.vocab_size, self.model.config.max_seq_len
        bad = [i for p in prompts for i in p if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
        longest = max(len(p) for p in prompts)
        if longest >= max_len:
            raise ValueError(f"prompt of {longest} tokens leaves no room: the model's max_seq_len is {max_len}")
        tokens = torch.zeros(len(prompts), longest, dtype=torch.long)
        for row, p in enumerate(prompts):
            tokens[row, : len(p)] = torch.tensor(p)
        lengths = torch.tensor([len(p) for p in prompts])
        device = self.model.device
        return _Batch(tokens.to(device), lengths.to(device), min(params.max_new_tokens, max_len - longest))

    def mask_unused(self, logits: Tensor) -> Tensor:
        """Mask (-inf) the logits of embedding rows the tokenizer does not define. logits: (b, vocab)."""
        return logits if self._unused is None else logits.masked_fill(self._unused, float("-inf"))

    def _step(self, seqs: list[SequenceState], out: Sampled, b: int, n: int) -> list[SequenceDelta]:
        """Bring the step's tokens to the host (the one sync), update every running row."""
        tokens = out.tokens.tolist()
        logprobs = None
        if out.logprobs is not None:
            chosen, top_ids, top_lp = out.logprobs.tolist(), out.top_ids.tolist(), out.top_logprobs.tolist()
            logprobs = [TokenLogprob(t, c, tuple(zip(i, v, strict=True)))
                        for t, c, i, v in zip(tokens, chosen, top_ids, top_lp, strict=True)]
        deltas = []
        for i in range(b):
            for j in range(n):
                row, seq = j * b + i, seqs[j * b + i]
                if seq.finish_reason:
                    continue
                text = seq.advance(tokens[row])
                deltas.append(SequenceDelta(i * n + j, i, j, tokens[row], text,
                                            None if logprobs is None else logprobs[row], seq.finish_reason))
        return deltas
