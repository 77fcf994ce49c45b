"""Triton kernels with the signatures of the pure-PyTorch references (imported only when asked for).

One module per op family: `selective_scan`, `causal_conv1d`, `attention`, `swiglu`, `layer_norm`,
`quantized_matmul`. Importing them imports Triton; `sambay.ops.resolve_backend` does so only for the
"triton" and "auto" backends, never at `import sambay`.
"""
