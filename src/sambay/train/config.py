"""`TrainConfig`: the run's hyperparameters (never the architecture), read from TOML plus overrides.

The architecture is named by `model` (a key of `sambay.config.PRESETS`) or read from `init_from`
(a released-format directory, for fine-tuning); everything else a run needs is a field here. A TOML
file holds any subset of the fields at top level; `load_train_config` applies overrides on top (the
CLI turns `--max-steps 100` into ``{"max_steps": 100}``) and rejects unknown names.

The comments in the class body are the fields' documentation, for the reader of this file and for
``sambay train --help`` alike: `field_docs` reads them (section comment lines and each field's trailing
comment), and a test requires one on every field.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(kw_only=True)
class TrainConfig:
    """Hyperparameters of one training or fine-tuning run."""

    # model
    model: str = "sambay-da-tiny"  # preset name in sambay.config.PRESETS (ignored with init_from)
    init_from: str | None = None  # released-format model directory to start from (SFT)
    tokenizer: str | None = None  # directory with tokenizer.json / tokenizer_config.json; unset: init_from
    # objective and LoRA (sambay.lora: adapters saved in PEFT's format, the base frozen)
    objective: str = "lm"  # "lm" (next-token loss: pretraining, SFT) or "dpo" (prompt/chosen/rejected JSONL pairs)
    dpo_beta: float = 0.1  # DPO: β, the strength of the tie to the reference model (the initial weights)
    dpo_sft_weight: float = 0.0  # DPO: weight of the chosen reply's per-token NLL added to the loss (RPO; 0: off)
    lora_rank: int = 0  # LoRA rank r (0: train every weight); the output is then an adapter directory
    lora_alpha: float = 0.0  # LoRA updates are scaled by lora_alpha / lora_rank (0: lora_alpha = lora_rank)
    lora_targets: list[str] = field(default_factory=lambda: ["all"])  # attention mamba gmu mlp all, or mamba.x_proj ...
    quantize_base: int = 0  # QLoRA: quantise the float base's big projections to 4 or 8 bits on load (0: keep them)
    quantize_group_size: int = 128  # inputs per scale of quantize_base (as sambay quantize --group-size)
    # data
    train_files: list[str] = field(default_factory=list)  # .txt (one document each) or .jsonl ({"text"} / {"messages"})
    eval_files: list[str] = field(default_factory=list)  # held-out files; none: hold out heldout_fraction of train
    heldout_fraction: float = 0.01  # share of training documents held out when eval_files is empty
    data_dir: str | None = None  # where token shards go (reused while inputs are unchanged); unset: out_dir/data
    seq_len: int = 512  # tokens per training sequence (documents are packed)
    # batch: global batch = micro_batch_size * grad_accum * world size sequences
    micro_batch_size: int = 8  # sequences per forward/backward (on the CPU: split to fit, see train.memory)
    grad_accum: int = 1  # micro-batches per optimiser step
    # optimiser (AdamW; weight decay on matrices only)
    max_steps: int = 1000  # optimiser steps
    max_minutes: float = 0.0  # training time budget (0: none); fits max_steps to it, see sambay.train.loop
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr as a fraction of lr
    schedule: str = "cosine"  # "cosine", "wsd" (warmup-stable-decay) or "constant"
    warmup_steps: int = 100  # linear warmup from 0 to lr
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly
    weight_decay: float = 0.1  # AdamW decoupled weight decay (matrices only)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # max global gradient norm (0 disables)
    # precision, speed, parallelism
    device: str = "auto"  # "auto", "cpu" or "cuda"
    dtype: str = "auto"  # autocast: "bfloat16", "float32" (none) or "auto" (bfloat16 on CUDA, float32 on the CPU)
    compile: bool = False  # torch.compile each block
    activation_checkpointing: bool = False  # recompute each block in backward
    scan_kernel: str = "auto"  # training scan: "triton" (Triton, with a backward), "reference", "auto" (triton on GPUs)
    attention_kernel: str = "auto"  # training attention: "flex" (FlexAttention, GPU), "reference", "auto" (flex on GPU)
    parallel: str = "ddp"  # with several processes: "ddp" or "fsdp"
    # evaluation, logging, checkpoints
    out_dir: str = "runs/default"  # run directory: log.jsonl, checkpoints/, data/, model/
    eval_every: int = 100  # steps between held-out evaluations (0: only at the end)
    eval_batches: int = 8  # micro-batches of held-out data per evaluation
    generate_eval: int = 0  # at the end: held-out chat examples scored by greedy exact match
    max_new_tokens: int = 512  # generation budget of that evaluation
    log_every: int = 10  # steps between log.jsonl records and progress lines
    peak_tflops: float = 0.0  # the accelerator's dense peak (H200 bf16: ~790) for the logged MFU; 0: not logged
    tensorboard: bool = False  # also write TensorBoard events (needs the `tensorboard` package)
    checkpoint_every: int = 100  # steps between training checkpoints (0: never)
    keep_checkpoints: int = 2  # newest training checkpoints kept on disk
    resume: bool = True  # continue from out_dir/checkpoints; off: move its checkpoints to checkpoints.old-N
    final_model_dir: str | None = None  # released-format output; unset: out_dir/model
    save_dtype: str = "bfloat16"  # dtype of the released-format weights
    seed: int = 0  # seeds the initialisation and the data order

    def __post_init__(self) -> None:
        choices = {"schedule": ("cosine", "wsd", "constant"), "parallel": ("ddp", "fsdp"),
                   "device": ("auto", "cpu", "cuda"), "dtype": ("auto", "bfloat16", "float32"),
                   "save_dtype": ("bfloat16", "float32"), "scan_kernel": ("auto", "reference", "triton"),
                   "attention_kernel": ("auto", "reference", "flex")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("seq_len", "micro_batch_size", "grad_accum", "max_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_minutes < 0 or self.peak_tflops < 0:
            raise ValueError("max_minutes and peak_tflops must be >= 0")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.objective not in ("lm", "dpo"):
            raise ValueError(f"TrainConfig.objective must be 'lm' or 'dpo', got {self.objective!r}")
        if self.lora_rank < 0 or self.lora_alpha < 0 or not self.dpo_beta > 0 or not self.dpo_sft_weight >= 0:
            raise ValueError("lora_rank, lora_alpha and dpo_sft_weight must be >= 0 and dpo_beta > 0")
        if self.lora_rank:
            from sambay.lora.targets import resolve_targets  # imports the model classes: only for LoRA runs

            resolve_targets(self.lora_targets)
        self._check_quantized_base()

    def _check_quantized_base(self) -> None:
        """QLoRA's rules: a quantised base (``quantize_base``, or an ``init_from`` written by `sambay quantize`)
        trains adapters only; quantize_base needs a float base and a valid spec."""
        quantized_init = False
        if self.init_from:
            from sambay.quant import QUANT_FILE  # imports the model classes: only for runs that load a base

            base = Path(self.init_from)
            quantized_init = ((base if base.is_dir() else base.parent) / QUANT_FILE).is_file()
        if self.quantize_base not in (0, 4, 8):
            raise ValueError(f"TrainConfig.quantize_base must be 0, 4 or 8, got {self.quantize_base}")
        if quantized_init and not self.lora_rank:
            raise ValueError(f"init_from {self.init_from} is quantised (int8 / int4): its weights cannot be trained "
                             "directly; train LoRA adapters on it (--lora-rank R, QLoRA) or fine-tune the float "
                             "checkpoint it came from")
        if self.quantize_base and not self.lora_rank:
            raise ValueError("quantize_base trains LoRA adapters on a quantised base (QLoRA): set lora_rank too "
                             "(full fine-tuning needs the float weights)")
        if self.quantize_base and quantized_init:
            raise ValueError(f"quantize_base: init_from {self.init_from} is quantised already")
        if self.quantize_base:
            from sambay.quant import QuantSpec  # checks the group size

            QuantSpec(bits=self.quantize_base, group_size=self.quantize_group_size)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.out_dir) / "checkpoints"

    @property
    def model_dir(self) -> Path:
        """Where the result goes: released-format weights, or for a LoRA run the adapter (out_dir/adapter)."""
        return Path(self.final_model_dir or Path(self.out_dir) / ("adapter" if self.lora_rank else "model"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_types() -> dict[str, type]:
    """Field name -> the plain type of its values (``str | None`` -> str, ``list[str]`` -> list)."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for name, hint in hints.items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        origin = typing.get_origin(hint)
        out[name] = list if origin is list else (args[0] if args else hint)
    return out


