"""Decode throughput of HF transformers' Phi3ForCausalLM, the baseline users run today for the non-flash sibling.

Run as its own process (`python -m sambay.bench.hf_baseline --mode eager|compile`) so that one mode's
compile caches and allocator state cannot leak into another's numbers. Random bf16 weights with
Phi-4-mini-reasoning's dimensions (hidden 3072, 32 layers, 24 heads, 8 KV heads, intermediate 8192,
vocab 200064). The step time is measured at a fixed context: a prompt of ``context`` tokens is
prefilled, then ``steps`` greedy tokens are generated one forward at a time; only those are timed.
"compile" is HF's documented recipe: a StaticCache and ``torch.compile(mode="reduce-overhead")``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

PHI4_MINI = dict(hidden_size=3072, num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8,
                 intermediate_size=8192, vocab_size=200064, max_position_embeddings=131072)


def _model(dims: dict, device: str):
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(**dims, tie_word_embeddings=True, pad_token_id=0)
    with torch.device(device):
        model = Phi3ForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32).eval()
    return model


@torch.inference_mode()
def measure(mode: str, batch: int, context: int, steps: int, device: str, dims: dict) -> dict:
    """Seconds per decode step of ``batch`` rows at ``context`` tokens, in eager or compiled mode."""
    from transformers import DynamicCache, StaticCache

    model = _model(dims, device)
    ids = torch.randint(0, dims["vocab_size"], (batch, context), device=device)
    if mode == "compile":
        cache = StaticCache(config=model.config, max_cache_len=context + steps + 8)
        forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    else:
        cache = DynamicCache()
        forward = model.forward
    out = model(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(context, device=device))
    token = out.logits[:, -1:].argmax(-1)

    def step(pos: int):
        logits = forward(token, past_key_values=cache, use_cache=True,
                         cache_position=torch.tensor([pos], device=device)).logits
        return logits[:, -1:].argmax(-1)

    warm = 3 if mode == "compile" else 1
    for i in range(warm):  # compile and capture outside the timed region
        token = step(context + i)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(warm, warm + steps):
        token = step(context + i).clone()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    return {"system": f"hf-phi3-{mode}", "batch": batch, "context": context, "step_s": seconds,
            "tokens_per_s": batch / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["eager", "compile"], required=True)
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--tiny", action="store_true", help="tiny dimensions, for a CPU smoke test")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dims = dict(PHI4_MINI)
    if args.tiny:
        dims.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, vocab_size=512)
    for b in args.batch:
        try:
            print(json.dumps(measure(args.mode, b, args.context, args.steps, device, dims)), flush=True)
        except torch.OutOfMemoryError:
            print(json.dumps({"system": f"hf-phi3-{args.mode}", "batch": b, "context": args.context,
                              "error": "out of memory"}), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
