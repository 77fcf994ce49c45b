"""`sambay bench`: decode, prefill and long-generation throughput against baselines and the hardware limit.

One run measures, side by side: the hardware ceilings (`hardware`), our engine and our pure-PyTorch
reference path on the released configuration, a dense Transformer++ of the same dimensions run by our
engine (`runs`), and Hugging Face transformers' Phi3ForCausalLM at Phi-4-mini-reasoning's dimensions,
eager and with a static cache + torch.compile, each in a fresh process (`hf_baseline`). `limits` holds
the byte and FLOP models behind the "% of the limit" columns; `report` writes the table, JSON and plot.
"""
