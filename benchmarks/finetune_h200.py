"""Fine-tuning on one H200 (issue 18, item 4): full training at 8K, LoRA against full fine-tuning, LoRA + DPO.

    eval "$(bash benchmarks/device_setup.sh)"
    python3 benchmarks/finetune_h200.py --out $OUT

writes ``$OUT/finetune-h200.json`` (every number, the settings and the commands) and prints a markdown
summary. The three parts (``--parts a b c``) run one after another, each sub-run in its own process
with a time cap, so an out-of-memory error, a crash or a hang in one loses none of the others (each
sub-run writes its JSON after every stage; a capped one keeps what it had). Caps: a 80 s, b 100 s, c 70 s,
a part also getting what the earlier ones left unused; the defaults are the H200 run, at most 250 s in all.

a) ``sambay-da-900m`` (0.91B, random init on the GPU), full-parameter training at 8,192 tokens: bf16
   autocast over fp32 weights, AdamW, the trainer's own step (`sambay.train.loop._train_step`) on random
   token windows. ``--warmup`` steps, then up to ``--steps`` timed ones (each synchronised): tokens/s,
   MFU against ``--peak-tflops`` with two FLOP counts, the trainer's (4N + 2N_trainable per token, = 6N;
   attention scores left out) and 6N + attention (4 · n_heads · head_dim · mean visible keys per
   attention layer and token, x3 for forward + backward; the Mamba scan's elementwise work is left
   out), and the peak GPU memory. Below ``--mfu-target`` a torch.profiler table of one step (top kernels
   by GPU time) goes into the JSON. Without activation checkpointing first; on out-of-memory again with
   it. Then the same with ``--compile`` (the trainer's per-block `torch.compile`) in the time left.
b) ``phi4-mini-flash`` (3.85B, random init on the GPU): LoRA SFT (rank 16, every target, the frozen
   base in bf16 as `sambay.train.setup.add_lora` stores it) against full fine-tuning (fp32 weights and
   AdamW state: 16 bytes per parameter), same sequence length, micro-batch and activation
   checkpointing (on by default, ``--no-ac-b`` to try without: the reference scan keeps about 10 GB per
   Mamba layer and 2K-token sequence for backward, by our count of its saved tensors, 9 layers here);
   tokens/s, peak memory, MFU.
c) LoRA + DPO on the embedded default model, moving the reasoning length: the model answers held-out
   arithmetic prompts greedily; for training prompts its own replies are the rejected side and the same
   replies without the restating first line ("308+94, add digit by digit from the right:") and the
   closing summary ("so 308+94=402") the chosen one; `sambay train --objective dpo --lora-rank 16` runs
   on those pairs (the CLI, as a user runs it); then the held-out prompts again with the adapter merged.
   Reported: mean reasoning tokens, share of terse replies and exact-match accuracy before and after,
   and the DPO log (loss, margin, accuracy per logged step).

On a CPU, the same code in small (minutes on 2 cores; the caps are then raised)::

    python3 benchmarks/finetune_h200.py --out /tmp/ft --device cpu --preset-a sambay-da-tiny --seq-len-a 128 \
        --no-compile-a --preset-b sambay-da-tiny --seq-len-b 64 --warmup 1 --steps 2 --dpo-train 3 --dpo-eval 2 \
        --dpo-steps 2 --dpo-pairs-per-step 2 --max-new-tokens 200 --cap-a 300 --cap-b 300 --cap-c 900
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
PARTS = {"a": ("a", "a-compile"), "b": ("b-lora", "b-full"), "c": ("c",)}
FIRST_SHARE = {"a": 0.6, "b": 0.45}  # of a part's cap, for its first sub-run; the next gets what is left


# ---- the parent: sub-runs in processes, caps, the JSON and the summary ----------------------------------


def run_sub(name: str, cap: float, args, out_dir: Path) -> dict:
    """Runs sub-run ``name`` of this script in its own process group for at most ``cap`` seconds."""
    result_file, log_file = out_dir / f"part-{name}.json", out_dir / f"part-{name}.log"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, __file__, *sys.argv[1:], "--worker", name, "--cap", f"{cap:.1f}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    with open(log_file, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            status = "ok" if process.wait(timeout=cap) == 0 else f"failed (exit {process.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the group: the DPO trainer of part c too
            process.wait()
            status = f"stopped at its {cap:.0f} s cap"
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    result |= {"status": status, "wall_s": round(time.perf_counter() - start, 1)}
    if status != "ok":
        result["log_tail"] = log_file.read_text(errors="replace")[-3000:]
    print(f"{name}: {status} in {result['wall_s']} s", flush=True)
    return result


def main() -> int:
    args = parse_args()
    if args.worker:
        return WORKERS[args.worker](args)
    out = Path(args.out)
    out_file = out if out.suffix == ".json" else out / "finetune-h200.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "settings": vars(args),
              "torch": torch.__version__, "parts": {}}  # the GPU's name: in each part (no CUDA context here)
    spare = 0.0  # seconds earlier parts left unused: the next part may take them
    for part in args.parts:
        cap, start = getattr(args, f"cap_{part}") + spare, time.perf_counter()
        subs = [s for s in PARTS[part] if s != "a-compile" or args.compile_a]
        for i, name in enumerate(subs):
            left = cap - (time.perf_counter() - start)
            share = left * FIRST_SHARE[part] if i == 0 and len(subs) > 1 else left
            report["parts"][name] = run_sub(name, max(share, 5.0), args, out_file.parent)
            out_file.write_text(json.dumps(report, indent=1))
        spare = max(cap - (time.perf_counter() - start), 0.0)
    print(summary(report))
    return 0


def summary(report: dict) -> str:
    """The markdown tables of the run."""
    lines = ["| run | tokens/s | MFU (6N) | MFU (6N + attn) | peak GPU memory GiB | step s | notes |",
             "|---|---|---|---|---|---|---|"]
    runs = [(name, report["parts"][name]) for name in ("a", "a-compile", "b-lora", "b-full") if name in report["parts"]]
    if not runs:
        lines = []
    for name, r in runs:
        notes = "; ".join(filter(None, [r["status"] if r["status"] != "ok" else "", r.get("error", ""),
                                        "AC" if r.get("activation_checkpointing") else "",
                                        f"first step {r['first_step_s']} s" if "first_step_s" in r else ""]))
        lines.append(f"| {name} | {r.get('tokens_per_s', '-')} | {_pct(r.get('mfu_6n'))} | {_pct(r.get('mfu_attn'))} "
                     f"| {r.get('peak_memory_gib', '-')} | {r.get('step_s_mean', '-')} | {notes} |")
    c = report["parts"].get("c")
    if c is not None:
        lines += ["", "| DPO (held-out greedy) | reasoning tokens | terse share | accuracy |", "|---|---|---|---|"]
        for when in ("before", "after", "target"):
            m = c.get(when)
            if m:
                lines.append(f"| {when} | {m['reasoning_tokens']} | {_pct(m['terse'])} | {_pct(m.get('accuracy'))} |")
        if c["status"] != "ok" or "error" in c:
            lines.append(f"\npart c: {c['status']} {c.get('error', '')}")
        if "dpo_final" in c:
            f = c["dpo_final"]
            lines.append(f"\nDPO final: loss {f.get('loss', 0):.4f}, margin {f.get('margin', 0):.3f}, "
                         f"accuracy {f.get('accuracy', 0):.3f}, {f.get('steps')} steps in {c.get('dpo_wall_s')} s")
    return "\n".join(lines)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


# ---- parts a and b: timed steps of the trainer's step function -----------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    """One training measurement."""

    preset: str
    seq_len: int
    micro_batch: int
    lora_rank: int = 0
    compile: bool = False
    activation_checkpointing: bool = False
    scan_kernel: str = "auto"  # TrainConfig's: the trainable Triton scan on GPUs
    attention_kernel: str = "auto"  # TrainConfig's: FlexAttention on GPUs


class Recorder:
    """The sub-run's result dict, written to its JSON file whenever it changes."""

    def __init__(self, args, name: str):
        out = Path(args.out)
        self.file = (out.parent if out.suffix == ".json" else out) / f"part-{name}.json"
        self.data: dict = {}
        self.deadline = time.perf_counter() + args.cap - 5.0  # leave time to write and exit

    def update(self, **values) -> None:
        self.data.update(values)
        self.file.write_text(json.dumps(self.data, indent=1, default=str))

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def attention_flops_per_token(config, seq_len: int) -> float:
    """Forward FLOPs of attention scores and values per token: 4 · n_heads · head_dim · mean visible keys,
    summed over the attention layers (causal: (t + 1) / 2 keys on average; sliding: at most ``window``)."""
    from sambay.config import LayerKind

    full = (seq_len + 1) / 2
    w = min(config.window, seq_len)
    sliding = (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len
    per_layer = {LayerKind.FULL_ATTENTION: full, LayerKind.CROSS_ATTENTION: full, LayerKind.SLIDING_ATTENTION: sliding}
    keys = sum(per_layer.get(kind, 0.0) for kind in config.plan)
    return 4.0 * config.n_heads * config.head_dim * keys


def build(run: Run, device: torch.device):
    """(model, optimizer, TrainConfig): a random ``run.preset`` built on ``device``, as the trainer sets it up."""
    from sambay.config import PRESETS
    from sambay.lora import apply_lora
    from sambay.model.sambay import SambaY
    from sambay.ops import for_training
    from sambay.train.config import TrainConfig
    from sambay.train.optim import build_optimizer
    from sambay.train.setup import Runtime, parallelize, use_ops

    config = TrainConfig(model=run.preset, seq_len=run.seq_len, micro_batch_size=run.micro_batch, lr=1e-5,
                         lora_rank=run.lora_rank, compile=run.compile, device=device.type,
                         activation_checkpointing=run.activation_checkpointing, scan_kernel=run.scan_kernel,
                         attention_kernel=run.attention_kernel,
                         dtype="bfloat16" if device.type == "cuda" else "float32")
    with torch.device(device):  # on the GPU: a 3.85B fp32 init on the host would take minutes
        model = SambaY(PRESETS[run.preset], backend="reference").init_weights(torch.Generator(device).manual_seed(0))
    if run.lora_rank:  # what setup.add_lora does, with a generator on the model's device
        if config.dtype == "bfloat16":
            model.to_dtype(torch.bfloat16)
        apply_lora(model, config.lora_targets, rank=run.lora_rank, generator=torch.Generator(device).manual_seed(1))
    if device.type == "cuda":  # the training op table, as `sambay.train.setup.build_model` installs it
        use_ops(model, for_training(config.scan_kernel, config.attention_kernel))
    model = parallelize(model.train(), config, Runtime(0, 1, device))
    return model, build_optimizer(model, config), config


def measure(run: Run, args, rec: Recorder, device: torch.device, profiled: bool = False) -> None:
    """Warm-up and timed steps of ``run``; records speed, MFU and memory (and, if ``profiled``, a profile
    below the MFU target)."""
    from sambay.train.data import Batch
    from sambay.train.loop import _train_step
    from sambay.train.setup import Runtime

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rec.update(**dataclasses.asdict(run), stage="building", device_name=gpu)
    t0 = time.perf_counter()
    model, optimizer, config = build(run, device)
    n = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rec.update(stage="steps", build_s=round(time.perf_counter() - t0, 1), params=n, trainable_params=trainable,
               dtype=config.dtype)
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (run.micro_batch, run.seq_len + 1), generator=torch.Generator().manual_seed(0))
    batch = Batch(tokens[:, :-1], tokens[:, 1:], torch.ones(run.micro_batch, run.seq_len, dtype=torch.bool)).to(device)
    rt = Runtime(0, 1, device)

    def step() -> float:
        start = time.perf_counter()
        _train_step(model, optimizer, [batch], config, rt)
        _sync(device)
        return time.perf_counter() - start

    _reset_peak(device)
    times: list[float] = []
    while len(times) < args.warmup + args.steps:
        if times and rec.left() < 2 * max(times[-1], 1.0):
            break
        times.append(step())
        rec.update(step_s=[round(t, 4) for t in times], first_step_s=round(times[0], 2))
    timed = times[args.warmup:] or times[-1:]
    seconds = sum(timed) / len(timed)
    per_step = run.micro_batch * run.seq_len
    tokens_per_s = per_step / seconds
    flops_6n = (4 * n + 2 * trainable) * tokens_per_s  # the trainer's count (sambay.train.loop.throughput)
    flops_attn = flops_6n + 3 * attention_flops_per_token(model.config, run.seq_len) * tokens_per_s
    rec.update(stage="done", timed_steps=len(timed), step_s_mean=round(seconds, 4), tokens_per_step=per_step,
               tokens_per_s=round(tokens_per_s, 1), model_tflops_6n=round(flops_6n / 1e12, 2),
               model_tflops_attn=round(flops_attn / 1e12, 2), mfu_6n=flops_6n / 1e12 / args.peak_tflops,
               mfu_attn=flops_attn / 1e12 / args.peak_tflops, **_memory(device))
    if profiled and rec.data["mfu_attn"] < args.mfu_target and rec.left() > 3 * seconds + 5:
        rec.update(profile=profile(step, device, args.profile_rows))


