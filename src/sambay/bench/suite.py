"""The whole benchmark in one run: `run(BenchConfig) -> dict`, then `report.write` renders it.

Systems measured side by side (random bf16 weights; nothing here depends on their values):
- ``sambay``: our engine (Triton kernels, CUDA-graph decode) on the released 3.85B configuration;
- ``sambay-reference``: the same model on the pure-PyTorch reference ops, eager;
- ``transformer++``: a dense Transformer++ of the same dimensions (32 full-attention layers, RoPE,
  plain attention) run by our engine: the architecture-only ratio;
- ``hf-phi3-eager`` / ``hf-phi3-compile``: HF transformers Phi3ForCausalLM at Phi-4-mini-reasoning's
  dimensions, each in a fresh process (`hf_baseline`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace

import torch

from sambay.bench import hardware, limits, runs
from sambay.config import PHI4_MINI_FLASH, TINY, LayerKind, SambaYConfig
from sambay.model.sambay import SambaY

log = logging.getLogger("sambay.bench")


@dataclass(frozen=True)
class BenchConfig:
    """What one benchmark run measures."""

    batches: tuple[int, ...] = (1, 8, 32, 64)
    largest_batch: int = 512  # "the largest that fits": 512 rows at 32K context need ~106 GB with the weights
    contexts: tuple[int, ...] = (2048, 8192, 32768)
    prefill_tokens: tuple[int, ...] = (2048, 8192, 32768)
    decode_steps: int = 20
    long_prompt: int = 2048
    long_new_tokens: int = 32768
    hf: bool = True
    smoke: bool = False  # tiny model and sizes: a CPU check of the plumbing, not a measurement
    reference_contexts: tuple[int, ...] = field(default=(2048,))


@dataclass(frozen=True)
class FormatsConfig:
    """The weight-format comparison (issue 14): bf16, int8 and int4 side by side, each against the bandwidth
    limit computed from the bytes its own weights take; with ``compile``, also the compiled step."""

    formats: tuple[str, ...] = ("bf16", "int8", "int4")
    group_size: int = 128
    batches: tuple[int, ...] = (1, 8, 64)
    contexts: tuple[int, ...] = (2048, 32768)
    prefill_tokens: tuple[int, ...] = (2048, 32768)
    decode_steps: int = 50
    compile: bool = False
    compile_batches: tuple[int, ...] = (1, 8)  # compiled rows: each (batch, context) compiles anew (~30 s)
    compile_contexts: tuple[int, ...] = (2048,)
    smoke: bool = False


FORMAT_BITS = {"bf16": None, "bf16-gemv": None, "int8": 8, "int4": 4}  # bf16-gemv: `sambay.model.gemv`


def transformer_pp(config: SambaYConfig) -> SambaYConfig:
    """A dense Transformer++ with the dimensions of ``config``: full attention everywhere, RoPE, no DA."""
    return replace(config, plan=(LayerKind.FULL_ATTENTION,) * config.n_layers, differential=False,
                   rope_theta=10000.0)


def _build(config: SambaYConfig, backend: str) -> SambaY:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = SambaY(config, backend=backend).init_weights(torch.Generator(device).manual_seed(0))
    return model.to_dtype(torch.bfloat16 if device == "cuda" else torch.float32).eval()


def _weight_bytes(model: SambaY) -> int:
    """Bytes of the weights a step reads: parameters, and the packed weights and scales of quantised layers."""
    from sambay.quant import QuantizedLinear

    quantized = [b for m in model.modules() if isinstance(m, QuantizedLinear) for b in (m.qweight, m.scales)]
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *quantized))


def _nominal_params(module) -> int:
    """Parameters a forward multiplies by, quantised projections counted as the weights they stand for."""
    from sambay.quant import QuantizedLinear

    quantized = sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, QuantizedLinear))
    return sum(p.numel() for p in module.parameters()) + quantized


def _recover() -> None:
    """After a failed measurement: drop what it allocated, so the next row starts from a clean device."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except RuntimeError as e:  # a sticky device error: the next rows will fail and say so, as this one did
            log.error("the device did not recover: %s", next(iter(str(e).splitlines()), type(e).__name__))


