"""Generation for a caller with prompts in hand: `Engine` streams completions through the engine core.

The building blocks are gpt-fast's, as pure functions:
    prefill(model, tokens, cache, lengths)  → (b, vocab) logits of each row's last prompt token
    decode_step(model, token, cache)        → (b, vocab) logits after one more token per row
    sample(logits, params, generators)      → (b,) tokens, on the device, no sync  (`sampling.py`)

`Engine` is the offline face of the one generation loop (`sambay.generate.core.EngineCore`: the same
scheduler, model runner with bucketed CUDA-graph decode, sampler and `OutputProcessor` that serve
HTTP): a call submits one request per prompt (``params.n`` samples each, fanned out from one
prefill), steps the core until every sequence has finished, and yields each step's deltas.

Notable features:
- Rows at different points of their sequences share every step; a finished row stops costing anything.
- A seeded request's sample j draws its noise from a generator seeded ``seed + j``, whatever else is in
  the batch (``params.n`` samples of one prompt are samples 0 .. n-1).
- Stop conditions: a stop token id (default: the eos ids of the model directory's
  `generation_config.json`) ends a sequence with finish reason "stop"; it counts as a generated token
  but adds no text. Stop strings end it too and are cut from the text (`stops.py`). Reaching
  ``max_new_tokens`` (or the model's `max_seq_len`) gives "length".
- Logits of embedding rows the tokenizer does not define (the release has 200064 rows, 200029 ids)
  are masked, so every generated id decodes.
- The core (its cache and graphs) is kept between calls and rebuilt only when a call needs more rows or
  a longer sequence than it holds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from sambay.cache import SambaYCache
from sambay.generate.core import EngineCore
from sambay.generate.outputs import SequenceDelta, TokenLogprob
from sambay.generate.requests import Output, SchedulerConfig
from sambay.generate.sampling import SamplingParams
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
    logits = model(tokens, cache, lengths=lengths)[:, -1]
    cache.advance(tokens.shape[1] if lengths is None else lengths)
    return logits


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
    logits = model(token, cache, check_inputs=False)[:, -1]
    cache.advance(1)
    return logits


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
    reasoning_tokens: int = 0  # tokens inside <think> (``SamplingParams.reasoning`` requests)


class Engine:
    """Streams completions of a batch of prompts from one model, through an `EngineCore`.

    Args:
        model: the language model (in eval mode, on its device).
        tokenizer: text ↔ ids; None for token-only use (no text, no stop strings).
        stop_token_ids: default stop ids for requests that name none (default: the tokenizer's,
            i.e. its directory's generation_config eos ids).
        cuda_graphs: replay decode steps from CUDA graphs (default: on when the model is on a GPU).
    """

    def __init__(
        self,
        model: SambaY,
        tokenizer: Tokenizer | None = None,
        *,
        stop_token_ids: Sequence[int] | None = None,
        cuda_graphs: bool | None = None,
        prefix_cache_bytes: int = 0,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.prefix_cache_bytes = prefix_cache_bytes  # state snapshots of cached prefixes (`prefix_cache`); 0: off
        if stop_token_ids is None:
            stop_token_ids = tokenizer.stop_token_ids() if tokenizer is not None else ()
        self.stop_token_ids = tuple(stop_token_ids)
        self.cuda_graphs = model.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._core: EngineCore | None = None
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
            cuda_graphs: replay decode steps from CUDA graphs (default: on when the model is on a GPU).
        """
        from sambay.checkpoint import load_model
        from sambay.tokenizer import load_tokenizer

        model = load_model(model_dir, device=device, dtype=dtype, backend=backend, progress=progress)
        tokenizer = load_tokenizer(tokenizer_dir or model_dir)
        config_file = Path(model_dir) / "generation_config.json"
        generation_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        return cls(model, tokenizer, stop_token_ids=tokenizer.stop_token_ids(generation_config),
                   cuda_graphs=cuda_graphs)

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
                c.reasoning_tokens = d.reasoning_tokens or c.reasoning_tokens
        return results

    def stream(self, prompts: Sequence[Prompt], params: SamplingParams) -> Iterator[list[SequenceDelta]]:
        """Generate; yield, after every step that produced tokens, one delta per sequence that advanced.

        Args:
            prompts: b prompts (strings are encoded as plain text, see `encode`), of any lengths.
            params: sampling parameters shared by every prompt; ``params.n`` samples each.

        Yields:
            Per step, a list of `SequenceDelta` (sequence order: prompt-major). A sequence's last delta
            carries its finish reason; the stream ends when every sequence has finished.
        """
        ids = self._check([self.encode(p) for p in prompts], params)
        longest = max(len(p) for p in ids)
        max_new = min(params.max_new_tokens, self.model.config.max_seq_len - longest)
        core = self._core_for(len(ids) * params.n, longest + max_new)
        step: list[tuple[int, Output]] = []
        requests = [core.submit(p, params.replace(max_new_tokens=max_new), lambda o, i=i: step.append((i, o)))
                    for i, p in enumerate(ids)]
        open_ = len(requests)
        try:
            while open_:
                core.step(overlap=True)
                deltas = []
                for i, output in step:
                    if output.error:
                        raise RuntimeError(f"generation failed: {output.error}")
                    deltas += [replace(d, index=i * params.n + d.sample_index, prompt_index=i) for d in output.deltas]
                    open_ -= output.finished
                step.clear()
                if deltas:
                    yield sorted(deltas, key=lambda d: d.index)
        finally:
            if open_:  # the consumer stopped early: free the rows
                for request in requests:
                    request.cancel()
                while core.busy:
                    core.step(overlap=True)

    def _core_for(self, rows: int, length: int) -> EngineCore:
        """The kept core if it holds ``rows`` sequences of ``length`` tokens, else a new, larger one."""
        core = self._core
        if core is None or core.config.slots < rows or core.max_length < length:
            self._core = None  # release the old cache and graphs first
            slots = max(rows, 1 if core is None else core.config.slots)
            # a growing conversation (chat) doubles the length, so its prefix cache is rarely dropped
            length = max(length, 0 if core is None else min(2 * core.max_length, self.model.config.max_seq_len))
            config = SchedulerConfig(slots=slots, max_length=length, prefill_chunk=8192, prefill_budget=8192,
                                     max_waiting=max(slots, 64), cuda_graph=self.cuda_graphs, warm_up=False,
                                     prefix_cache_bytes=self.prefix_cache_bytes)
            self._core = core = EngineCore(self, config)
        return core

    def _check(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        if not prompts or any(not p for p in prompts):
            raise ValueError("need at least one prompt, and every prompt needs at least one token")
        vocab, max_len = self.model.config.vocab_size, self.model.config.max_seq_len
        bad = [i for p in prompts for i in p if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
        longest = max(len(p) for p in prompts)
        if longest >= max_len:
            raise ValueError(f"prompt of {longest} tokens leaves no room: the model's max_seq_len is {max_len}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        return prompts

    def mask_unused(self, logits: Tensor) -> Tensor:
        """Mask (-inf) the logits of embedding rows the tokenizer does not define. logits: (b, vocab)."""
        return logits if self._unused is None else logits.masked_fill(self._unused, float("-inf"))
