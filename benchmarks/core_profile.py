"""Where a served step's time goes, in process (no HTTP): the engine core against the offline decode step.

    eval "$(bash benchmarks/device_setup.sh)"
    python3 benchmarks/core_profile.py --batch 1 16 64 --prompt-tokens 2048 --max-tokens 1024

On the full-size random model (bf16, built on the GPU: no checkpoint), for each batch C: C requests of
``--prompt-tokens`` token ids and ``--max-tokens`` greedy tokens through `EngineCore` (synchronous and
asynchronous scheduling), timing the decode phase (steps with no prefill) per step, beside the offline
fixed-context CUDA-graph step at batch C and the mean context (`sambay.bench.runs`). Before that, a lone
request on the warm core twice (TTFT: the second shows what the first paid), with every Triton
compilation after warm-up printed (a warm-up that missed a specialisation).

With ``--json-schema FILE`` every request carries that schema (`GuidedDecoding.from_schema`; the
grammar applies from the first token, as in ``serve_sweep.py --json-schema``), so each step also
computes the grammar's masks: the in-process half of issue 17's cost. ``--cprofile`` then shows where
the host's time goes in the constrained decode phase.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton

import sambay
from sambay.bench.runs import decode_step_seconds
from sambay.config import PRESETS
from sambay.generate import Engine, SamplingParams
from sambay.generate.core import EngineCore
from sambay.generate.guided import GuidedDecoding
from sambay.generate.requests import SchedulerConfig
from sambay.tokenizer import load_tokenizer

RELEASED = Path(__file__).resolve().parent.parent / "tests" / "data" / "phi-4-mini-flash-reasoning"


def phases(core: EngineCore) -> tuple:
    """(name, owner) of each timed method: planning, the launch, and inside it the masks and sampling."""
    return (("schedule", core.scheduler), ("_launch", core), ("_masks", core), ("_sample", core),
            ("_finish", core), ("update", core.scheduler))


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(1000, 100000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class HostClock:
    """Host seconds spent in the core's phases (monkeypatched wrappers): plan, launch, wait, deliver."""

    def __init__(self, core: EngineCore):
        self.totals: dict[str, float] = {}
        for name, owner in phases(core):
            setattr(owner, name, self._timed(name, getattr(owner, name)))

    def _timed(self, name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0
        return wrapper


def run(core: EngineCore, batch: int, prompt: int, max_tokens: int, overlap: bool, guided=None) -> dict:
    """C requests at once; returns TTFT of the last, and the decode-phase seconds per step."""
    params = SamplingParams(temperature=0, max_new_tokens=max_tokens, stop_token_ids=(), guided=guided)
    done, first = [], {}

    def sink(i):
        def put(output):
            if output.deltas and i not in first:
                first[i] = time.perf_counter()
            if output.finished:
                done.append(i)
        return put

    for i in range(batch):
        core.submit(_prompt(prompt, i), params, sink(i))
    start = time.perf_counter()
    steps, decode_start, decode_steps, clock = 0, None, 0, None
    while len(done) < batch:
        core.step(overlap)
        steps += 1
        if decode_start is None and len(first) >= batch:
            torch.cuda.synchronize()
            decode_start, decode_steps = time.perf_counter(), steps
        if decode_start is not None and clock is None:
            clock = HostClock(core)
    torch.cuda.synchronize()
    end = time.perf_counter()
    n = steps - decode_steps
    host = {k: round(v / max(n, 1) * 1e3, 3) for k, v in clock.totals.items()} if clock else {}
    for name, owner in phases(core):  # unwrap
        owner.__dict__.pop(name, None)
    return {"batch": batch, "overlap": overlap, "ttft_s": round(max(first.values()) - start, 4) if first else None,
            "decode_step_ms": round((end - decode_start) / max(n, 1) * 1e3, 3), "decode_steps": n,
            "host_ms_per_step": host}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--cprofile", action="store_true", help="profile the host side of the largest batch, then stop")
    p.add_argument("--json-schema", type=Path, help="every request's answer follows this JSON Schema")
    args = p.parse_args()
    guided = GuidedDecoding.from_schema(json.loads(args.json_schema.read_text())) if args.json_schema else None
    with torch.device("cuda"):
        model = sambay.SambaY(PRESETS["phi4-mini-flash"]).init_weights(torch.Generator("cuda").manual_seed(0))
    model = model.to_dtype(torch.bfloat16).eval()
    config = SchedulerConfig(slots=args.slots, max_length=args.prompt_tokens + args.max_tokens + 64,
                             max_waiting=1024)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(RELEASED) if guided is not None else None  # a grammar reads the tokens' text
    core = EngineCore(Engine(model, tokenizer), config)
    print(f"core ready in {time.perf_counter() - t0:.1f} s", flush=True)
    compiled = []
    triton.knobs.runtime.jit_post_compile_hook = lambda *a, **k: compiled.append(str(k.get("fn", a[:1])))
    for attempt in range(2):
        lone = run(core, 1, args.prompt_tokens, 4, overlap=True)
        print(json.dumps({"lone_request": attempt, **lone, "compiled_after_warm_up": compiled}), flush=True)
        compiled.clear()
    if args.cprofile:  # where the host's time goes in the decode phase of the largest batch
        import cProfile
        import pstats

        c = max(args.batch)
        if guided is not None:  # the same batch unconstrained first: the cost of the grammar, in one process
            print(json.dumps({"guided": False, **run(core, c, args.prompt_tokens, args.max_tokens, True)}), flush=True)
        print(json.dumps({"guided": guided is not None,
                          **run(core, c, args.prompt_tokens, args.max_tokens, True, guided)}), flush=True)
        profiler = cProfile.Profile()
        profiler.enable()
        run(core, c, args.prompt_tokens, args.max_tokens, True, guided)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
        return 0
    rows = []
    for c in args.batch:
        for overlap in (False, True):
            r = run(core, c, args.prompt_tokens, args.max_tokens, overlap, guided)
            context = args.prompt_tokens + args.max_tokens // 2
            r["offline_step_ms"] = round(decode_step_seconds(model, c, context, 30, graphs=True) * 1e3, 3)
            print(json.dumps(r), flush=True)
            rows.append(r)
    print("| batch | async | decode step ms (core) | offline step ms | core / offline |")
    for r in rows:
        print(f"| {r['batch']} | {r['overlap']} | {r['decode_step_ms']} | {r['offline_step_ms']} | "
              f"{r['decode_step_ms'] / r['offline_step_ms']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
