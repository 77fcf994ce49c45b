"""Weight-only quantisation quality (issue 14, item 3): int8 / int4, round-to-nearest (RTN) against AWQ.

    PYTHONPATH=src python3 benchmarks/quant_quality.py --out results/quant-quality.json

On the CPU, two models: the parity fixture (tests/data/phi4flash-tiny, random float32 weights, vocab 256)
and the embedded arithmetic model (src/sambay/default_model, bf16 weights). The reference is each model
as stored; every variant (int8 and int4, RTN and AWQ) is quantised from those weights, and all of them
compute in float32 (the CPU reference path), so the figures are the quantisation's error alone. The group
size is the largest power of two up to 128 that divides every projection's inputs (64 for both: their
widths are 64/128 and 192/384/512). Per variant:
- ``kl``: mean KL(reference || quantised) of the next-token distributions, nats, over every position of
  the evaluation sequences (fixture: 8 random sequences of 128 tokens; embedded: the last 100 held-out
  problems with their worked solutions, rendered as chats, packed into 8 rows of 256 tokens);
- ``top1``: the fraction of those positions where the argmax agrees;
- ``greedy``: greedy generation agreement, the fraction of identical tokens (position by position) over
  ``--new-tokens`` tokens generated from 16 prompts (fixture: random 16-token prompts; embedded: held-out
  questions), through the engine, no stop tokens;
- ``exact_match`` (embedded only): greedy exact match on the first ``--problems`` held-out arithmetic
  problems, scored as `sambay.train.evaluate.exact_match` scores them (the split the model was scored on);
- ``layer_err`` (AWQ only): the mean over projections of the relative output error ||Δy||²/||y||² on the
  calibration activations, at α = 0 (RTN) and at the chosen α.
AWQ calibrates on ``--calibration-tokens`` tokens: arithmetic problems from the training split for the
embedded model (never held-out ones), other random sequences for the fixture. One thread by default: on a
shared 2-core machine a second thread mostly waits (see `sambay.cli._common`). About 3 minutes on the
2-core development machine when it is otherwise idle; the results are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from sambay.checkpoint import load_model
from sambay.default_model import default_model_dir
from sambay.quant import QuantSpec, quantize_model
from sambay.quant.awq import calibration_sequences, quantize_model_awq
from sambay.quant.layer import projections
from sambay.tokenizer import load_tokenizer
from sambay.train.arithmetic import make_split, render
from sambay.train.evaluate import exact_match, greedy_generate

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "phi4flash-tiny" / "checkpoint"
HELDOUT_SEED, TRAIN_SEED = 1, 2  # scripts/make_arithmetic_data.py's split
VARIANTS = (("int8", 8, False), ("int8-awq", 8, True), ("int4", 4, False), ("int4-awq", 4, True))


def group_size_for(model) -> int:
    """The largest power of two up to 128 that divides every quantised projection's inputs."""
    size = 128
    while any(linear.in_features % size for _, linear in projections(model)):
        size //= 2
    return size


@torch.no_grad()
def logit_metrics(ref, model, sequences: torch.Tensor) -> dict:
    """Mean KL(ref || model) and top-1 agreement of next-token distributions over every position."""
    kl, agree, n = 0.0, 0, 0
    for row in sequences.split(8):
        p, q = ref(row).float().log_softmax(-1), model(row).float().log_softmax(-1)  # (b, t, vocab)
        kl += (p.exp() * (p - q)).sum(-1).sum().item()
        agree += (p.argmax(-1) == q.argmax(-1)).sum().item()
        n += p.shape[0] * p.shape[1]
    return {"kl": kl / n, "top1": agree / n}


def greedy_agreement(reference: list[list[int]], generated: list[list[int]]) -> float:
    """The fraction of positions, over all rows, where the two greedy continuations hold the same token."""
    same = sum(a == b for ref, gen in zip(reference, generated, strict=True) for a, b in zip(ref, gen, strict=False))
    return same / max(sum(len(ref) for ref in reference), 1)


