"""Weight-only quantisation (issue 14, item 3): round-to-nearest int8 / int4 with per-group fp32 scales.

`quantize_model` replaces the big projections of a loaded model by `QuantizedLinear` from outside (the
model's code is unchanged, as with `sambay.lora`); `sambay.checkpoint.load_model` rebuilds them from a
checkpoint that has a ``quantization_config.json``. The tensor layout is in `sambay.ops.quantized_matmul`.
"""

from sambay.quant.layer import QUANT_FILE, QuantizedLinear, QuantSpec, apply_quantized_layers, quantize_model

__all__ = ["QUANT_FILE", "QuantSpec", "QuantizedLinear", "apply_quantized_layers", "quantize_model"]
