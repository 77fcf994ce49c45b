"""An lm-evaluation-harness backend: ``lm_eval --model sambay --model_args path=DIR[,device=cuda,...]``.

`SambayLM` implements the harness's three request types on our code paths:
- ``loglikelihood`` and ``loglikelihood_rolling``: the model's forward without a cache, batched, through
  `sambay.eval.perplexity.score` (the rolling windows are the harness's own `get_rolling_token_windows`);
- ``generate_until``: every request through the engine core (`sambay.eval.batching`), continuously batched,
  ``until`` as stop strings, greedy unless the task asks for sampling.

Registration. The package declares the entry point ``sambay = "sambay.eval.harness:SambayLM"`` in the group
``lm_eval.models`` (in the ``eval`` extra), which lm-eval releases with entry-point discovery
(EleutherAI/lm-evaluation-harness#4013) read by themselves. Older releases (0.4.13 and before) never scan
entry points; for them ``python -m sambay.eval <lm_eval arguments>`` registers the backend and runs
lm-eval's own command line, and in Python importing this module is enough (`@register_model`).

Model arguments (``--model_args``): ``path`` (or ``pretrained``; default: the embedded model),
``device`` (auto, cpu, cuda, …; lm-eval's ``--device`` too, whose default cuda:0 falls back to the CPU
with a warning where no GPU is visible), ``dtype`` (auto: the checkpoint's on a GPU, float32 on a CPU),
``batch_size`` (sequences generated at once, default 32; lm-eval's ``--batch_size``),
``batch_tokens`` (tokens per scoring forward, default 16384), ``max_length`` (default: the model's
``max_seq_len``), ``max_gen_toks`` (default 256). Prompts are tokenized the way HF tokenizers do by
default: marker strings such as ``<|user|>`` become marker ids (what ``--apply_chat_template`` needs).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from sambay.eval.batching import Finished, Job, run_jobs
from sambay.eval.perplexity import Window, score
from sambay.generate import Engine, SamplingParams

log = logging.getLogger("sambay.eval.harness")
_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_model("sambay")
class SambayLM(TemplateLM):
    """lm-eval's `LM` interface over a sambay `Engine` (module docstring)."""

    def __init__(self, path: str | None = None, *, pretrained: str | None = None, engine: Engine | None = None,
                 device: str = "auto", dtype: str = "auto", batch_size: int | str = 32, batch_tokens: int = 16384,
                 max_length: int | None = None, max_gen_toks: int = 256, max_batch_size: int | None = None,
                 **unused: Any):
        super().__init__()  # max_batch_size: lm-eval passes it for "auto" batch sizes; it has no use here
        if unused:
            log.warning("sambay ignores the model arguments %s", sorted(unused))
        self._template: str | None = None  # the chat template's source, recorded by lm-eval with the results
        if engine is None:
            engine, self._template = _load(path or pretrained, device, dtype)
        self.engine, self.model, self.tokenizer = engine, engine.model, engine.tokenizer
        self._name = str(path or pretrained or "sambay-default-model")
        self.slots = 32 if str(batch_size).startswith("auto") else int(batch_size)
        self.batch_tokens, self.max_gen_toks = int(batch_tokens), int(max_gen_toks)
        self._max_length = int(max_length) if max_length else self.model.config.max_seq_len

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None):
        """Model arguments win over lm-eval's own flags (``--device``, ``--batch_size``) when both name one."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None):
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    # what the harness asks of every backend -------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def tokenizer_name(self) -> str:
        return self._name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, parse_special=True)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self._template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.render_chat(chat_history, add_generation_prompt=add_generation_prompt)

    # the three request types ----------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids); the context is cut from the left
        to the model's length, as HF's backend does."""
        windows = []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
            windows.append(Window(whole, min(len(continuation), len(whole) - 1)))
        results = [(s.logprob, s.greedy) for s in score(self.model, windows, self.batch_tokens)]
        for (pair, _, _), result in zip(requests, results, strict=True):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each string's total log-likelihood after the eos token, in the harness's disjoint rolling windows."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            pairs = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                       prefix_token=self.eot_token_id, max_seq_len=self.max_length,
                                                       context_len=1)
            for context, predicted in map(lm_utils.make_disjoint_window, pairs):
                windows.append(Window(list(context) + list(predicted), len(predicted)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, s in zip(owner, score(self.model, windows, self.batch_tokens), strict=True):
            totals[i] += s.logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations through the engine core, each ended by its ``until`` strings or ``max_gen_toks``."""
        jobs = []
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            params = self._sampling(dict(gen_kwargs))
            ids = self.tok_encode(context)[-(self.max_length - params.max_new_tokens) :] or [self.eot_token_id]
            jobs.append(Job(i, ids, params))
        texts = [""] * len(requests)

        def finish(seq: Finished) -> None:
            texts[seq.key] = seq.text

        run_jobs(self.engine, jobs, finish, slots=self.slots)
        for req, text in zip(requests, texts, strict=True):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts

    def _sampling(self, kwargs: dict[str, Any]) -> SamplingParams:
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))  # > 0 samples, as in vLLM's backend
        fields = {name: kwargs.pop(name) for name in ("top_p", "top_k", "min_p", "seed") if name in kwargs}
        if kwargs:
            log.warning("sambay ignores the generation arguments %s", sorted(kwargs))
        return SamplingParams(temperature=temperature, max_new_tokens=min(max_gen, self.max_length - 1),
                              stop=tuple(s for s in until if s), **fields)


def _load(path: str | None, device: str, dtype: str) -> tuple[Engine, str | None]:
    """The engine of a model directory (default: the embedded model) and its chat template's source."""
    from sambay.cli._common import set_threads
    from sambay.default_model import default_model_dir

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():  # lm-eval's default is cuda:0, asked or not
        log.warning("device %s: no CUDA device is visible, so the model runs on the CPU", device)
        device = "cpu"
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    torch_dtype = _DTYPES[dtype] or (None if device.startswith("cuda") else torch.float32)
    directory = Path(path) if path else default_model_dir()
    engine = Engine.load(directory, device=device, dtype=torch_dtype, progress=False)
    set_threads(None, engine.model)  # the CLI's CPU thread policy (one thread for a small model)
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    return engine, config.get("chat_template")


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with this backend registered (``python -m sambay.eval``), for lm-eval releases
    without entry-point discovery."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


__all__ = ["SambayLM", "main"]