def field_docs() -> dict[str, tuple[str, str]]:
    """Field name -> (section, help): the comment line above its group and its own trailing comment.

    Read from the source of `TrainConfig` with `tokenize`, so a ``#`` inside a string is no comment.
    A field without a comment gets "".
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    lines: dict[int, list[tokenize.TokenInfo]] = {}
    skip = {tokenize.INDENT, tokenize.DEDENT, tokenize.NL, tokenize.NEWLINE}
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(TrainConfig)).readline):
        if tok.type not in skip:
            lines.setdefault(tok.start[0], []).append(tok)
    section, out = "", {}
    for toks in lines.values():
        if toks[0].type == tokenize.COMMENT:
            section = toks[0].string.lstrip("# ").strip()
        elif toks[0].string in names and len(toks) > 1 and toks[1].string == ":":
            comment = toks[-1].string.lstrip("# ").strip() if toks[-1].type == tokenize.COMMENT else ""
            out[toks[0].string] = (section, comment)
    return out


def load_train_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A `TrainConfig` from a TOML file (optional) with ``overrides`` applied on top.

    Relative paths in the file (data files, tokenizer, init_from and the output directories) are
    resolved against the file's directory, so a config can sit next to its data.

    Raises:
        ValueError: an unknown field name, or a value of the wrong type.
    """
    values: dict[str, Any] = {}
    if path is not None:
        values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        base = Path(path).resolve().parent
        for name in ("train_files", "eval_files"):
            if name in values:
                values[name] = [str((base / p).resolve()) for p in values[name]]
        for name in ("tokenizer", "init_from", "out_dir", "data_dir", "final_model_dir"):
            if values.get(name):
                values[name] = str((base / values[name]).resolve())
    values.update(overrides or {})
    types = field_types()
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
    for name, value in values.items():
        expected = types[name]
        ok = value is None or isinstance(value, expected) or (expected is float and isinstance(value, int))
        if not ok or (expected is not bool and isinstance(value, bool)):
            raise ValueError(f"TrainConfig.{name} must be {expected.__name__}, got {value!r}")
    return TrainConfig(**values)
