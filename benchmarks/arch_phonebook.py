"""The architecture claim at small scale (issue 16): Phonebook accuracy against context length, SambaY-DA vs
Transformer++, two small models trained by `sambay train` on the same data and token budget.

    eval "$(bash benchmarks/device_setup.sh)"
    python3 benchmarks/arch_phonebook.py --out $OUT --minutes 3.5          # both models in one call

    # the third run (docs/benchmarks.md): one model per call, each call under the device's 10-minute limit
    python3 benchmarks/arch_phonebook.py --prepare-only --work /tmp/ap --out $OUT/prep
    python3 benchmarks/arch_phonebook.py --archs sambay-da --reuse-data --work /tmp/ap --out $OUT/a --minutes 4.6
    python3 benchmarks/arch_phonebook.py --archs transformer --reuse-data --work /tmp/ap --out $OUT/b \
        --max-steps 4583                                                  # the steps the first call chose
    python3 benchmarks/arch_phonebook.py --out DIR --combine a/arch-phonebook.json b/arch-phonebook.json

    PYTHONPATH=src python benchmarks/arch_phonebook.py --out /tmp/ap --work /tmp/ap-work --device cpu \\
        --d-model 64 --layers 4 --heads 4 --seq-len 384 --micro-batch 2 --grad-accum 1 --max-steps 6 \\
        --data-tokens 60000 --lengths 256,384,768 --samples 2        # the CPU smoke test: 1.5 min on 2 cores

One run does everything:
1. text: the ``.py`` files of the Python standard library on the machine (``sysconfig.get_paths()["stdlib"]``,
   site-packages left out; PyTorch's own .py files on an image without Python source), sorted, shuffled with
   ``--seed``, concatenated;
2. phonebook documents: ``sambay eval phonebook --write-data --queries N`` (prompt, answer, then N more lookups
   of the same book, so each book trains many retrievals, not one; lengths from an eighth of
   the training length to just under it), ``--jobs`` processes with seeds of their own;
3. document-aligned training data: every training sequence is one JSONL document of exactly ``--seq-len``
   tokens with its `<|endoftext|>` (`compose`): a phonebook document at a random offset inside Python text,
   or (``1 - --phonebook-windows`` of them) text alone. The trainer cuts its token stream into windows of
   ``seq_len`` tokens from the first token on, so each window is one such document and no phonebook is cut
   from its question (packing documents of random lengths back to back cuts one of L tokens with
   probability about L / seq_len);
4. two models of the paper's family (`sambay.config.variant`: ``sambay-da`` NoPE with differential attention,
   GMU and a shared KV; ``transformer`` all full attention with RoPE θ = 10,000), same depth, width, seed and
   initialisation seed, written as released-format directories with the embedded model's 384-id byte-level
   BPE tokenizer and trained from them (``--init-from``) with the same flags, one after the other with the
   device to itself (``--together``: at once, sharing it); ``--minutes`` sizes the shared ``--max-steps``
   from a short probe of each (``--max-steps`` skips the probe); ``max_seq_len`` is set above the longest
   evaluated context; a run that would see its data more than once says so (the books get memorised);
5. ``sambay eval phonebook`` on both, ``--lengths`` from half the training length to 8x beyond it: exact
   answers, and the mean count of leading digits right (`leading_digits`: partial retrieval beyond the
   training length, which the exact score hides).

Writes to ``--out``: ``arch-phonebook.json`` (data source and mix, model sizes, token budget, per-arch
tokens/s and losses, accuracy per length), ``arch-phonebook.png`` when matplotlib is there,
``<arch>.train.jsonl`` (the trainers' log.jsonl), ``<arch>.eval.jsonl`` (every graded prompt) and
``arch-phonebook.log`` (what the child processes printed); prints a markdown table. Shards, checkpoints and
models stay under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ARCHS = {"sambay-da": "SambaY-DA", "transformer": "Transformer++"}
SRC = Path(__file__).resolve().parents[1] / "src"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="results directory (a few small files)")
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS), help="the models to train "
                   "(default: both; one per call when a call's time limit cannot hold two runs: then "
                   "--max-steps for the second, and --combine)")
    p.add_argument("--reuse-data", action="store_true", help="keep --work's prepared data when it was written "
                   "with the same data flags (a second call on the same machine skips ~2 minutes)")
    p.add_argument("--prepare-only", action="store_true", help="write the data into --work and stop (then "
                   "--reuse-data: the GPU is free for other work while the CPUs write)")
    p.add_argument("--combine", nargs="+", metavar="JSON", help="only merge arch-phonebook.json files of runs "
                   "with the same data and steps (one arch each) into --out: JSON, table and plot")
    p.add_argument("--work", default="/tmp/arch-phonebook", help="data, checkpoints and models (default: %(default)s)")
    p.add_argument("--minutes", type=float, default=3.5, help="training time of the two runs (default: 3.5)")
    p.add_argument("--together", action="store_true", help="train (and probe) the two models at once, sharing the "
                   "device, instead of one after the other with the whole device each")
    p.add_argument("--max-steps", type=int, help="optimiser steps of each run (skips the timing probe)")
    p.add_argument("--probe-steps", type=int, default=15, help="steps of the timing probe, timed from step 5 on "
                   "(default: 15)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--seed", type=int, default=0)
    # model (the same sizes for both architectures)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8, help="query heads (head_dim = d_model / heads; GQA 2:1)")
    p.add_argument("--window", type=int, default=128, help="SambaY-DA sliding window (default: 128)")
    # data and batch
    p.add_argument("--seq-len", type=int, default=2048, help="training length in tokens (default: 2048)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default: 1: the lookup appears "
                   "after a plateau counted in optimiser steps, so steps matter more than tokens per step; "
                   "benchmarks/copy_phase.py)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--data-tokens", type=int, default=48_000_000, help="unique training tokens written (default: "
                   "48M, about 2 minutes with 15 writers; a longer run repeats them in a new order)")
    p.add_argument("--queries", type=int, default=24, help="more lookups after each phonebook document's answer "
                   "(`sambay eval phonebook --queries`): one book trains up to N + 3 retrievals (default: 24)")
    p.add_argument("--phonebook-windows", type=float, default=0.9, help="share of training sequences that hold a "
                   "phonebook document (default: 0.9, about half the tokens)")
    p.add_argument("--jobs", type=int, default=max((os.cpu_count() or 2) - 1, 1), help="phonebook writers at once")
    # evaluation
    p.add_argument("--lengths", default="1K,2K,4K,8K,16K", help="evaluated context lengths (default: %(default)s)")
    p.add_argument("--samples", type=int, default=20, help="prompts per length (default: 20)")
    p.add_argument("--eval-batch", type=int, default=20, help="prompts generated at once (default: 20)")
    return p.parse_args(argv)


def parse_lengths(text: str) -> list[int]:
    """``1K,2K,4096`` → [1024, 2048, 4096] (the rule of `sambay eval --lengths`)."""
    return sorted({int(float(t[:-1]) * 1024) if t[-1:] in "kK" else int(t) for t in text.split(",") if t})


# ---- data ----------------------------------------------------------------------------------------------------


def stdlib_files(seed: int) -> tuple[Path, list[Path]]:
    """The standard library's .py files (no site-packages), sorted, then shuffled with ``seed``; (root, files)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py")
                   if not {"site-packages", "dist-packages"} & set(f.relative_to(root).parts))
    if len(files) < 100:  # a stripped image (bytecode only): PyTorch's Python source instead, said in the JSON
        import torch

        root = Path(torch.__file__).parent
        files = sorted(root.rglob("*.py"))
    random.Random(seed).shuffle(files)
    return root, files


