"""Load a checkpoint in the released Phi-4-mini-flash format, run a full forward and a cached greedy decode.

    python examples/quickstart.py [MODEL_DIR]

Without MODEL_DIR it uses the tiny golden-parity checkpoint shipped with the tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import sambay

DEFAULT = Path(__file__).resolve().parent.parent / "tests" / "data" / "phi4flash-tiny" / "checkpoint"


def main() -> None:
    model = sambay.load_model(sys.argv[1] if len(sys.argv) > 1 else DEFAULT, dtype=torch.float32)
    config = model.config
    print(f"{config.n_layers} layers: {' '.join(kind.name for kind in config.plan)}")
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.inference_mode():
        print("full forward logits:", tuple(model(ids).shape))
        cache = model.new_cache(batch_size=1, max_length=64)
        logits = model(ids, cache)  # prefill; the cross-decoder runs on the last token only
        generated = []
        for _ in range(8):
            token = logits[:, -1].argmax(-1, keepdim=True)
            generated.append(token.item())
            logits = model(token, cache)
    print("greedy continuation:", generated)
    print(f"cache: {cache.nbytes:,} bytes for {cache.seqlens.item()} tokens "
          f"({len(cache.mamba)} Mamba states, {len(cache.sliding)} sliding windows, {len(cache.full)} shared KV)")


if __name__ == "__main__":
    main()
