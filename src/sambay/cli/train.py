"""`sambay train CONFIG.toml [--field value ...]`: pretrain or fine-tune with the built-in trainer.

Every `TrainConfig` field is also a flag (``max_steps`` -> ``--max-steps``; booleans as
``--compile`` / ``--no-compile``; lists take several values) and overrides the TOML file. Examples::

    sambay train scripts/arithmetic.toml --final-model-dir out/arith
    sambay train --init-from MODEL_DIR --train-files chats.jsonl --max-steps 500 --lr 1e-5   # SFT
    torchrun --nproc-per-node 8 -m sambay.cli train run.toml --parallel fsdp                  # 8 GPUs

The run writes ``out_dir/log.jsonl``, resumable checkpoints under ``out_dir/checkpoints`` and the
final weights in the released format (``final_model_dir``, default ``out_dir/model``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from sambay.train.config import TrainConfig, field_types, load_train_config

HELP = "train or fine-tune a model (TOML config + flags)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="TOML file with TrainConfig fields (optional)")
    types = field_types()
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = types[field.name]
        if kind is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None)
        elif kind is list:
            parser.add_argument(flag, dest=field.name, nargs="+", default=None, metavar="PATH")
        else:
            parser.add_argument(flag, dest=field.name, type=kind, default=None, metavar=kind.__name__.upper())
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--prepare-only", action="store_true", help="tokenize the data into shards and exit")


def main(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    config = load_train_config(args.config, {k: v for k, v in overrides.items() if v is not None})
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    if args.prepare_only:
        from sambay.train.setup import Runtime, build_data, build_tokenizer

        build_data(config, build_tokenizer(config), Runtime(rank=0, world=1, device=None))
        return 0
    from sambay.train.loop import train  # torch.distributed & co. only when training

    final = train(config)
    print(json.dumps({"model_dir": str(config.model_dir), **final}))
    return 0
