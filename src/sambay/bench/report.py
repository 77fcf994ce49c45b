"""Render a benchmark result: a Markdown table, the JSON record and a PNG plot (the plot needs matplotlib,
the `plot` extra; without it `write` says so instead of writing nothing silently)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

PLOT_NEEDS = "bench.png not written: the plot needs matplotlib (pip install 'sambay[plot]')"


def _fmt(x, digits=0) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def table(result: dict) -> str:
    """Markdown tables of decode, prefill and long-generation rows."""
    rows = result["rows"]
    out = ["| system | batch | context | tokens/s | ms/step | limit tokens/s | % of limit |",
           "|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r.get("kind") == "decode"):
        if "error" in r or "skipped" in r:
            note = f"skipped: {r['skipped']}" if "skipped" in r else r["error"][:60]
            out.append(f"| {r['system']} | {r.get('batch', '')} | {r.get('context', '')} | {note} | | | |")
            continue
        frac = r.get("fraction_of_limit")
        out.append(f"| {r['system']} | {r['batch']} | {r['context']} | {_fmt(r['tokens_per_s'], 1)} | "
                   f"{_fmt(r['step_s'] * 1e3, 2)} | {_fmt(r.get('limit_tokens_per_s'), 1)} | "
                   f"{_fmt(None if frac is None else 100 * frac, 1)} |")
    weights = [r for r in rows if r.get("kind") == "weights"]
    if weights:
        out += ["", "| weights | GB a decode step reads |", "|---|---|"]
        out += [f"| {r['system']} | {r['bytes'] / 1e9:.2f} |" for r in weights]
    out += ["", "| system | prompt tokens | seconds | tokens/s | % of bf16 matmul rate |", "|---|---|---|---|---|"]
    for r in (r for r in rows if r.get("kind") == "prefill"):
        frac = r.get("fraction_of_matmul_rate")
        out.append(f"| {r['system']} | {r['context']} | {_fmt(r['seconds'], 3)} | {_fmt(r['tokens_per_s'], 0)} | "
                   f"{_fmt(None if frac is None else 100 * frac, 1)} |")
    for r in (r for r in rows if r.get("kind") == "profile"):
        how = "compiled (inductor)" if r.get("compiled") else "eager"
        out += ["", f"Profile of one {how} decode step ({r['system']}, batch {r['batch']}, context {r['context']}): "
                f"{r['kernels_per_step']:.0f} kernels, {r['kernel_ms_per_step']:.2f} ms of kernel time.", "",
                "| kernel | ms/step | calls/step |", "|---|---|---|"]
        out += [f"| `{name}` | {ms:.3f} | {calls:.0f} |" for name, ms, calls in r["top"]]
    for r in (r for r in rows if r.get("kind") == "prefill-profile"):
        families = ", ".join(f"{name} {ms:.1f}" for name, ms in r["families"].items())
        out += ["", f"Profile of one prefill ({r['system']}, {r['context']} tokens): {r['kernels']:.0f} kernels, "
                f"{r['kernel_ms']:.1f} ms of kernel time; by family (ms): {families}.", "",
                "| kernel | ms | calls |", "|---|---|---|"]
        out += [f"| `{name}` | {ms:.2f} | {calls:.0f} |" for name, ms, calls in r["top"]]
    for r in (r for r in rows if r.get("kind") == "long-generation"):
        out += ["", f"Long generation ({r['system']}): batch {r['batch']}, {r['prompt']}-token prompt + "
                f"{r['new_tokens']} new tokens: prefill {r['prefill_s']:.2f} s, decode {r['decode_s']:.1f} s, "
                f"{r['tokens_per_s']:,.1f} tokens/s."]
    return "\n".join(out)


def can_plot() -> bool:
    """Whether matplotlib is installed (`plot` needs it)."""
    return importlib.util.find_spec("matplotlib") is not None


def plot(result: dict, path: Path) -> bool:
    """Decode tokens/s against batch, one line per (system, context); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in result["rows"] if r.get("kind") == "decode" and "tokens_per_s" in r and "batch" in r]
    fig, ax = plt.subplots(figsize=(8, 5))
    for key in sorted({(r["system"], r["context"]) for r in rows}):
        pts = sorted((r["batch"], r["tokens_per_s"]) for r in rows if (r["system"], r["context"]) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} @ {key[1]}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch")
    ax.set_ylabel("decode tokens/s (aggregate)")
    ax.set_title(f"Decode throughput, {result['hardware'].get('device', '')}")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def write(result: dict, out_dir: Path) -> tuple[str, list[str]]:
    """Write bench.json, bench.md and bench.png into ``out_dir``.

    Returns:
        The Markdown, and lines for the user: the files written, and why bench.png was not (no matplotlib).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=1))
    md = table(result)
    (out_dir / "bench.md").write_text(md + "\n")
    written = ["bench.json", "bench.md"] + (["bench.png"] if plot(result, out_dir / "bench.png") else [])
    notes = [f"wrote {', '.join(written)} in {out_dir}"]
    if "bench.png" not in written:
        notes.append(PLOT_NEEDS)
    return md, notes