def profile(step, device: torch.device, rows: int) -> dict:
    """One step under torch.profiler: the top ops by self GPU time (CPU time on a CPU), and the shares."""
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        wall = step()
    kind = "device" if device.type == "cuda" else "cpu"
    events = prof.key_averages()
    kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")] or list(events)

    def self_us(e) -> float:
        return float(getattr(e, f"self_{kind}_time_total", 0.0))

    top = sorted(kernels, key=self_us, reverse=True)
    total = sum(self_us(e) for e in kernels)

    def share(words: tuple[str, ...]) -> float:
        return round(sum(self_us(e) for e in kernels if any(w in e.key.lower() for w in words)) / max(total, 1.0), 3)

    return {
        "step_wall_s": round(wall, 4), f"{kind}_busy_s": round(total / 1e6, 4),
        "matmul_share": share(("gemm", "cutlass", "nvjet", "xmma", "addmm", "aten::mm", "bmm")),
        "attention_share": share(("fmha", "flash", "attention", "efficient")),
        "top": [{"name": e.key[:120], "self_ms": round(self_us(e) / 1e3, 2), "calls": e.count,
                 "share": round(self_us(e) / max(total, 1.0), 3)} for e in top[:rows]],
        "table": events.table(sort_by=f"self_{kind}_time_total", row_limit=rows, max_name_column_width=60),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2)}


