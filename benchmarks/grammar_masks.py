"""Token-mask cost of a JSON schema (issue 17): llguidance's masks for a batch of rows deep inside the answer,
against the executor's thread count.

    PYTHONPATH=src python3 benchmarks/grammar_masks.py benchmarks/schemas/steps.json --rows 16 --steps 40

The rows are driven ``--steps`` tokens into the grammar by picking, at each step, the best-scoring allowed
token under random scores (what greedy decoding of a random model does: long, varied strings), with the
release's tokenizer (o200k, 200,029 tokens). Then the masks of all rows, computed in one
`unsafe_compute_mask_ptr` call, are timed for each thread count (fresh copies of the matchers each time,
so no mask is cached): the host time a constrained decode step adds when it is not hidden behind the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import llguidance
import numpy as np

from sambay.generate.guided import GuidedDecoding, grammar_compiler
from sambay.tokenizer import load_tokenizer

RELEASED = Path(__file__).resolve().parent.parent / "tests" / "data" / "phi-4-mini-flash-reasoning"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("schema", type=Path)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8, 12, 0], help="0: llguidance's default")
    args = p.parse_args()
    tokenizer = load_tokenizer(RELEASED)
    compiler = grammar_compiler(tokenizer, sorted(tokenizer.stop_token_ids()))
    guided = GuidedDecoding.from_schema(json.loads(args.schema.read_text()))
    rng = np.random.default_rng(0)
    matchers = [(compiler.matcher(guided), i) for i in range(args.rows)]
    mask = np.zeros((args.rows, compiler.words), dtype=np.int32)
    for _ in range(args.steps):
        compiler.fill_bitmasks(matchers, mask)
        allowed = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little").astype(bool)
        for r, (m, _) in enumerate(matchers):
            scores = np.where(allowed[r], rng.standard_normal(allowed.shape[1]), -np.inf)
            assert m.consume_token(int(scores.argmax()))
    result = {"schema": str(args.schema), "rows": args.rows, "steps": args.steps, "cpus": os.cpu_count(), "ms": {}}
    for threads in args.threads:
        executor = llguidance.LLExecutor(num_threads=threads) if threads else llguidance.LLExecutor()
        best = float("inf")
        for _ in range(3):
            fresh = [(m.deep_copy(), i) for m, i in matchers]
            start = time.perf_counter()
            executor.unsafe_compute_mask_ptr(fresh, mask.ctypes.data, compiler.words * 4, args.rows)
            best = min(best, time.perf_counter() - start)
        result["ms"][threads or "default"] = round(best * 1e3, 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
