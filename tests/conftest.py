"""Shared test fixtures: seeding, tiny random models with non-trivial weights, data paths, the gpu marker."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from sambay import SambaY, SambaYConfig
from sambay.config import sambay_plan

# Without a GPU, Triton kernels run under Triton's interpreter (numpy on the CPU). It must be chosen
# before any kernel module is imported, so it is set here, at collection time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DATA = Path(__file__).parent / "data"
TINY_FIXTURE = DATA / "phi4flash-tiny"
RELEASED_CONFIG_DIR = DATA / "phi-4-mini-flash-reasoning"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Torch on one CPU thread for the test, the count restored after: tiny models decode fastest on one
    thread (`sambay.cli._common`) and do not fight a parallel job for the cores. Directories of tiny-model
    tests make it autouse in their conftest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed_and_restore_dtype():
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


def small_config(**overrides) -> SambaYConfig:
    """A tiny SambaY-DA with a window short enough that every test crosses it."""
    fields = dict(vocab_size=97, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, plan=sambay_plan(8),
                  window=5, max_seq_len=512)
    fields.update(overrides)
    return SambaYConfig(**fields)


@torch.no_grad()
def random_model(config: SambaYConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> SambaY:
    """A model whose weights are large enough that every path changes the logits (unlike the 0.02 init)."""
    g = torch.Generator().manual_seed(seed)
    model = SambaY(config, backend="reference").init_weights(g)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, 1.0 / math.sqrt(module.in_features), generator=g)
            if module.bias is not None:
                module.bias.normal_(0.0, 0.1, generator=g)
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, 1.0, generator=g)
        elif isinstance(module, nn.LayerNorm | nn.RMSNorm) and "subln" not in name:
            module.weight.normal_(1.0, 0.1, generator=g)
    for p in model.fp32_parameters():
        if p.shape[-1] == config.head_dim:  # λ vectors
            p.normal_(0.0, 0.3, generator=g)
    return model.to_dtype(dtype).eval()


def forward(model: nn.Module, tokens: torch.Tensor, cache, **kwargs) -> torch.Tensor:
    """One forward that continues ``cache``, then advances it by each row's valid tokens, as the engine does
    (`sambay.generate.engine.prefill` / `decode_step`); without a cache, a plain forward."""
    logits = model(tokens, cache, **kwargs)
    if cache is not None:
        lengths = kwargs.get("lengths")
        cache.advance(tokens.shape[1] if lengths is None else torch.as_tensor(lengths, device=tokens.device))
    return logits