def train_worker(name: str):
    def worker(args) -> int:
        device, rec = torch.device(args.device), Recorder(args, name)
        if name.startswith("a"):
            run = Run(args.preset_a, args.seq_len_a, args.micro_batch_a, compile=name == "a-compile",
                      scan_kernel=args.scan_kernel, attention_kernel=args.attention_kernel)
            eager = rec.file.with_name("part-a.json")
            if run.compile and eager.exists() and json.loads(eager.read_text()).get("activation_checkpointing"):
                run = dataclasses.replace(run, activation_checkpointing=True)  # as the eager run had to
        else:
            run = Run(args.preset_b, args.seq_len_b, args.micro_batch_b, lora_rank=args.lora_rank_b if name == "b-lora"
                      else 0, activation_checkpointing=args.ac_b, scan_kernel=args.scan_kernel,
                      attention_kernel=args.attention_kernel)
        try:
            measure(run, args, rec, device, profiled=name == "a")
        except torch.OutOfMemoryError as e:
            if run.activation_checkpointing:
                rec.update(error=f"out of memory: {str(e)[:300]}")
                return 1
            rec.update(oom_without_ac=str(e)[:300])
        else:
            return 0
        gc.collect()
        torch.cuda.empty_cache()
        measure(dataclasses.replace(run, activation_checkpointing=True), args, rec, device, profiled=name == "a")
        return 0

    return worker


