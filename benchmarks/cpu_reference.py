"""CPU prefill and decode of the embedded model on the reference ops, against the prompt length.

Each (prompt length, thread count) runs in a fresh process, so its peak resident memory
(``getrusage`` maxrss; tracemalloc does not see torch's allocations) belongs to that run alone. A run
goes through `Engine.stream`, what `sambay generate` runs: a batch-1 random prompt, greedy decoding of
``--new-tokens`` tokens, fp32 weights (what the CLI loads on a CPU). Prefill tokens/s = prompt tokens /
time to the first token; decode tokens/s = the tokens after the first / the time they took; each is the
best of ``--repeats`` runs (the machine may be shared, and contention only ever slows a run down). The
first generation of each process (core and cache construction) is not timed, but its prefill counts
towards the peak memory (it is the same prompt).

``--baseline FILE`` also times another version of the attention references (for example the one
before a change: ``git show HEAD:src/sambay/ops/attention.py > /tmp/attention_old.py``), patched into
`sambay.ops.REFERENCE` before the model is built, and prints both in one table.

    python benchmarks/cpu_reference.py --baseline /tmp/attention_old.py
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import resource
import subprocess
import sys
import time

import torch


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _use_attention_from(path: str) -> None:
    """Swap the attention references of ``path`` into the reference backend (before any model is built)."""
    import sambay.ops

    spec = importlib.util.spec_from_file_location("attention_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sambay.ops.REFERENCE = dataclasses.replace(
        sambay.ops.REFERENCE, diff_attention=module.diff_attention_ref, attention=module.attention_ref
    )


def run_one(args: argparse.Namespace) -> dict:
    """Load the embedded model, generate from one prompt ``args.repeats + 1`` times, report one JSON row."""
    import sambay
    from sambay.default_model import default_model_dir
    from sambay.generate import Engine, SamplingParams

    torch.set_num_threads(args.threads)
    if args.attention:
        _use_attention_from(args.attention)
    dtype = getattr(torch, args.dtype)
    model = sambay.load_model(default_model_dir(), dtype=dtype, backend="reference", progress=False)
    loaded_mb = _peak_rss_mb()
    engine = Engine(model)
    params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens, stop_token_ids=())
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (args.length,), generator=g).tolist()
    list(engine.stream([prompt], params.replace(max_new_tokens=2)))  # builds the core and its cache
    prefill, decode = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        stream = engine.stream([prompt], params)
        next(stream)
        t1 = time.perf_counter()
        for _ in stream:
            pass
        prefill.append(t1 - t0)
        decode.append(time.perf_counter() - t1)
    return {
        "length": args.length,
        "threads": args.threads,
        "prefill_tok_s": args.length / min(prefill),
        "decode_tok_s": (args.new_tokens - 1) / min(decode),
        "loaded_mb": loaded_mb,
        "peak_mb": _peak_rss_mb(),
    }


def _child(args: argparse.Namespace, length: int, threads: int, attention: str | None) -> dict:
    cmd = [sys.executable, __file__, "--one", "--length", str(length), "--threads", str(threads),
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--dtype", args.dtype]
    if attention:
        cmd += ["--attention", attention]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _table(rows: list[dict], variants: list[str]) -> str:
    """Markdown: one line per (threads, length), a column group per variant."""
    head = ["threads", "prompt"]
    for name in variants:
        head += [f"{name} prefill tok/s", f"{name} peak MB", f"{name} decode tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted({(r["threads"], r["length"]) for r in rows})
    for threads, length in keys:
        cells = [str(threads), str(length)]
        for name in variants:
            r = next(r for r in rows if r["variant"] == name and (r["threads"], r["length"]) == (threads, length))
            cells += [f"{r['prefill_tok_s']:,.0f}", f"{r['peak_mb']:,.0f}", f"{r['decode_tok_s']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 3600])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--new-tokens", type=int, default=65, help="generated tokens per run (decode = all but the first)")
    p.add_argument("--repeats", type=int, default=2, help="timed generations per process (the best counts)")
    p.add_argument("--dtype", default="float32", help="parameter dtype (float32: what the CLI uses on a CPU)")
    p.add_argument("--baseline", help="another attention.py to time beside the installed one")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--one", action="store_true", help="(internal) run one length in this process")
    p.add_argument("--length", type=int, help="(internal) prompt length of --one")
    p.add_argument("--attention", help="(internal) attention.py that --one patches in")
    args = p.parse_args()
    if args.one:
        args.threads = args.threads[0]
        print(json.dumps(run_one(args)))
        return 0
    variants = {"current": None} if args.baseline is None else {"baseline": args.baseline, "current": None}
    rows = []
    for threads in args.threads:
        for length in args.lengths:
            for name, attention in variants.items():
                row = {"variant": name, **_child(args, length, threads, attention)}
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"embedded model, torch {torch.__version__}, loaded RSS {rows[0]['loaded_mb']:,.0f} MB\n")
    print(_table(rows, list(variants)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
