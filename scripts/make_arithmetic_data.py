"""Writes the arithmetic demo: train/held-out chat JSONL, a small BPE tokenizer, and nothing else.

    python scripts/make_arithmetic_data.py --out data/arithmetic [--train 150000 --heldout 500]

Produces ``train.jsonl`` and ``heldout.jsonl`` (``{"messages": [user, assistant], "answer": ...}`` per
line; the held-out questions never occur in train, fixed by the seeds) and ``tokenizer/`` (tokenizer.json,
tokenizer_config.json, generation_config.json) trained on the training chats. Problems and worked
solutions are defined in `sambay.train.arithmetic`; `scripts/arithmetic.toml` trains on the output.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sambay.train.arithmetic import make_split, render, train_tokenizer

HELDOUT_SEED, TRAIN_SEED = 1, 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/arithmetic", help="output directory")
    parser.add_argument("--train", type=int, default=150_000, help="training problems")
    parser.add_argument("--heldout", type=int, default=500, help="held-out problems (fixed split)")
    parser.add_argument("--vocab-size", type=int, default=384, help="BPE vocabulary, bytes included")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    heldout = make_split(args.heldout, HELDOUT_SEED)
    exclude = {e["messages"][0]["content"].replace(" ", "") for e in heldout}
    train = make_split(args.train, TRAIN_SEED, exclude=exclude)
    for name, examples in (("heldout", heldout), ("train", train)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in examples)
    train_tokenizer((render(e["messages"]) for e in train[:20_000]), out / "tokenizer", args.vocab_size)
    print(f"wrote {len(train)} train and {len(heldout)} held-out problems and a tokenizer to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