def fixture_data(model, args) -> dict:
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    return {"calibration": torch.randint(0, vocab, (args.calibration_tokens // 256, 256), generator=g),
            "eval": torch.randint(0, vocab, (8, 128), generator=g),
            "prompts": torch.randint(0, vocab, (16, 16), generator=g).tolist()}


def embedded_data(tokenizer, args) -> dict:
    heldout = make_split(500, HELDOUT_SEED)
    exclude = {e["messages"][0]["content"].replace(" ", "") for e in heldout}
    train = make_split(args.calibration_tokens // 40, TRAIN_SEED, exclude=exclude)  # ~100 tokens a problem
    ids = tokenizer.encode("".join(render(e["messages"]) for e in train))
    evaluation = tokenizer.encode("".join(render(e["messages"]) for e in heldout[-100:]))  # not scored below
    questions = [tokenizer.apply_chat_template(e["messages"][:-1], add_generation_prompt=True) for e in heldout[:16]]
    return {"calibration": calibration_sequences(ids, args.calibration_tokens, 256),
            "eval": calibration_sequences(evaluation, 2048, 256), "prompts": questions,
            "problems": heldout[: args.problems]}


def variant(ref, bits: int, awq: bool, group_size: int, calibration: torch.Tensor) -> tuple:
    model = copy.deepcopy(ref)
    if not awq:
        quantize_model(model, QuantSpec(bits=bits, group_size=group_size))
        return model, None
    found = quantize_model_awq(model, QuantSpec(bits=bits, group_size=group_size, input_scale=True), calibration,
                               max_rows=512)
    n = len(found)
    return model, {"rtn": sum(r.rtn_error for r in found.values()) / n, "awq": sum(r.error for r in found.values()) / n,
                   "mean_alpha": sum(r.alpha for r in found.values()) / n}


def evaluate_model(name: str, ref, data: dict, tokenizer, args) -> dict:
    group_size = group_size_for(ref)
    ref_tokens = greedy_generate(ref, data["prompts"], args.new_tokens, ())
    out = {"group_size": group_size, "variants": {"float": {}}}
    scored = {"float": ref}
    for label, bits, awq in VARIANTS:
        start = time.perf_counter()
        model, layer_err = variant(ref, bits, awq, group_size, data["calibration"])
        row = logit_metrics(ref, model, data["eval"])
        row["greedy"] = greedy_agreement(ref_tokens, greedy_generate(model, data["prompts"], args.new_tokens, ()))
        if layer_err is not None:
            row["layer_err"] = layer_err
        out["variants"][label] = row
        scored[label] = model
        print(f"{name} {label}: {row} ({time.perf_counter() - start:.0f} s)", flush=True)
    if "problems" in data:
        for label, model in scored.items():
            result = exact_match(model, tokenizer, data["problems"], max_new_tokens=args.max_reply_tokens,
                                 batch_size=len(data["problems"]))  # one batch: fewer steps
            out["variants"].setdefault(label, {})["exact_match"] = result["accuracy"]
            print(f"{name} {label}: exact match {result['accuracy']:.3f} on {result['n']}", flush=True)
    return out


def markdown(results: dict) -> str:
    lines = ["| model | weights | group | KL (nats) | top-1 agree | greedy agree | exact match | layer err RTN → AWQ |",
             "|---|---|---|---|---|---|---|---|"]
    for name, result in results["models"].items():
        for label, row in result["variants"].items():
            em = f"{100 * row['exact_match']:.1f}%" if "exact_match" in row else "–"
            if label == "float":
                lines.append(f"| {name} | {result['dtype']} (ref.) | – | 0 | 100% | 100% | {em} | – |")
                continue
            err = row.get("layer_err")
            err = f"{err['rtn']:.2e} → {err['awq']:.2e}" if err else "–"
            lines.append(f"| {name} | {label} | {result['group_size']} | {row['kl']:.2e} | {100 * row['top1']:.1f}% | "
                         f"{100 * row['greedy']:.1f}% | {em} | {err} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--problems", type=int, default=300, help="held-out arithmetic problems for exact match")
    parser.add_argument("--max-reply-tokens", type=int, default=352, help="generation budget per problem")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt for the agreement")
    parser.add_argument("--calibration-tokens", type=int, default=4096, help="AWQ calibration tokens")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = {"args": vars(args), "models": {}}
    fixture = load_model(FIXTURE, backend="reference", progress=False)
    results["models"]["phi4flash-tiny"] = {"dtype": "float32", **evaluate_model(
        "phi4flash-tiny", fixture, fixture_data(fixture, args), None, args)}
    embedded = load_model(default_model_dir(), dtype=torch.float32, backend="reference", progress=False)
    tokenizer = load_tokenizer(default_model_dir())
    results["models"]["default_model"] = {"dtype": "bf16", **evaluate_model(
        "default_model", embedded, embedded_data(tokenizer, args), tokenizer, args)}
    results["seconds"] = time.perf_counter() - start
    print(markdown(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
