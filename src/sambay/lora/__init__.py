"""LoRA for SambaY: adapters on every projection kind (attention, Mamba, GMU, MLP), in PEFT's format.

    layer.py    LoRALinear: base(x) + s · B (A x), adapters stacked per slot; lora_delta; QLoRALinear over
                a frozen int8 / int4 QuantizedLinear (QLoRA)
    targets.py  named targets and groups; apply_lora (freeze + wrap), merge_lora (fold + unwrap)
    peft.py     save_adapter / read_adapter (PEFT's adapter_config.json + adapter_model.safetensors under the
                checkpoint's module names), attach_adapter (unmerged), merge_adapter (folded),
                apply_adapter (folded, or unmerged on a quantised model)

Training (`sambay train --lora-rank R`) wraps the chosen layers before parallelism and saves the adapter;
`sambay merge` folds one into a released-format checkpoint; `sambay generate/chat --lora DIR` merge it
into the loaded weights (free at inference). QLoRA: on an int8 / int4 model (`sambay quantize`, or
``--quantize-base``) the quantised projections get `QLoRALinear`s; the adapter has the same module names,
so it applies to the float model too (and `sambay merge` folds it into the float checkpoint only).

Serving several adapters at once (`sambay serve --lora NAME=DIR`, repeatable): `attach_adapters` stacks
them in each `LoRALinear`, ``lora_A`` (n, r, in), ``lora_B`` (n, out, r), ``scaling`` (n,), slot 0 all zeros
for base-model rows and adapters of lower rank zero-padded to r. The model runner owns a static
(max_rows,) int64 tensor of slot ids, filled per step from the rows' adapters (the plan names each new
row's adapter), and hands that same tensor to every LoRALinear once (`bind_adapter_index`: a
non-persistent buffer, so CUDA graphs see a fixed address and forward stays free of per-call state).
Forward then adds ``s[i] · B[i] (A[i] x)`` per row, i = the row's slot: `lora_delta_gathered` (``torch.bmm``
over ``lora_A[index]``) is the reference and, for now, the GPU path too (a gathered BGMV/SGMV-style Triton
kernel would be its fast path), with `lora_delta` as the reference for one slot.
"""

from sambay.lora.layer import LoRALinear, QLoRALinear, bind_adapter_index, lora_delta, lora_delta_gathered
from sambay.lora.peft import (
    Adapter,
    AdapterError,
    apply_adapter,
    attach_adapter,
    attach_adapters,
    hf_module_name,
    merge_adapter,
    read_adapter,
    save_adapter,
)
from sambay.lora.targets import GROUPS, TARGETS, apply_lora, lora_layers, merge_lora, resolve_targets

__all__ = [
    "GROUPS", "TARGETS", "Adapter", "AdapterError", "LoRALinear", "QLoRALinear", "apply_adapter", "apply_lora",
    "attach_adapter", "attach_adapters", "bind_adapter_index", "hf_module_name", "lora_delta", "lora_delta_gathered",
    "lora_layers", "merge_adapter", "merge_lora", "read_adapter", "resolve_targets", "save_adapter",
]
