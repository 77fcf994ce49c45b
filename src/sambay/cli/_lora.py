"""``--lora DIR`` for `sambay generate` and `sambay chat`: one PEFT-format LoRA adapter, merged into the weights.

The adapter is read and checked before the model loads (a bad file costs no loading time), then checked
against the loaded model and folded into its weights (`sambay.lora.merge_adapter`): generation then runs
the plain model at full speed. Errors are one line (`sambay.lora.AdapterError`, exit 1).
"""

from __future__ import annotations

import argparse

from sambay.generate import Engine
from sambay.lora import Adapter, apply_adapter, read_adapter


def add_lora_argument(parser: argparse.ArgumentParser) -> None:
    """--lora DIR."""
    parser.add_argument("--lora", metavar="DIR", help="apply a LoRA adapter (PEFT format: adapter_config.json + "
                        "adapter_model.safetensors), e.g. the output of sambay train --lora-rank")


def read_lora(args: argparse.Namespace) -> Adapter | None:
    """The adapter ``--lora`` names, read and checked on its own (None without the flag)."""
    return None if args.lora is None else read_adapter(args.lora)


def apply_lora(engine: Engine, adapter: Adapter | None) -> None:
    """Fold ``adapter`` into the engine's freshly loaded model (before any generation, or sharding); on a
    quantised model (QLoRA) it stays unmerged (`sambay.lora.apply_adapter`)."""
    if adapter is not None:
        apply_adapter(engine.model, adapter)