# ---- part c: LoRA + DPO on the embedded model, reasoning length before and after ------------------------


def terse(reply: str, edit: str = "both") -> str | None:
    """The reply without its restating first line (``edit`` "both") and its closing "so ..." line (None:
    nothing to drop)."""
    from sambay.text.reasoning import split_reasoning

    split = split_reasoning(reply)
    lines = split.reasoning.strip("\n").split("\n")
    kept = [line for i, line in enumerate(lines)
            if not (edit == "both" and i == 0 and line.endswith("from the right:"))
            and not (i == len(lines) - 1 and line.startswith("so "))]
    if len(kept) == len(lines) or not kept:
        return None
    return "<think>\n" + "\n".join(kept) + "\n</think>\n" + split.content.strip()


def skip_a_step(reply: str) -> str | None:
    """The reply with its last digit-step line removed (None when it has fewer than two): a shorter reply
    that skips work the answer needs, the rejected side of the "summary+steps" pairs."""
    from sambay.text.reasoning import split_reasoning

    split = split_reasoning(reply)
    lines = split.reasoning.strip("\n").split("\n")
    steps = [i for i, line in enumerate(lines) if "→" in line]
    if len(steps) < 2:
        return None
    kept = [line for i, line in enumerate(lines) if i != steps[-1]]
    return "<think>\n" + "\n".join(kept) + "\n</think>\n" + split.content.strip()


