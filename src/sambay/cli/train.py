"""`sambay train CONFIG.toml [--field value ...]`: pretrain or fine-tune with the built-in trainer.

Every `TrainConfig` field is also a flag (``max_steps`` -> ``--max-steps``; booleans as
``--compile`` / ``--no-compile``; lists take several values). The defaults listed below are
`TrainConfig`'s; a TOML file's values replace them, and flags replace both (``--print-config`` shows
the result). Examples::

    sambay train scripts/arithmetic.toml --final-model-dir out/arith
    sambay train --init-from MODEL_DIR --train-files chats.jsonl --max-steps 500 --lr 1e-5   # SFT
    sambay train --init-from MODEL_DIR --train-files chats.jsonl --lora-rank 16 --lr 2e-4    # LoRA SFT
    sambay train --init-from MODEL_DIR --train-files pairs.jsonl --objective dpo --lora-rank 16  # DPO
    torchrun --nproc-per-node 8 -m sambay.cli train run.toml --parallel fsdp                  # 8 GPUs

The run writes ``out_dir/log.jsonl``, resumable checkpoints under ``out_dir/checkpoints`` and the
final weights in the released format (``final_model_dir``, default ``out_dir/model``), or with
``--lora-rank`` the adapter in PEFT's format (default ``out_dir/adapter``; `sambay merge` folds it in). While it runs it
prints to stderr what it is doing and its progress (a live bar on a terminal; otherwise one line per
logged step: step, loss, lr, tokens/s, elapsed, ETA); stdout gets one JSON line with the final metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from sambay.cli._output import make_console
from sambay.train.config import TrainConfig, field_docs, field_types, load_train_config
from sambay.train.progress import Reporter

HELP = "train or fine-tune a model (TOML config + flags)"


def _default(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return " ".join(value) or "none"
    return str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The TOML path, one flag per `TrainConfig` field (grouped as in the class, help from its comments), modes."""
    parser.add_argument("config", nargs="?", help="TOML file with TrainConfig fields (default: none, flags only)")
    types, docs, groups = field_types(), field_docs(), {}
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        section, text = docs[field.name]
        group = groups.get(section) or groups.setdefault(section, parser.add_argument_group(section))
        flag, kind = "--" + field.name.replace("_", "-"), types[field.name]
        help_text = f"{text} (default: {_default(getattr(defaults, field.name))})".replace("%", "%%")
        # default None everywhere: a flag given overrides the TOML file, one not given leaves it alone
        if kind is bool:
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        elif kind is list:
            group.add_argument(flag, dest=field.name, nargs="+", default=None, help=help_text,
                               metavar="PATH" if field.name.endswith("_files") else "NAME")
        else:
            group.add_argument(flag, dest=field.name, type=kind, default=None, metavar=kind.__name__.upper(),
                               help=help_text)
    modes = parser.add_argument_group("modes")
    modes.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    modes.add_argument("--prepare-only", action="store_true", help="tokenize the data into shards and exit")


def main(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    config = load_train_config(args.config, {k: v for k, v in overrides.items() if v is not None})
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    reporter = Reporter(make_console(stderr=True))  # progress on stderr; stdout keeps the result
    if args.prepare_only:
        from sambay.train.setup import Runtime, build_data, build_tokenizer

        build_data(config, build_tokenizer(config), Runtime(rank=0, world=1, device=None), reporter)
        return 0
    from sambay.train.loop import train  # torch.distributed & co. only when training

    try:
        final = train(config, reporter)
    finally:
        reporter.stop()  # restores the terminal when a run fails or is interrupted under the live bar
    print(json.dumps({"model_dir": str(config.model_dir), **final}))
    return 0
