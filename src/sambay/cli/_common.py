"""What the generation subcommands share: model and sampling flags, their config dataclasses, loading,
the CPU thread count, and stream timing.

Flags are converted to dataclasses at once (`model_options`, `sampling_params`); nothing downstream
reads `argparse.Namespace`. Errors the user can fix are exceptions with a one-line message:
`UsageError` (bad arguments, exit 2) or `FileNotFoundError` / `ValueError` (exit 1), which
`sambay.cli.__main__` prints without a traceback.

Threads follow llama.cpp and ollama: one per physical core by default, since SMT siblings share the
core's vector units and only add contention; but a small model decodes fastest on one thread, because
its matmuls are too small to split, and a thread that waits for a core taken by another process stalls
every step (issue 12: on 2 cores with one other busy process, the embedded model decoded at 1-2 tokens/s
on 2 threads and at 45-50 on 1; at best, on a quiet moment, the two were equal, about 130).
"""

from __future__ import annotations

import argparse
import os
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


# Below this many parameters a model gets one CPU thread (see the module docstring). The embedded 3.7M
# model is far below it; Phi-4-mini-flash (3.85B) far above.
SMALL_MODEL_PARAMS = 100_000_000


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
    from sambay.checkpoint import model_directory

    return model_directory(arg)  # a file in the directory (DIR/config.json) stands for the directory


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
    _check_device(device)
    dtype = _DTYPES[args.dtype]
    if dtype is None and not device.startswith("cuda"):
        dtype = torch.float32  # half-precision matmuls are slow on most CPUs
    return ModelOptions(model_dir, Path(args.tokenizer) if args.tokenizer else model_dir, device, dtype)


