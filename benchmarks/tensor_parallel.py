"""Tensor-parallel decode and prefill benchmark: one process per GPU, under torchrun.

    NCCL_NVLS_ENABLE=0 python -m torch.distributed.run --nproc-per-node N benchmarks/tensor_parallel.py --out DIR

Run it at every N the machine and the model allow (NVLink multicast stays off, see the device README):
the release's 10 differential kv-head pairs split over 1, 2, 5 or 10 ranks, not 4 or 8. Every rank
builds the same random model of ``--preset`` (same seed, so the shards belong to one model), keeps
its shard (`sambay.parallel.tensor_parallel`: heads by differential pairs, Mamba channels, GMU and MLP;
the shared K/V split with the heads), and times, with `sambay.bench.runs`:
- decode steps of ``--batches`` rows at ``--context`` tokens (eager by default: CUDA-graph capture of
  the all-reduces is untested; ``--graphs`` tries it);
- a batch-1 YOCO prefill of ``--prefill`` tokens.
Rank 0 writes ``tp<N>.json``; scaling efficiency = tokens/s at N / (N × tokens/s at 1), computed across
the files of one machine. ``--device cpu --preset tiny --heads 8 4`` runs the same code with gloo (the
smoke test in tests/parallel).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import sambay
from sambay.bench.runs import decode_step_seconds, prefill_seconds
from sambay.config import PRESETS
from sambay.parallel import tensor_parallel


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default="phi4-mini-flash", choices=sorted(PRESETS))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--prefill", type=int, default=32768)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--graphs", action="store_true", help="replay decode steps from CUDA graphs")
    p.add_argument("--heads", type=int, nargs=2, metavar=("N_HEADS", "N_KV_HEADS"),
                   help="override the preset's heads (e.g. a tiny preset that splits 2 ways)")
    args = p.parse_args()
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    try:
        n, rank = dist.get_world_size(), dist.get_rank()
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        config = PRESETS[args.preset]
        if args.heads:
            config = dataclasses.replace(config, n_heads=args.heads[0], n_kv_heads=args.heads[1])
        with device:
            model = sambay.SambaY(config).init_weights(torch.Generator(device).manual_seed(0))
        model = model.to_dtype(torch.bfloat16 if cuda else torch.float32).eval()
        if n > 1:
            tensor_parallel(model)
        decode = []
        for batch in args.batches:
            step = decode_step_seconds(model, batch, args.context, args.steps, graphs=args.graphs and cuda)
            decode.append({"batch": batch, "context": args.context, "step_ms": round(step * 1e3, 3),
                           "tokens_per_s": round(batch / step, 1)})
        prefill = prefill_seconds(model, args.prefill)
        result = {"tensor_parallel": n, "preset": args.preset, "device": args.device, "graphs": args.graphs,
                  "gpu": torch.cuda.get_device_name() if cuda else None, "decode": decode,
                  "prefill": {"tokens": args.prefill, "seconds": round(prefill, 4),
                              "tokens_per_s": round(args.prefill / prefill, 1)}}
        if rank == 0:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"tp{n}.json").write_text(json.dumps(result, indent=1))
            print(json.dumps(result), flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
