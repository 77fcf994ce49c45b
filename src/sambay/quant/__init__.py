"""Weight-only quantisation (issue 14, item 3): int8 / int4 with per-group fp32 scales, round-to-nearest or with
AWQ-style activation-aware input scales (`sambay.quant.awq`).

`quantize_model` replaces the big projections of a loaded model by `QuantizedLinear` from outside (the
model's code is unchanged, as with `sambay.lora`); `quantize_model_awq` first calibrates the scales on token
ids. `sambay.checkpoint.load_model` rebuilds them from a checkpoint that has a ``quantization_config.json``.
The on-disk layout is in `sambay.quant.format`, the weight layout in `sambay.ops.quantized_matmul`.
"""

from sambay.quant.awq import quantize_model_awq
from sambay.quant.layer import QUANT_FILE, QuantizedLinear, QuantSpec, apply_quantized_layers, quantize_model

__all__ = ["QUANT_FILE", "QuantSpec", "QuantizedLinear", "apply_quantized_layers", "quantize_model",
           "quantize_model_awq"]