def text_stream(files: list[Path], chars: int) -> tuple[str, int]:
    """Files in order, each UTF-8 file whole, until ``chars`` characters; (text, files used). Repeats if short."""
    parts, total, used = [], 0, 0
    while total < chars:
        for f in files:
            try:
                text = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            parts.append(text)
            total, used = total + len(text) + 2, used + 1
            if total >= chars:
                break
        if not parts:
            raise RuntimeError("no readable .py files in the standard library")
    return "\n\n".join(parts), used


def phonebook_lengths(seq_len: int) -> list[int]:
    """Eighths of the training length, and just under it: each document fits in one sequence with its answer."""
    return sorted({max(seq_len * k // 8, 192) for k in range(1, 8)} | {seq_len - 64})


def write_phonebook(work: Path, count: int, lengths: list[int], jobs: int, seed: int, tokenizer: Path,
                    env: dict, log, queries: int = 0) -> list[str]:
    """``count`` documents from ``jobs`` concurrent `sambay eval phonebook --write-data` runs (seeds seed*1000+j)."""
    jobs = max(min(jobs, count), 1)
    procs = []
    for j in range(jobs):
        n = count // jobs + (j < count % jobs)
        cmd = [sys.executable, "-m", "sambay.cli", "eval", "phonebook", "--tokenizer", str(tokenizer),
               "--model", str(tokenizer), "--write-data", str(work / f"phonebook-{j}.jsonl"), "--count", str(n),
               "--lengths", ",".join(map(str, lengths)), "--seed", str(seed * 1000 + j), "--queries", str(queries)]
        procs.append((cmd, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            text=True)))
    docs = []
    for j, (cmd, proc) in enumerate(procs):
        out = proc.communicate()[0]
        log.write(f"$ {' '.join(cmd)}\n{out}\n")
        if proc.returncode:
            raise RuntimeError(f"phonebook writer {j} failed:\n{out[-2000:]}")
        with open(work / f"phonebook-{j}.jsonl", encoding="utf-8") as f:
            docs += [json.loads(line)["text"] for line in f]
    return docs


def compose(tokenizer, text_ids: list[int], docs: list[str], seq_len: int, windows: int, share: float,
            seed: int | str) -> tuple[list[str], dict]:
    """``windows`` training documents of exactly ``seq_len - 1`` tokens (the trainer adds `<|endoftext|>`).

    A share ``share`` of them hold one phonebook document (in turn from ``docs``) between two runs of text
    cut from ``text_ids`` (the split point random); the others are text only. Joining decoded pieces can
    merge tokens at the seams, so each document is re-encoded and its trailing text trimmed or extended
    until the count is exact (a document that will not settle is skipped and counted).
    """
    rng = random.Random(f"compose:{seed}")
    need, out, cursor, used, pb_tokens, skipped = seq_len - 1, [], 0, 0, 0, 0
    while len(out) < windows:
        doc = docs[used % len(docs)] if docs and rng.random() < share else None
        middle = "" if doc is None else "\n\n" + doc
        room = need - (0 if doc is None else len(tokenizer.encode(middle)))
        if room < 0:
            raise ValueError(f"a phonebook document of {need - room} tokens does not fit in {need}")
        head = rng.randint(0, room) if doc is not None else room
        tail = room - head
        if cursor + room + 64 > len(text_ids):
            cursor = 0  # the text repeats (``--data-tokens`` larger than the text given)
        before = tokenizer.decode(text_ids[cursor : cursor + head])
        for _ in range(8):
            text = before + middle + tokenizer.decode(text_ids[cursor + head : cursor + head + tail])
            n = len(tokenizer.encode(text))
            if n == need:
                break
            tail = max(tail + need - n, 0)
        else:
            skipped, cursor = skipped + 1, cursor + room
            continue
        out.append(text)
        cursor += head + tail
        if doc is not None:
            used += 1
            pb_tokens += need - room
    stats = {"sequences": len(out), "phonebook_sequences": used, "phonebook_documents": len(docs),
             "phonebook_token_share": pb_tokens / max(len(out) * seq_len, 1), "skipped": skipped}
    return out, stats


def _compose_part(part: tuple) -> tuple[list[str], dict]:
    """`compose` in a worker process: (text, documents, seq_len, windows, share, seed)."""
    from sambay.default_model import default_model_dir
    from sambay.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(default_model_dir())
    text, docs, seq_len, windows, share, seed = part
    return compose(tokenizer, tokenizer.encode(text), docs, seq_len, windows, share, seed)


def compose_parallel(text: str, docs: list[str], seq_len: int, windows: int, share: float, seed: int,
                     jobs: int) -> tuple[list[str], dict]:
    """`compose` split over ``jobs`` processes, each with its own slice of the text and of the documents."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    jobs = max(min(jobs, windows // 4), 1)
    parts = [(text[len(text) * j // jobs : len(text) * (j + 1) // jobs], docs[j::jobs], seq_len,
              windows // jobs + (j < windows % jobs), share, f"{seed}:{j}") for j in range(jobs)]
    with ProcessPoolExecutor(jobs, mp_context=get_context("fork")) as pool:
        results = list(pool.map(_compose_part, parts))
    sequences = [s for seqs, _ in results for s in seqs]
    stats = {k: sum(st[k] for _, st in results) for k in ("sequences", "phonebook_sequences", "skipped")}
    stats.update(phonebook_documents=len(docs), phonebook_token_share=sum(
        st["phonebook_token_share"] * st["sequences"] for _, st in results) / max(stats["sequences"], 1))
    return sequences, stats


def shards_aligned(data_dir: Path, seq_len: int) -> bool:
    """Whether every token shard of the prepared data holds whole sequences (windows start at documents)."""
    meta = json.loads((data_dir / "meta.json").read_text())
    return all(n % seq_len == 0 for split in meta["splits"].values() for n in split["shards"])


# ---- models, training, evaluation -------------------------------------------------------------------------


def model_config(arch: str, args: argparse.Namespace, max_seq_len: int):
    from sambay.config import variant

    return variant(arch, n_layers=args.layers, d_model=args.d_model, n_heads=args.heads, vocab_size=512,
                   window=args.window, max_seq_len=max_seq_len)


def write_init(arch: str, args: argparse.Namespace, max_seq_len: int, tokenizer: Path, path: Path) -> int:
    """A randomly initialised released-format model directory (fp32, seeded) with the tokenizer files; params."""
    import torch

    from sambay.checkpoint import save_model
    from sambay.model.sambay import SambaY

    model = SambaY(model_config(arch, args, max_seq_len), backend="reference")
    model.init_weights(torch.Generator().manual_seed(args.seed))
    save_model(model, path)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(tokenizer / name, path / name)
    return sum(p.numel() for p in model.parameters())


def train_command(args: argparse.Namespace, init: Path, data_dir: Path, files: list[Path], run: Path, steps: int,
                  *, probe: bool = False, guard: float | None = None) -> list[str]:
    warmup = max(min(steps // 20, 100), 2)
    cmd = [sys.executable, "-m", "sambay.cli", "train", "--init-from", str(init), "--train-files", str(files[0]),
           "--eval-files", str(files[1]), "--data-dir", str(data_dir), "--out-dir", str(run),
           "--final-model-dir", str(run / "model"),
           "--seq-len", str(args.seq_len), "--micro-batch-size", str(args.micro_batch), "--grad-accum",
           str(args.grad_accum), "--max-steps", str(steps), "--lr", str(args.lr), "--warmup-steps", str(warmup),
           "--schedule", "cosine", "--device", args.device, "--seed", str(args.seed), "--eval-every", "0",
           "--eval-batches", "4", "--checkpoint-every", "0", "--no-resume",
           "--log-every", "1" if probe else "10"]
    if guard:  # minutes, only against a probe that misjudged: the steps were sized to fit; the JSON shows any cut
        cmd += ["--max-minutes", f"{guard:.2f}"]
    return cmd


def run_all(commands: dict[str, list[str]], env: dict, log, cwd: Path, together: bool) -> dict[str, str]:
    """`run_together` on all the commands, or on each in turn (the device to itself)."""
    if together:
        return run_together(commands, env, log, cwd)
    outs: dict[str, str] = {}
    for name, cmd in commands.items():
        outs |= run_together({name: cmd}, env, log, cwd)
    return outs


def run_together(commands: dict[str, list[str]], env: dict, log, cwd: Path) -> dict[str, str]:
    """Runs the commands at once; their stdout by name; stderr into ``log``; a failure raises with its tail."""
    procs = {}
    for name, cmd in commands.items():
        err = open(cwd / f"{name}.stderr", "w+", encoding="utf-8")  # noqa: SIM115 (closed below)
        procs[name] = (cmd, err, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True))
    outs, failed = {}, []
    for name, (cmd, err, proc) in procs.items():
        outs[name] = proc.communicate()[0]
        err.seek(0)
        text = err.read()
        err.close()
        log.write(f"$ {' '.join(cmd)}\n{text}\n{outs[name]}\n")
        log.flush()
        if proc.returncode:
            failed.append(f"{name} exited {proc.returncode}:\n{text[-3000:]}")
    if failed:
        raise RuntimeError("\n".join(failed))
    return outs


def read_train_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def seconds_per_step(records: list[dict], skip: int) -> float:
    """Mean seconds per step after the first ``skip`` logged steps (kernel warm-up)."""
    train = {r["step"]: r["elapsed_s"] for r in records if r["kind"] == "train"}
    last = max(train)
    first = min((s for s in train if s >= skip), default=min(train))
    if last == first:
        return train[last] / last
    return (train[last] - train[first]) / (last - first)


def eval_command(args: argparse.Namespace, model: Path, records: Path, lengths: list[int]) -> list[str]:
    return [sys.executable, "-m", "sambay.cli", "eval", "phonebook", "--model", str(model), "--device", args.device,
            "--lengths", ",".join(map(str, lengths)), "--samples", str(args.samples), "--batch-size",
            str(args.eval_batch), "--max-new-tokens", "16", "--seed", str(args.seed), "--json", "--out", str(records)]


# ---- report ---------------------------------------------------------------------------------------------------


def markdown_table(result: dict) -> str:
    """Exact-answer accuracy per length, then (when the result has it) the mean leading digits right."""
    lengths = result["eval"]["lengths"]
    head = "| model | params | " + " | ".join(_k(n) + ("*" if n > result["train"]["seq_len"] else "")
                                              for n in lengths) + " |"
    rows = [head, "|" + "---|" * (len(lengths) + 2)]
    for arch, label in ARCHS.items():
        if arch not in result["accuracy"]:
            continue
        acc = result["accuracy"][arch]
        cells = [f"{acc[str(n)]['accuracy']:.0%}" if str(n) in acc else "-" for n in lengths]
        rows.append(f"| {label} | {result['models'][arch]['params'] / 1e6:.1f}M | " + " | ".join(cells) + " |")
    for arch, label in ARCHS.items():
        digits = result.get("leading_digits", {}).get(arch)
        if digits:
            cells = [f"{digits[str(n)]:.1f}" if str(n) in digits else "-" for n in lengths]
            rows.append(f"| {label}: leading digits right | | " + " | ".join(cells) + " |")
    return "\n".join(rows) + f"\n\n(* beyond the training length of {result['train']['seq_len']} tokens)"


def leading_digits(records: Path) -> dict[str, float]:
    """Per context length: the mean count of the answer's characters the output gets right from the first one
    on (a phone number has 10). Partial credit the exact score hides: a model that finds the entry but stops
    early, or goes astray after a few digits, scores between 0 and 10; one that never finds it near 0 (a first
    digit right by chance: 0.1-0.3 in the third run)."""
    per: dict[str, list[int]] = {}
    for line in records.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "answer" not in row:
            continue  # the header
        said, want = (row.get("output") or "").strip(), row["answer"]
        right = next((i for i, (a, b) in enumerate(zip(said, want, strict=False)) if a != b), min(len(said), len(want)))
        per.setdefault(str(row["length"]), []).append(right)
    return {n: sum(v) / len(v) for n, v in sorted(per.items(), key=lambda kv: int(kv[0]))}


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def plot(result: dict, path: Path) -> bool:
    """Accuracy against context length, log-2 axis, training length marked; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for arch, label in ARCHS.items():
        if arch not in result["accuracy"]:
            continue
        rows = sorted((int(n), row["accuracy"]) for n, row in result["accuracy"][arch].items())
        ax.plot([n for n, _ in rows], [a for _, a in rows], marker="o", label=label)
    ax.axvline(result["train"]["seq_len"], color="grey", linestyle="--", linewidth=1, label="training length")
    ax.set_xscale("log", base=2)
    ax.set_xticks(result["eval"]["lengths"], [_k(n) for n in result["eval"]["lengths"]])
    ax.set(xlabel="context length (tokens)", ylabel="Phonebook accuracy", ylim=(-0.02, 1.02),
           title=f"Phonebook, {result['train']['tokens']:,} training tokens each")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- main ------------------------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace, work: Path, env: dict, log) -> tuple[Path, Path, Path, dict]:
    """Text, phonebook documents, aligned JSONL and its shards; (train file, held-out file, data dir, stats)."""
    from sambay.default_model import default_model_dir

    tokenizer_dir = default_model_dir()
    windows = -(-args.data_tokens // args.seq_len)
    lengths = phonebook_lengths(args.seq_len)
    held_out = max(windows // 100, 4)  # sequences; composed after the training ones, so never among them
    n_docs = round((windows + held_out) * args.phonebook_windows)
    docs = (write_phonebook(work, n_docs, lengths, args.jobs, args.seed, tokenizer_dir, env, log, args.queries)
            if n_docs else [])
    root, files = stdlib_files(args.seed)
    text_tokens = windows * args.seq_len * (1.0 - 0.5 * args.phonebook_windows) + 10 * args.seq_len
    text, used = text_stream(files, int(text_tokens * 1.3))  # ~1.14 characters per token on Python source
    sequences, stats = compose_parallel(text, docs, args.seq_len, windows + held_out, args.phonebook_windows,
                                        args.seed, args.jobs)
    train_file, eval_file = work / "train.jsonl", work / "heldout.jsonl"
    for path, part in ((train_file, sequences[:windows]), (eval_file, sequences[windows:])):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": s}, ensure_ascii=False) + "\n" for s in part)
    data_dir = work / "data"
    cmd = [sys.executable, "-m", "sambay.cli", "train", "--init-from", str(tokenizer_dir), "--train-files",
           str(train_file), "--eval-files", str(eval_file), "--data-dir", str(data_dir), "--seq-len",
           str(args.seq_len), "--out-dir", str(work / "prepare"), "--prepare-only"]
    run_together({"prepare": cmd}, env, log, work)
    stats.update(aligned=shards_aligned(data_dir, args.seq_len), phonebook_lengths=lengths,
                 text_source=f"Python {sys.version.split()[0]} .py files under {root} "
                             f"(site-packages excluded), shuffled with seed {args.seed}: {used} of {len(files)} "
                             f"files, {len(text) / 1e6:.1f}M characters",
                 phonebook_source=f"sambay eval phonebook --write-data --queries {args.queries} (names from faker), "
                                  "seeds "
                                  f"{args.seed * 1000}..{args.seed * 1000 + max(args.jobs, 1) - 1}",
                 tokenizer="the embedded model's 384-id byte-level BPE (src/sambay/default_model)")
    stats["held_out_sequences"] = held_out
    return train_file, eval_file, data_dir, stats


def train_both(args: argparse.Namespace, work: Path, inits: dict, data_dir: Path, files: list[Path], env: dict,
               log, sequences: int) -> tuple[int, dict]:
    """The probe (unless --max-steps), then both runs, at once (--together) or in turn; (steps, per-arch summary).

    Both get the same steps: sized so that the two runs fit in ``--minutes`` (the slower run's time twice when
    they share the device, their sum in turn)."""
    timing = {}
    steps = args.max_steps
    if steps is None:
        t0 = time.perf_counter()
        runs = {arch: work / f"probe-{arch}" for arch in args.archs}
        while True:  # out of memory: the same global batch in micro-batches half as large
            try:
                run_all({a: train_command(args, inits[a], data_dir, files, runs[a], args.probe_steps, probe=True)
                         for a in args.archs}, env, log, work, args.together)
                break
            except RuntimeError as e:
                if "out of memory" not in str(e).lower() or args.micro_batch == 1:
                    raise
                args.micro_batch, args.grad_accum = args.micro_batch // 2, args.grad_accum * 2
                print(f"probe: out of memory; micro-batch {args.micro_batch} x {args.grad_accum}", flush=True)
        per_step = {a: seconds_per_step(read_train_log(runs[a] / "log.jsonl"), 5) for a in args.archs}
        per_run = max(per_step.values()) if args.together else sum(per_step.values())
        steps = max(int(0.9 * args.minutes * 60 / per_run), 10)
        how = "together" if args.together else "alone"
        timing["probe"] = {"seconds": time.perf_counter() - t0, f"seconds_per_step_{how}": per_step}
        print(f"probe: {', '.join(f'{a} {t:.3f}' for a, t in per_step.items())} s/step {how} -> {steps} steps "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    epochs = steps * args.micro_batch * args.grad_accum / max(sequences, 1)
    if epochs > 1:  # the second run saw its books 3.9 times and memorised them instead of learning the lookup
        print(f"note: {steps} steps are {epochs:.1f} epochs of the written data; --data-tokens "
              f"{int(epochs * args.data_tokens) + 1} would show every sequence once", flush=True)
    t0 = time.perf_counter()
    runs = {arch: work / f"run-{arch}" for arch in args.archs}
    guard = {a: None for a in args.archs}
    if args.max_steps is None:  # the sized time with room for a misjudged probe (the shared one was 1.7x off)
        guard = {a: (args.minutes if args.together else steps * per_step[a] / 60) * 1.5 + 0.5 for a in args.archs}
    outs = run_all({a: train_command(args, inits[a], data_dir, files, runs[a], steps, guard=guard[a])
                    for a in args.archs}, env, log, work, args.together)
    timing["train_wall_s"] = time.perf_counter() - t0
    summary = {}
    for arch in args.archs:
        final = json.loads(outs[arch].strip().splitlines()[-1])
        shutil.copyfile(runs[arch] / "log.jsonl", Path(args.out) / f"{arch}.train.jsonl")
        summary[arch] = {k: final.get(k) for k in ("steps", "tokens", "train_s", "tokens_per_s", "params",
                                                   "train_loss", "loss", "bpb")}
        summary[arch]["model_dir"] = str(runs[arch] / "model")
    return steps, {"timing": timing, "runs": summary}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sambay.eval.retrieval import require_faker

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    if args.combine:  # reads finished results only: no data, no faker
        return report(combine([_with_digits(Path(f)) for f in args.combine]), out)
    require_faker()  # the phonebook names: fail before any work, not minutes in
    prepared = work / "prepared.json"
    saved = json.loads(prepared.read_text()) if args.reuse_data and prepared.exists() else None
    reuse = saved is not None and saved["flags"] == data_flags(args)
    if not reuse:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    for arch in args.archs:  # a reused --work may hold an earlier call's runs
        for old in (f"init-{arch}", f"probe-{arch}", f"run-{arch}"):
            shutil.rmtree(work / old, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(SRC)]))}
    if args.device == "cpu":  # two trainers at once: one thread each rather than two pools fighting over the cores
        env.setdefault("OMP_NUM_THREADS", str(max((os.cpu_count() or 2) // 2, 1)))
    lengths = parse_lengths(args.lengths)
    max_seq_len = max(lengths[-1], args.seq_len) * 2  # room for the prompt and its answer
    started = time.perf_counter()
    with open(out / "arch-phonebook.log", "w", encoding="utf-8") as log:
        t0 = time.perf_counter()
        if reuse:
            train_file, eval_file, data_dir, data = (Path(saved["train_file"]), Path(saved["eval_file"]),
                                                     Path(saved["data_dir"]), saved["data"])
            print(f"data: reusing {work} (written with the same data flags)", flush=True)
        else:
            train_file, eval_file, data_dir, data = prepare(args, work, env, log)
            data["seconds"] = time.perf_counter() - t0
            prepared.write_text(json.dumps({"flags": data_flags(args), "train_file": str(train_file),
                                            "eval_file": str(eval_file), "data_dir": str(data_dir), "data": data}))
        print(f"data: {data['sequences']} sequences of {args.seq_len} tokens, phonebook share "
              f"{data['phonebook_token_share']:.0%}, aligned {data['aligned']} ({data['seconds']:.0f} s)", flush=True)
        if args.prepare_only:
            return 0
        from sambay.default_model import default_model_dir

        inits, params = {}, {}
        for arch in args.archs:
            inits[arch] = work / f"init-{arch}"
            params[arch] = write_init(arch, args, max_seq_len, default_model_dir(), inits[arch])
        steps, trained = train_both(args, work, inits, data_dir, [train_file, eval_file], env, log,
                                    data["sequences"] - data["held_out_sequences"])
        how = "together" if args.together else "one after the other"
        print(f"trained {steps} steps each ({trained['timing']['train_wall_s']:.0f} s, {how})", flush=True)
        t0 = time.perf_counter()
        records = {arch: work / f"{arch}.eval.jsonl" for arch in args.archs}
        outs = run_all({a: eval_command(args, Path(trained["runs"][a]["model_dir"]), records[a], lengths)
                        for a in args.archs}, env, log, work, args.together)
        eval_s = time.perf_counter() - t0
    accuracy = {a: json.loads(outs[a].strip().splitlines()[-1])["phonebook"] for a in args.archs}
    for arch in args.archs:
        shutil.copyfile(records[arch], out / f"{arch}.eval.jsonl")
    batch = args.micro_batch * args.grad_accum
    result = {
        "what": "Phonebook accuracy against context length, SambaY-DA vs Transformer++ (issue 16, item 5)",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": _device_name(args.device), "torch": _torch_version(),
        "data": data,
        "models": {a: {"config": _config_dict(model_config(a, args, max_seq_len)), "params": params[a]}
                   for a in args.archs},
        "train": {"seq_len": args.seq_len, "batch": batch, "micro_batch": args.micro_batch,
                  "grad_accum": args.grad_accum, "steps": steps, "tokens": steps * batch * args.seq_len,
                  "note": ("both runs at once on one device: tokens/s are each run's own while sharing it"
                           if args.together else "one run after the other, each with the device to itself"),
                  "epochs": steps * batch / max(data["sequences"] - data["held_out_sequences"], 1),
                  "lr": args.lr, "schedule": "cosine, 5% warmup, min 0.1 lr", "seed": args.seed,
                  "minutes": args.minutes, **trained},
        "eval": {"lengths": lengths, "samples": args.samples, "seed": args.seed, "seconds": eval_s},
        "accuracy": accuracy,
        "leading_digits": {a: leading_digits(out / f"{a}.eval.jsonl") for a in args.archs},
        "total_s": time.perf_counter() - started,
    }
    return report(result, out)


def report(result: dict, out: Path) -> int:
    """Writes ``arch-phonebook.json`` and the plot into ``out``; prints the table and each run's figures."""
    (out / "arch-phonebook.json").write_text(json.dumps(result, indent=2) + "\n")
    plotted = plot(result, out / "arch-phonebook.png")
    print(markdown_table(result))
    for arch, r in result["train"]["runs"].items():
        print(f"{ARCHS[arch]}: {r['steps']} steps, {r['tokens_per_s']:,.0f} tokens/s, train loss "
              f"{r['train_loss']:.3f}, held-out loss {r['loss']:.3f}")
    print(f"wrote {out / 'arch-phonebook.json'}" + (" and arch-phonebook.png" if plotted else " (no matplotlib)")
          + f" in {result['total_s']:.0f} s")
    return 0


def _with_digits(path: Path) -> dict:
    """A result JSON, its leading-digit scores computed from the eval records beside it when it predates them."""
    result = json.loads(path.read_text())
    for arch in result["accuracy"]:
        records = path.parent / f"{arch}.eval.jsonl"
        if arch not in result.get("leading_digits", {}) and records.exists():
            result.setdefault("leading_digits", {})[arch] = leading_digits(records)
    return result


def data_flags(args: argparse.Namespace) -> dict:
    """The flags that decide the prepared data: equal flags, equal files (every writer is seeded)."""
    return {k: getattr(args, k) for k in ("seed", "seq_len", "data_tokens", "queries", "phonebook_windows", "jobs")}


def combine(results: list[dict]) -> dict:
    """One result from runs of different architectures on the same data and steps (one call each).

    Raises ValueError when the runs differ in anything but the architecture: data, steps, batch, learning rate,
    evaluated lengths, or when one architecture appears twice."""
    first = results[0]
    merged = json.loads(json.dumps(first))
    same = {"data": lambda r: {k: v for k, v in r["data"].items() if k != "seconds"},
            "steps": lambda r: r["train"]["steps"], "batch": lambda r: r["train"]["batch"],
            "seq_len": lambda r: r["train"]["seq_len"], "lr": lambda r: r["train"]["lr"],
            "lengths": lambda r: r["eval"]["lengths"], "samples": lambda r: r["eval"]["samples"]}
    for r in results[1:]:
        for what, get in same.items():
            if get(r) != get(first):
                raise ValueError(f"cannot combine runs that differ in {what}: {get(first)!r} vs {get(r)!r}")
        for arch in r["accuracy"]:
            if arch in merged["accuracy"]:
                raise ValueError(f"{arch} appears in more than one result")
        merged["accuracy"] |= r["accuracy"]
        merged.setdefault("leading_digits", {}).update(r.get("leading_digits", {}))
        merged["models"] |= r["models"]
        merged["train"]["runs"] |= r["train"]["runs"]
        merged["total_s"] += r["total_s"]
    merged["train"]["timing"] = {",".join(r["accuracy"]): r["train"]["timing"] for r in results}
    merged["commands"] = [r["command"] for r in results]
    merged["train"]["note"] = "one run after the other, each with the device to itself (one call each)"
    return merged


def _config_dict(config) -> dict:
    from sambay.checkpoint import config_to_hf

    return config_to_hf(config)


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else "cpu"


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    sys.exit(main())