def _fits(model: SambaY, batch: int, context: int) -> bool:
    if not torch.cuda.is_available():
        return True
    need = model.new_cache(batch_size=batch, max_length=context + 64, device="meta").nbytes
    free, _ = torch.cuda.mem_get_info()
    return need * 1.1 + 2 * 2**30 < free


def _decode_rows(system: str, model: SambaY, bench, batches, contexts, bw, graphs=True, compile=False) -> list[dict]:
    rows, weights = [], _weight_bytes(model)
    for context in contexts:
        for batch in batches:
            row = {"system": system, "kind": "decode", "batch": batch, "context": context}
            if not _fits(model, batch, context):
                rows.append({**row, "error": "out of memory"})
                continue
            try:
                seconds = runs.decode_step_seconds(model, batch, context, bench.decode_steps, graphs, compile)
            except RuntimeError as e:  # a failed graph capture, say: the row says so and the run goes on
                first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
                log.error("%s decode at batch %d, context %d failed: %s", system, batch, context, first)
                rows.append({**row, "error": f"{type(e).__name__}: {first}"})
                _recover()
                continue
            moved = limits.decode_bytes(model.config, weights, batch, context)
            row.update(step_s=seconds, tokens_per_s=batch / seconds, bytes_per_step=moved)
            if bw:
                row.update(limit_tokens_per_s=batch * bw / moved, fraction_of_limit=moved / bw / seconds)
            rows.append(row)
            log.info("%s", row)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


def _prefill_rows(system: str, model: SambaY, tokens_list, rate) -> list[dict]:
    rows = []
    layers = [*model.self_decoder.layers, *model.cross_decoder.layers]
    params_by_layer = [_nominal_params(layer) for layer in layers]
    for tokens in tokens_list:
        seconds = runs.prefill_seconds(model, tokens)
        flops = limits.prefill_flops(model.config, params_by_layer, model.embed.weight.numel(), tokens)
        row = {"system": system, "kind": "prefill", "batch": 1, "context": tokens, "seconds": seconds,
               "tokens_per_s": tokens / seconds, "useful_flops": flops}
        if rate:
            row["fraction_of_matmul_rate"] = flops / seconds / rate
        rows.append(row)
        log.info("%s", row)
    return rows


HF_MODES = ("eager", "compile")


def has_transformers() -> bool:
    """Whether the HF baselines can run (their subprocess uses this interpreter)."""
    return importlib.util.find_spec("transformers") is not None


def _hf_rows(bench: BenchConfig) -> list[dict]:
    if not has_transformers():
        log.warning("HF baselines skipped: transformers is not installed (pip install transformers)")
        return [{"system": f"hf-phi3-{mode}", "kind": "decode", "skipped": "transformers not installed"}
                for mode in HF_MODES]
    rows = []
    for mode, batches in zip(HF_MODES, ([1, 8], [1]), strict=True):  # each compiled batch size recompiles (~1 min)
        cmd = [sys.executable, "-m", "sambay.bench.hf_baseline", "--mode", mode, "--context", "2048",
               "--steps", "16" if mode == "eager" else "32", "--batch", *map(str, batches)]
        if bench.smoke:
            cmd += ["--tiny", "--context", "64", "--steps", "2"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        got = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not got:  # the table shows the exception's line; the JSON keeps the traceback
            last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), "no output")
            got = [{"system": f"hf-phi3-{mode}", "error": f"failed: {last.strip()}", "stderr": done.stderr[-2000:]}]
        rows += [{**r, "kind": "decode"} for r in got]
        log.info("%s", got)
    return rows