def behaviour(engine, examples: list[dict], max_new_tokens: int) -> tuple[dict, list[str]]:
    """Greedy replies to ``examples``: mean reasoning tokens, share of terse replies, exact-match accuracy."""
    from sambay.generate import SamplingParams
    from sambay.text.reasoning import split_reasoning

    tok = engine.tokenizer
    prompts = [tok.apply_chat_template(e["messages"][:1], add_generation_prompt=True) for e in examples]
    greedy = SamplingParams(temperature=0, max_new_tokens=max_new_tokens)
    replies = [r[0].text for r in engine.generate(prompts, greedy)]
    splits = [split_reasoning(r) for r in replies]
    right = [s.content.strip() == e["answer"] for s, e in zip(splits, examples, strict=True)]
    return _stats(tok, splits, right), replies


def _stats(tok, splits, right: list[bool] | None) -> dict:
    n = max(len(splits), 1)
    is_terse = [("from the right:" not in s.reasoning) and ("\nso " not in s.reasoning) for s in splits]
    out = {"n": len(splits), "reasoning_tokens": round(sum(len(tok.encode(s.reasoning)) for s in splits) / n, 2),
           "terse": sum(is_terse) / n, "no_summary": sum("\nso " not in s.reasoning for s in splits) / n}
    if right is not None:
        out["accuracy"] = sum(right) / n
    return out


