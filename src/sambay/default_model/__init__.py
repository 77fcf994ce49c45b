"""The embedded default model: a 3.7M-parameter SambaY-DA that does integer arithmetic with worked steps.

The directory holds a model in the released format (config.json, safetensors, tokenizer files), so
`sambay.load_model` / `sambay.tokenizer.load_tokenizer` and every CLI command read it like a released
checkpoint; it is what the CLI uses when no ``--model`` is given. It answers "What is 308+94?"-style
questions about ``a + b``, ``a - b`` and ``a * b`` with operands of up to three digits, reasoning
digit by digit inside ``<think>`` (the task: `sambay.train.arithmetic`).

How it was made (one H200, preset ``sambay-da-arith``, 150k generated problems)::

    python scripts/make_arithmetic_data.py --out data/arithmetic
    sambay train scripts/arithmetic.toml --prepare-only
    sambay train scripts/arithmetic.toml --final-model-dir OUT --max-steps 5000 --max-minutes 3.75 \\
        --peak-tflops 790

The 3.75-minute budget fitted 729 steps of 64 x 512 tokens (23.9M tokens, about 1.4 epochs; 106k
tokens/s). Greedy exact match on the 500 held-out problems (never in train): 98.8% (+ 100%, - 97.0%,
* 99.4%); held-out loss 0.043 nats per token.
"""

from __future__ import annotations

from pathlib import Path


def default_model_dir() -> Path:
    """The directory of the embedded model (config.json, weights and tokenizer files)."""
    return Path(__file__).resolve().parent
