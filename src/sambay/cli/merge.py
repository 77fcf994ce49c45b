"""`sambay merge BASE ADAPTER OUT`: fold a LoRA adapter into a model, written in the released format.

    sambay merge Phi-4-mini-flash-reasoning runs/lora/adapter merged/     W ← W + (alpha / r) · B A
    sambay generate --model merged/ "..."                                  the same as --lora, at no cost

ADAPTER is a directory in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`), ours or
anyone's whose target modules exist in BASE. The adapter is checked before the base loads. Each update
is computed in fp32 and rounded once to the base's dtype (``--dtype`` chooses another); OUT gets the
weights (sharded safetensors and index), ``config.json`` and BASE's tokenizer and generation files.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

HELP = "fold a LoRA adapter (PEFT format) into a model"
_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_COPIED = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", metavar="BASE", help="model directory in the released format")
    parser.add_argument("adapter", metavar="ADAPTER", help="LoRA adapter directory (PEFT format)")
    parser.add_argument("out", metavar="OUT", help="output model directory")
    parser.add_argument("--dtype", default="auto", choices=list(_DTYPES), help="dtype of the written weights "
                        "(auto: the base checkpoint's)")


def main(args: argparse.Namespace) -> int:
    from sambay.checkpoint import load_model, model_directory, save_model
    from sambay.cli._common import UsageError
    from sambay.lora import merge_adapter, read_adapter

    base, out = model_directory(args.base), Path(args.out)
    if out.resolve() == base.resolve():
        raise UsageError("OUT must differ from BASE: the merged weights would overwrite the base")
    adapter = read_adapter(args.adapter)  # before loading the base, which takes a while
    model = load_model(base, dtype=_DTYPES[args.dtype], backend="reference")
    merge_adapter(model, adapter)
    save_model(model, out)
    for name in _COPIED:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    layers = len(adapter.layers)
    print(f"merged {layers} adapted layers of {adapter.directory} into {base}: wrote {out} ({model.dtype})")
    return 0