def dpo_worker(args) -> int:
    from sambay.checkpoint import load_model
    from sambay.default_model import default_model_dir
    from sambay.generate import Engine
    from sambay.lora import merge_adapter, read_adapter
    from sambay.text.reasoning import split_reasoning
    from sambay.train.arithmetic import make_split

    rec, base = Recorder(args, "c"), default_model_dir()
    work = Path(args.work_dir) / "dpo"
    work.mkdir(parents=True, exist_ok=True)
    dtype = torch.float32 if args.device == "cpu" else None  # the checkpoint's bf16 on the GPU
    engine = Engine.load(base, device=args.device, dtype=dtype, progress=False)
    train = make_split(args.dpo_train, seed=1801)
    seen = {e["messages"][0]["content"].replace(" ", "") for e in train}
    held_out = make_split(args.dpo_eval, seed=1802, exclude=seen)
    rec.update(stage="generating", train_prompts=len(train), held_out_prompts=len(held_out))
    t0 = time.perf_counter()
    before, before_replies = behaviour(engine, held_out, args.max_new_tokens)
    _, own = behaviour(engine, train, args.max_new_tokens)
    generate_s = time.perf_counter() - t0
    rec.update(stage="pairs", before=before, generate_s=round(generate_s, 1))
    pairs = []
    for example, reply in zip(train, own, strict=True):
        chosen = terse(reply, "summary" if args.dpo_edit == "summary+steps" else args.dpo_edit)
        if chosen is not None and split_reasoning(reply).content.strip() == example["answer"]:
            prompt = example["messages"][0]["content"]
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": reply})
            skipped = skip_a_step(chosen) if args.dpo_edit == "summary+steps" else None
            if skipped is not None:  # ... and against the same reply with a digit step missing: keep the steps
                pairs.append({"prompt": prompt, "chosen": chosen, "rejected": skipped})
    (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    rec.update(pairs=len(pairs), example_pair=pairs[0] if pairs else None)
    command = [sys.executable, "-m", "sambay.cli", "train", "--init-from", str(base), "--objective", "dpo",
               "--train-files", str(work / "pairs.jsonl"), "--lora-rank", "16", "--lr", str(args.dpo_lr),
               "--dpo-beta", str(args.dpo_beta), "--dpo-sft-weight", str(args.dpo_sft_weight),
               "--max-steps", str(args.dpo_steps),
               "--max-minutes", f"{_dpo_minutes(rec, generate_s, len(held_out), len(train)):.2f}", "--micro-batch-size",
               str(args.dpo_pairs_per_step), "--seq-len", "512", "--warmup-steps", str(min(10, args.dpo_steps)),
               "--eval-every", "0", "--eval-batches", "2", "--checkpoint-every", "0", "--log-every", "5",
               "--device", args.device, "--no-resume", "--out-dir", str(work / "run"), "--seed", "0"]
    rec.update(stage="dpo", dpo_command=" ".join(["python", *command[1:]]))
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    rec.update(dpo_wall_s=round(time.perf_counter() - t0, 1))
    if done.returncode != 0:
        rec.update(error=f"dpo run failed: {done.stderr[-2000:]}")
        return 1
    rec.update(dpo_final=json.loads(done.stdout.strip().splitlines()[-1]),
               dpo_log=[json.loads(line) for line in (work / "run" / "log.jsonl").read_text().splitlines()])
    model = load_model(base, device=args.device, dtype=dtype, progress=False)
    merge_adapter(model, read_adapter(work / "run" / "adapter"))
    tuned = Engine(model, engine.tokenizer, stop_token_ids=engine.stop_token_ids)
    after, replies = behaviour(tuned, held_out, args.max_new_tokens)
    edit = "summary" if args.dpo_edit == "summary+steps" else args.dpo_edit
    targets = [split_reasoning(terse(r, edit) or r) for r in before_replies]
    rec.update(stage="done", after=after, target=_stats(engine.tokenizer, targets, None),
               examples=[{"before": b, "after": a} for b, a in zip(before_replies[:3], replies[:3], strict=True)])
    return 0


def _dpo_minutes(rec: Recorder, generate_s: float, n_eval: int, n_train: int) -> float:
    """The DPO steps' budget: the cap less the evaluation after it (timed by the one before) and ~20 s of
    trainer start-up, reference log-probabilities and saving."""
    after_s = generate_s * n_eval / max(n_eval + n_train, 1) + 5.0
    return max((rec.left() - after_s - 20.0) / 60.0, 0.1)


WORKERS = {"a": train_worker("a"), "a-compile": train_worker("a-compile"), "b-lora": train_worker("b-lora"),
           "b-full": train_worker("b-full"), "c": dpo_worker}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="a directory (finetune-h200.json goes there) or a .json file")
    p.add_argument("--parts", nargs="+", default=["a", "b", "c"], choices=sorted(PARTS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--work-dir", default="/tmp/finetune-h200", help="DPO pairs, run directory and adapter")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="H200 dense bf16")
    p.add_argument("--mfu-target", type=float, default=0.40, help="below it, part a records a profile")
    p.add_argument("--profile-rows", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (compile, allocator, AdamW state)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (fewer if the cap comes first)")
    p.add_argument("--cap-a", type=float, default=80.0, help="seconds for part a (eager, then compile)")
    p.add_argument("--cap-b", type=float, default=100.0, help="seconds for part b (LoRA, then full; + what a left)")
    p.add_argument("--cap-c", type=float, default=70.0, help="seconds for part c (+ what a and b left)")
    p.add_argument("--scan-kernel", default="auto", choices=("auto", "reference", "triton"),
                   help="parts a and b: the training scan (TrainConfig.scan_kernel)")
    p.add_argument("--attention-kernel", default="auto", choices=("auto", "reference", "flex"),
                   help="parts a and b: the training attention (TrainConfig.attention_kernel)")
    p.add_argument("--preset-a", default="sambay-da-900m")
    p.add_argument("--seq-len-a", type=int, default=8192)
    p.add_argument("--micro-batch-a", type=int, default=1)
    p.add_argument("--compile-a", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--preset-b", default="phi4-mini-flash")
    p.add_argument("--seq-len-b", type=int, default=2048)
    p.add_argument("--micro-batch-b", type=int, default=2)
    p.add_argument("--lora-rank-b", type=int, default=16)
    p.add_argument("--ac-b", action=argparse.BooleanOptionalAction, default=True, help="activation checkpointing")
    p.add_argument("--dpo-train", type=int, default=256, help="training prompts (pairs: those answered right)")
    p.add_argument("--dpo-eval", type=int, default=128, help="held-out prompts")
    p.add_argument("--dpo-steps", type=int, default=100)
    p.add_argument("--dpo-pairs-per-step", type=int, default=16)
    p.add_argument("--dpo-lr", type=float, default=5e-4)
    p.add_argument("--dpo-beta", type=float, default=0.1)
    p.add_argument("--dpo-sft-weight", type=float, default=0.0, help="RPO: the chosen reply's NLL in the loss")
    p.add_argument("--dpo-edit", choices=("both", "summary", "summary+steps"), default="both",
                   help="the chosen reply drops the restating first line and the closing summary, or the summary "
                        "only; summary+steps adds pairs that reject the same reply with a digit step skipped")
    p.add_argument("--max-new-tokens", type=int, default=400)
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--cap", type=float, default=600.0, help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    raise SystemExit(main())
