"""Writes the LoRA / DPO demo data for the embedded arithmetic model: SFT chats and preference pairs.

    python scripts/make_preference_pairs.py --out data/pairs [--sft 512 --train 256 --heldout 32]

The behaviour taught is how the reply ends: with the whole equation (``308+94=402``) rather than the
bare result (``402``), the embedded model's habit. ``sft.jsonl`` holds chats (``{"messages"}``) that end
in the equation, for LoRA SFT; ``train.jsonl`` / ``heldout.jsonl`` hold DPO pairs ``{"prompt", "chosen",
"rejected"}`` of other questions: twice the same worked solution, the chosen one ending in the equation,
the rejected one in the bare result. The README's "LoRA and DPO" runs both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sambay.train.arithmetic import make_split

HELDOUT_SEED, TRAIN_SEED, SFT_SEED = 11, 12, 13


def pair(example: dict) -> dict:
    """The preference pair of one arithmetic chat example."""
    question, reply = (m["content"] for m in example["messages"])
    reasoning = reply.rpartition("\n")[0]  # ... "so 308+94=402\n</think>"
    equation = reasoning.rpartition("so ")[2].partition("\n")[0]
    return {"prompt": question, "chosen": f"{reasoning}\n{equation}", "rejected": reply}


def chat(example: dict) -> dict:
    """The chat example with its reply ending in the equation."""
    question = example["messages"][0]
    return {"messages": [question, {"role": "assistant", "content": pair(example)["chosen"]}]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/pairs", help="output directory")
    parser.add_argument("--sft", type=int, default=512, help="SFT chats")
    parser.add_argument("--train", type=int, default=256, help="training pairs")
    parser.add_argument("--heldout", type=int, default=32, help="held-out pairs")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    heldout = make_split(args.heldout, HELDOUT_SEED)
    seen = {e["messages"][0]["content"].replace(" ", "") for e in heldout}
    train = make_split(args.train, TRAIN_SEED, exclude=seen)
    sft = make_split(args.sft, SFT_SEED, exclude=seen)
    for name, examples in (("heldout", heldout), ("train", train)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(pair(e), ensure_ascii=False) + "\n" for e in examples)
    with open(out / "sft.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(chat(e), ensure_ascii=False) + "\n" for e in sft)
    print(f"wrote {len(sft)} SFT chats, {len(train)} train and {len(heldout)} held-out preference pairs to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
