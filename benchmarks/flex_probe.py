"""Which FlexAttention calls compile on this GPU: short query counts, with and without forcing the main kernel.

    python3 benchmarks/flex_probe.py results.json        # on the GPU machine; about a minute

Why: `benchmarks/copy_phase.py` (79 tokens a sequence) crashed inside `torch.compile(flex_attention)` with
``NoValidChoicesError`` on the H200 (torch 2.11, Triton 3.6). This compiles each case afresh (bf16, GQA 2:1,
causal) and records "ok" or the error's first line. On 2026-12-02 every call under 128 queries failed, forward
and backward, at head sizes 32 and 64, unless ``kernel_options={"FORCE_USE_FLEX_ATTENTION": True}``; hence
`sambay.ops.flex_attention._kernel_options`. Raw result: docs/results/flex-short-query-probe-h200.json.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

# (queries, head size, value head size, with backward, forced onto the main kernel)
CASES = [(79, 32, 64, grad, force) for grad in (False, True) for force in (False, True)] + [
    (79, 32, 32, False, False), (79, 32, 32, False, True), (128, 32, 64, False, False), (79, 64, 128, False, False)]


def causal(row, head, qi, kj):
    return kj <= qi


def probe(t: int, hd: int, dv: int, grad: bool, force: bool) -> dict:
    """Compiles and runs one case from a clean Dynamo cache; the outcome and the seconds it took."""
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False)
    q, k, v = (torch.randn(32, heads, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
               for heads, d in ((2, hd), (1, hd), (1, dv)))
    mask = create_block_mask(causal, None, None, t, t, device="cuda")
    started = time.perf_counter()
    try:
        with torch.set_grad_enabled(grad):
            out = compiled(q, k, v, block_mask=mask, enable_gqa=True,
                           kernel_options={"FORCE_USE_FLEX_ATTENTION": True} if force else None)
            if grad:
                out.sum().backward()
        torch.cuda.synchronize()
        result = "ok"
    except Exception as e:  # the finding is the error itself: record it and go on to the next case
        result = f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
    return {"t": t, "hd": hd, "dv": dv, "grad": grad, "force": force, "result": result,
            "s": round(time.perf_counter() - started, 1)}


def main() -> int:
    results = []
    for case in CASES:
        results.append(probe(*case))
        print(results[-1], flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
