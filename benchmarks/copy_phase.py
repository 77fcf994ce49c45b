"""When does in-context copying appear? SambaY-DA against Transformer++ on a synthetic copy task (issue 16, item 5).

    PYTHONPATH=src python3 benchmarks/copy_phase.py --archs transformer --layers 4 --out copy-phase.json  # CPU
    python3 benchmarks/copy_phase.py --device cuda --layers 8 --out $OUT/copy-phase.json  # both, the SambaY layout

Why: the Phonebook runs (docs/benchmarks.md) trained both architectures for 1,284-1,428 steps and neither
retrieved anything. Lookup needs an induction mechanism (find the earlier occurrence of what you just read,
copy what followed it), and small models acquire it in a sudden phase change after a plateau (Olsson et al.
2022, "In-context learning and induction heads"). This measures how many steps that plateau lasts here, on
the simplest task that needs it, with no tokenizer, data pipeline or trainer in the way.

Task: each sequence is ``n`` random token ids, then a random number (0 to ``--max-gap``) of other random ids,
then the same ``n`` ids again, with random ids before the first copy to keep the length fixed; a fresh batch
every step. The varying gap means that no fixed offset reaches the first copy: only content-based lookup
lowers the loss on the second copy. Both models come from `sambay.config.variant` at the same depth, width
and heads (`--layers`, `--d-model`, `--heads`), are built in float32
(bf16 autocast on a GPU, as `sambay train`) and trained with AdamW at a constant
learning rate (no warm-up, no decay, so the step of the change is not an artefact of a schedule). Every
``--every`` steps: the mean next-token loss on the second copy's tokens, from its second token on (the
first has no cue), over ``--eval-batches`` held-out batches. Chance is ln(vocab) ≈ 6.2 nats; a copying
model gets near 0.
Reported per architecture: the curve, and the first step at which the second-copy loss falls under 1 nat.

Ops: the trainer's (`sambay.ops.for_training`): the references on a CPU, the Triton scan and FlexAttention on
a GPU. On the CPU the reference scan makes SambaY-DA several times slower per step than the Transformer++
(over a second a step at 8 layers on one core), so the comparison at the SambaY layout (8 layers: Mamba and
sliding-window layers, the full-attention layer whose K/V the cross-decoder shares, a GMU and a
cross-attention layer; 4 layers have no cross-decoder) is a GPU run of a few minutes.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from sambay.config import variant
from sambay.model.sambay import SambaY
from sambay.ops import for_training
from sambay.train.setup import use_ops

VOCAB = 512
ARCHS = ("sambay-da", "transformer")


def batch(gen: torch.Generator, rows: int, n: int, max_gap: int) -> torch.Tensor:
    """(rows, 2 n + max_gap) ids: ``lead`` random ids, the span, max_gap - lead random ids, the span again; one
    random ``lead`` per batch. The length stays fixed (one compiled shape on a GPU) while the distance between
    the copies varies."""
    span = torch.randint(1, VOCAB, (rows, n), generator=gen)
    lead = int(torch.randint(0, max_gap + 1, (), generator=gen))
    noise = torch.randint(1, VOCAB, (rows, max_gap), generator=gen)
    return torch.cat([noise[:, :lead], span, noise[:, lead:], span], dim=1)


def autocast(device: str):
    """bf16 autocast on a GPU, as `sambay train` runs there (FlexAttention has no fp32 kernel for every head
    size); nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")


def second_copy_loss(model: SambaY, x: torch.Tensor, n: int) -> float:
    """Mean loss on the second copy's tokens 2..n (each predicted from the one before it)."""
    with torch.no_grad(), autocast(x.device.type):
        logits = model(x[:, :-1]).float()
    pred, want = logits[:, -(n - 1):], x[:, -(n - 1):]
    return float(F.cross_entropy(pred.reshape(-1, VOCAB), want.reshape(-1)))


def save(result: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def run(arch: str, args: argparse.Namespace, result: dict) -> dict:
    """Trains one model, keeping ``result["runs"][arch]`` (and ``--out``) current after every evaluation, so a
    run cut short still leaves its curve."""
    torch.manual_seed(args.seed)
    config = variant(arch, n_layers=args.layers, d_model=args.d_model, n_heads=args.heads, vocab_size=VOCAB,
                     window=args.window, max_seq_len=4 * (2 * args.n + args.max_gap))
    model = SambaY(config, backend="reference").init_weights(torch.Generator().manual_seed(args.seed)).float()
    model = model.to(args.device).train()
    if args.device == "cuda":
        use_ops(model, for_training())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    train_gen, eval_gen = torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(args.seed + 1)
    held_out = [batch(eval_gen, args.rows, args.n, args.max_gap).to(args.device) for _ in range(args.eval_batches)]
    curve, started = [], time.perf_counter()
    mine = result["runs"][arch] = {"params": sum(p.numel() for p in model.parameters()),
                                   "first_step_under_1_nat": None, "curve": curve, "seconds": 0.0}
    for step in range(args.steps + 1):
        if step % args.every == 0:
            model.eval()
            loss = sum(second_copy_loss(model, x, args.n) for x in held_out) / len(held_out)
            model.train()
            curve.append((step, round(loss, 4)))
            if mine["first_step_under_1_nat"] is None and loss < 1.0:
                mine["first_step_under_1_nat"] = step
            mine["seconds"] = time.perf_counter() - started
            save(result, args.out)
            print(f"{arch} step {step}: second-copy loss {loss:.3f} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
        if step == args.steps:
            break
        if args.max_seconds and time.perf_counter() - started > args.max_seconds and step % args.every == 0:
            mine["stopped_by_time_at_step"] = step
            print(f"{arch}: --max-seconds {args.max_seconds:g} reached at step {step}", flush=True)
            break
        x = batch(train_gen, args.rows, args.n, args.max_gap).to(args.device)
        with autocast(args.device):
            loss = model(x[:, :-1], targets=x[:, 1:]).mean()  # per-token NLL, every position
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return mine


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--every", type=int, default=100, help="steps between evaluations (default: 100)")
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--rows", type=int, default=32, help="sequences per step (default: 32)")
    p.add_argument("--n", type=int, default=24, help="tokens copied (default: 24)")
    p.add_argument("--max-gap", type=int, default=32, help="most random tokens between the copies (default: 32)")
    p.add_argument("--layers", type=int, default=8, help="layers, a multiple of 4 (default: 8, the smallest with "
                   "SambaY-DA's cross-decoder)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--window", type=int, default=16, help="SambaY-DA sliding window (default: 16, under the "
                   "shortest distance between the copies, so only the full-attention layer can reach back)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, help="stop each run at the first evaluation after this many "
                   "seconds (the JSON records the step)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--out")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"what": "steps until in-context copying appears (issue 16, item 5)", "settings": vars(args),
              "runs": {}}
    for arch in args.archs:
        run(arch, args, result)
    for arch, r in result["runs"].items():
        print(f"{arch}: {r['params']:,} parameters, second-copy loss under 1 nat first at step "
              f"{r['first_step_under_1_nat']}, final {r['curve'][-1][1]:.3f} ({r['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