def run(bench: BenchConfig, checkpoint=None) -> dict:
    """Measure everything; returns {"config", "hardware", "rows"} (rows: one dict per measurement).

    ``checkpoint(result)``, when given, is called after each section with the results so far, so a run
    cut short still leaves its numbers behind.
    """
    hw = hardware.measure() if torch.cuda.is_available() else {"device": "cpu"}
    bw, rate = hw.get("copy_bytes_per_s"), hw.get("bf16_flops_per_s")
    config = TINY if bench.smoke else PHI4_MINI_FLASH
    graphs = torch.cuda.is_available()
    rows: list[dict] = []
    model = _build(config, "auto")
    if graphs:  # as the engine runs it (`ModelRunner(gemv=True)`): batch-1 projections on our GEMV kernel
        from sambay.model.gemv import use_gemv

        use_gemv(model)
    batches = (*bench.batches, bench.largest_batch)
    rows += _decode_rows("sambay", model, bench, batches, bench.contexts, bw, graphs)
    if graphs:
        from sambay.bench.profile import decode_profile

        rows.append({"system": "sambay", "kind": "profile", **decode_profile(model, 1, bench.contexts[0])})
    _save = (lambda: checkpoint({"config": asdict(bench), "hardware": hw, "rows": rows})) if checkpoint else (
        lambda: None)
    _save()
    rows += _prefill_rows("sambay", model, bench.prefill_tokens, rate)
    _save()
    with torch.device("meta"):
        reference = SambaY(config, backend="reference").eval()
    reference.load_state_dict(model.state_dict(), assign=True)  # the same weights, shared, no copy
    rows += _decode_rows("sambay-reference", reference, replace(bench, decode_steps=3), (1,),
                         bench.reference_contexts, bw, graphs=False)
    rows += _prefill_rows("sambay-reference", reference, bench.reference_contexts, rate)
    _save()
    del reference
    dense = _build(transformer_pp(config), "auto")
    if graphs:
        use_gemv(dense)
    rows += _decode_rows("transformer++", dense, bench, bench.batches, bench.contexts, bw, graphs)
    _save()
    del dense
    if graphs:
        torch.cuda.empty_cache()
    if bench.hf:
        rows += _hf_rows(bench)
        _save()
    if graphs:  # last: the longest single measurement
        long = runs.long_generation(model, 1, bench.long_prompt, bench.long_new_tokens)
        rows.append({"system": "sambay", "kind": "long-generation", **long, "context": bench.long_prompt})
    return {"config": asdict(bench), "hardware": hw, "rows": rows}


def run_formats(bench: FormatsConfig, checkpoint=None) -> dict:
    """bf16 / int8 / int4 decode and prefill of the release's configuration (random weights, quantised with
    round-to-nearest: the speed does not depend on the values). Rows are named ``sambay-<format>`` and,
    compiled, ``sambay-<format>-compiled``; ``checkpoint`` as in `run`."""
    from sambay.quant import QuantSpec, quantize_model

    hw = hardware.measure() if torch.cuda.is_available() else {"device": "cpu"}
    bw, rate = hw.get("copy_bytes_per_s"), hw.get("bf16_flops_per_s")
    config = TINY if bench.smoke else PHI4_MINI_FLASH
    graphs = torch.cuda.is_available()
    rows: list[dict] = []

    def save():
        if checkpoint:
            checkpoint({"config": asdict(bench), "hardware": hw, "rows": rows})

    for fmt in bench.formats:
        if fmt not in FORMAT_BITS:
            raise ValueError(f"unknown weight format {fmt!r}; choose from {', '.join(FORMAT_BITS)}")
        model = _build(config, "auto")
        if FORMAT_BITS[fmt]:
            quantize_model(model, QuantSpec(FORMAT_BITS[fmt], bench.group_size))
        if fmt == "bf16-gemv":
            from sambay.model.gemv import use_gemv

            use_gemv(model)
        system = f"sambay-{fmt}"
        weights = _weight_bytes(model)
        rows.append({"system": system, "kind": "weights", "bytes": weights})
        rows.extend(_decode_rows(system, model, bench, bench.batches, bench.contexts, bw, graphs))
        save()
        if bench.compile and graphs:
            rows.extend(_decode_rows(f"{system}-compiled", model, bench, bench.compile_batches,
                                     bench.compile_contexts, bw, graphs, compile=True))
            save()
        if graphs and fmt in ("bf16", bench.formats[-1]):
            from sambay.bench.profile import decode_profile

            for compiled in (False, True) if bench.compile else (False,):
                rows.append({"system": system, "kind": "profile",
                             **decode_profile(model, 1, bench.contexts[0], top=80, compile=compiled)})
        rows.extend(_prefill_rows(system, model, bench.prefill_tokens, rate))
        if graphs and fmt == bench.formats[0]:  # where the longest prefill goes (issue 14's prefill target)
            from sambay.bench.profile import prefill_profile

            rows.append({"system": system, "kind": "prefill-profile",
                         **prefill_profile(model, bench.prefill_tokens[-1])})
        save()
        del model
        if graphs:
            torch.cuda.empty_cache()
    return {"config": asdict(bench), "hardware": hw, "rows": rows}