def _check_device(device: str) -> None:
    """A device this torch can use, else `UsageError` (not torch's 30-line traceback at load time)."""
    try:
        parsed = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"--device {device}: {e}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        raise UsageError(f"--device {device}: {why} (torch {torch.__version__}); use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")


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
        if directory.is_file():
            raise FileNotFoundError(f"expected a model directory, got a file: {directory}; use its directory")
        if not directory.is_dir():
            raise FileNotFoundError(f"model directory {directory} does not exist")
    if not (options.model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{options.model_dir} has no config.json: is it a model directory?")
    if not (options.tokenizer_dir / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{options.tokenizer_dir} has no tokenizer_config.json (use --tokenizer DIR)")
    with console.status("loading model and tokenizer"):
        return Engine.load(options.model_dir, tokenizer_dir=options.tokenizer_dir, device=options.device,
                           dtype=options.dtype, cuda_graphs=cuda_graphs)


def check_serving_cache(args: argparse.Namespace, options: ModelOptions) -> None:
    """Refuse, before the model loads, a serving context whose cache cannot fit the device, naming the flag.

    Each of --slots sequences may grow to --max-length tokens, by default config.json's
    max_position_embeddings. An absurd one (10^9) failed in the allocator with a raw error, after the model
    had loaded (issue 13). The estimate is the shared K/V alone, the only cache that grows with the length:
    a lower bound, so a setup that fits is never refused. With --cache-memory-gb the pool is sized to that
    budget instead, and `sambay.generate.core.make_runner` reports a budget too small for one sequence.
    """
    if args.cache_memory_gb is not None or args.slots < 1:
        return  # a bad --slots is SchedulerConfig's to report
    from sambay.checkpoint import checkpoint_dtype, read_config
    from sambay.config import LayerKind

    config, raw = read_config(options.model_dir)
    length = args.max_length or config.max_seq_len
    itemsize = (options.dtype or checkpoint_dtype(raw) or torch.float32).itemsize
    per_token = 2 * config.count(LayerKind.FULL_ATTENTION) * config.n_kv_heads * config.head_dim * itemsize
    need = args.slots * length * per_token // max(getattr(args, "tensor_parallel", None) or 1, 1)
    have = device_memory(options.device)
    if have is None or need <= have:
        return
    source, fix = ((f"--max-length {length}", "lower --max-length or --slots") if args.max_length else
                   (f"config.json's max_position_embeddings ({length})", "set --max-length to the context you need"))
    raise UsageError(f"{source}: the K/V cache of --slots {args.slots} sequences of {length} tokens needs "
                     f"{need / 1e9:,.1f} GB, more than the {have / 1e9:,.1f} GB of memory on {options.device}; {fix} "
                     "(or give --cache-memory-gb)")


def device_memory(device: str) -> int | None:
    """Bytes a cache on ``device`` can use: a GPU's total memory, the host's available memory for the CPU
    (``MemAvailable``, else all physical memory); None where it cannot be told."""
    parsed = torch.device(device)
    if parsed.type == "cuda":
        return torch.cuda.get_device_properties(parsed.index or 0).total_memory
    if parsed.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            available = next((line.split()[1] for line in f if line.startswith("MemAvailable:")), None)
        if available is not None:
            return int(available) * 1024
    except OSError:  # not Linux
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # Windows, or an unknown name
        return None


def _thread_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """--threads N (applied by `set_threads` once the model is loaded)."""
    parser.add_argument("--threads", type=_thread_count, metavar="N",
                        help="CPU threads for the model (default: OMP_NUM_THREADS if set, else 1 for a model "
                        f"under {SMALL_MODEL_PARAMS // 1_000_000}M parameters, else one per physical core)")


def physical_cores() -> int:
    """The physical cores this process may run on: its CPU affinity, SMT siblings counted once."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # macOS, Windows: no affinity API and no sysfs topology
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:  # no sysfs (some containers): count logical CPUs
            return len(cpus)
    return len(cores)


def default_threads(n_params: int, cores: int) -> int:
    """CPU threads for a model of ``n_params`` parameters on ``cores`` physical cores."""
    return 1 if n_params < SMALL_MODEL_PARAMS else cores


def set_threads(requested: int | None, model: torch.nn.Module) -> int:
    """Set torch's intra-op thread count, once, after loading; returns the count in effect.

    ``requested`` (--threads) wins. Otherwise an explicit OMP_NUM_THREADS (which torch has already applied)
    is kept, and so is torch's default for a GPU model, whose CPU threads only launch kernels; a CPU model
    gets `default_threads`.
    """
    if requested is None:
        on_cpu = next(model.parameters()).device.type == "cpu"
        if not on_cpu or os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        requested = default_threads(sum(p.numel() for p in model.parameters()), physical_cores())
    torch.set_num_threads(requested)
    return requested


def prompt_ids(engine: Engine, messages: Sequence[dict] | str) -> list[int]:
    """Ids of a conversation (chat template, generation prompt) or of plain text (``str``, no template)."""
    if isinstance(messages, str):
        return engine.encode(messages)
    return engine.tokenizer.apply_chat_template(messages)


@dataclass
class StreamTimer:
    """Wall-clock timing of one stream, split as llama.cpp reports it.

    Prompt processing: ``prompt_tokens`` over the time to the first token (prefill and the first sample).
    Generation: the tokens after the first step over the time after it, so a long prompt does not drag
    the decode speed down. ``tokens_per_s`` stays the end-to-end figure (all tokens over the whole time).
    """

    prompt_tokens: int = 0  # prompt length, counted once however many samples share the prefill
    start: float = 0.0
    first: float = 0.0
    end: float = 0.0
    tokens: int = 0  # generated, all samples
    first_tokens: int = 0  # generated by the first step: one per sample

    def run(self, stream: Iterator[list[SequenceDelta]]) -> Iterator[list[SequenceDelta]]:
        """Pass the stream through, counting generated tokens."""
        self.start = time.perf_counter()
        for step in stream:
            if not self.first:
                self.first, self.first_tokens = time.perf_counter(), len(step)
            self.tokens += len(step)
            yield step
        self.end = time.perf_counter()
        self.first = self.first or self.end

    @property
    def prompt_tokens_per_s(self) -> float:
        """Prompt tokens per second of the time to the first token."""
        return self.prompt_tokens / max(self.first - self.start, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second after the first step (0 when there was only one step)."""
        return (self.tokens - self.first_tokens) / max(self.end - self.first, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of the whole stream, prefill included."""
        return self.tokens / max(self.end - self.start, 1e-9)

    def as_dict(self) -> dict[str, float]:
        return {"prefill_s": round(self.first - self.start, 4), "decode_s": round(self.end - self.first, 4),
                "total_s": round(self.end - self.start, 4),
                "prompt_tokens_per_s": round(self.prompt_tokens_per_s, 2),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 2), "tokens_per_s": round(self.tokens_per_s, 2)}
