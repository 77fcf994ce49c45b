"""What the generation subcommands share: model and sampling flags, their config dataclasses, loading.

Flags are converted to dataclasses at once (`model_options`, `sampling_params`); nothing downstream
reads `argparse.Namespace`. Errors the user can fix are exceptions with a one-line message:
`UsageError` (bad arguments, exit 2) or `FileNotFoundError` / `ValueError` (exit 1), which
`sambay.cli.__main__` prints without a traceback.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from sambay.generate import REASONING_DEFAULTS, Engine, SamplingParams, SequenceDelta

_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAMPLING_FLAGS = {  # flag → (SamplingParams field, type)
    "temperature": float, "top_p": float, "top_k": int, "min_p": float, "repetition_penalty": float,
    "presence_penalty": float, "frequency_penalty": float, "seed": int, "max_new_tokens": int,
}


class UsageError(Exception):
    """Bad command-line arguments (exit code 2)."""


@dataclass(frozen=True)
class ModelOptions:
    """Which model to load, where, and how."""

    model_dir: Path
    tokenizer_dir: Path  # the model directory unless --tokenizer says otherwise
    device: str
    dtype: torch.dtype | None  # None: the checkpoint's own


def resolve_model_dir(arg: str | None) -> Path:
    """The model directory to use: ``--model`` when given, else the embedded arithmetic demo model."""
    if arg is None:
        from sambay.default_model import default_model_dir

        return default_model_dir()
    return Path(arg)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --tokenizer, --device, --dtype."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", metavar="DIR", help="model directory (config.json, safetensors, tokenizer "
                       "files; default: the embedded arithmetic demo model)")
    group.add_argument("--tokenizer", metavar="DIR", help="directory with the tokenizer files (default: --model)")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    group.add_argument("--dtype", default="auto", choices=list(_DTYPES),
                       help="parameter dtype (auto: the checkpoint's on a GPU, float32 on the CPU)")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Sampling flags; unset ones keep the model card's defaults (`REASONING_DEFAULTS`)."""
    group = parser.add_argument_group("sampling (defaults: the model card's)")
    for name, kind in _SAMPLING_FLAGS.items():
        default = getattr(REASONING_DEFAULTS, name)
        group.add_argument(f"--{name.replace('_', '-')}", type=kind, metavar=kind.__name__.upper(),
                           help=f"default: {default}")
    group.add_argument("--stop", action="append", default=[], metavar="TEXT",
                       help="stop string (repeatable); the output ends before it")


def model_options(args: argparse.Namespace) -> ModelOptions:
    """`ModelOptions` from parsed flags."""
    model_dir = resolve_model_dir(args.model)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = _DTYPES[args.dtype]
    if dtype is None and not device.startswith("cuda"):
        dtype = torch.float32  # half-precision matmuls are slow on most CPUs
    return ModelOptions(model_dir, Path(args.tokenizer) if args.tokenizer else model_dir, device, dtype)


def sampling_params(args: argparse.Namespace, **extra) -> SamplingParams:
    """`REASONING_DEFAULTS` overridden by the flags given (and ``extra``); invalid values → UsageError."""
    given = {name: getattr(args, name) for name in _SAMPLING_FLAGS if getattr(args, name) is not None}
    try:
        return REASONING_DEFAULTS.replace(**given, stop=tuple(args.stop), **extra)
    except ValueError as e:
        raise UsageError(str(e)) from None


def load_engine(options: ModelOptions, console: Console, *, cuda_graphs: bool | None = None) -> Engine:
    """Check the directories, then load weights (progress bar on a TTY) and tokenizer.

    ``cuda_graphs``: as for `Engine.load` (None: on when the model is on a GPU).
    """
    for directory in {options.model_dir, options.tokenizer_dir}:
        if not directory.is_dir():
            raise FileNotFoundError(f"model directory {directory} does not exist")
    if not (options.model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{options.model_dir} has no config.json: is it a model directory?")
    if not (options.tokenizer_dir / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{options.tokenizer_dir} has no tokenizer_config.json (use --tokenizer DIR)")
    with console.status("loading model and tokenizer"):
        return Engine.load(options.model_dir, tokenizer_dir=options.tokenizer_dir, device=options.device,
                           dtype=options.dtype, cuda_graphs=cuda_graphs)


def prompt_ids(engine: Engine, messages: Sequence[dict] | str) -> list[int]:
    """Ids of a conversation (chat template, generation prompt) or of plain text (``str``, no template)."""
    if isinstance(messages, str):
        return engine.encode(messages)
    return engine.tokenizer.apply_chat_template(messages)


@dataclass
class StreamTimer:
    """Wall-clock timing of one stream: time to the first token, then decode speed."""

    start: float = 0.0
    first: float = 0.0
    end: float = 0.0
    tokens: int = 0

    def run(self, stream: Iterator[list[SequenceDelta]]) -> Iterator[list[SequenceDelta]]:
        """Pass the stream through, counting generated tokens."""
        self.start = time.perf_counter()
        for step in stream:
            self.first = self.first or time.perf_counter()
            self.tokens += len(step)
            yield step
        self.end = time.perf_counter()

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of the whole stream (prefill included)."""
        return self.tokens / max(self.end - self.start, 1e-9)

    def as_dict(self) -> dict[str, float]:
        return {"prefill_s": round(self.first - self.start, 4), "total_s": round(self.end - self.start, 4),
                "tokens_per_s": round(self.tokens_per_s, 2)}
