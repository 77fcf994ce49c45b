"""Mamba mixer: T decode steps equal one prefill over T tokens, conv and SSM states included."""

from __future__ import annotations

import pytest
import torch

from sambay.cache import MambaState
from sambay.model.mamba import Mamba, MemoryMamba
from sambay.model.span import Span
from tests.conftest import random_model, small_config
from tests.tolerances import FP32, assert_close


def _state(config, b):
    return MambaState(conv=torch.zeros(b, config.d_inner, config.d_conv - 1),
                      ssm=torch.zeros(b, config.d_inner, config.d_state))


@pytest.mark.parametrize("t", [1, 4, 37])
@pytest.mark.parametrize("cls", [Mamba, MemoryMamba])
def test_mamba_step_times_t_equals_prefill(t, cls):
    config = small_config()
    model = random_model(config)
    mixer = next(m for m in model.modules() if type(m) is cls)
    h = torch.randn(2, t, config.d_model)
    start = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        prefill_state = _state(config, 2)
        out, mem = mixer(h, Span.make(start, t, None), prefill_state)
        step_state = _state(config, 2)
        steps = [mixer(h[:, i : i + 1], Span.make(start + i, 1, None), step_state) for i in range(t)]
        assert_close(torch.cat([s[0] for s in steps], 1), out, **FP32, what="output")
        if cls is MemoryMamba:
            assert_close(torch.cat([s[1] for s in steps], 1), mem, **FP32, what="memory")
        assert_close(step_state.conv, prefill_state.conv, **FP32, what="conv state")
        assert_close(step_state.ssm, prefill_state.ssm, **FP32, what="ssm state")
        stateless, _ = mixer(h, Span.make(start, t, None), None)
        assert_close(stateless, out, **FP32, what="no-cache path")


def test_memory_is_the_ungated_readout():
    """MemoryMamba's output equals out_proj(silu(z) * memory) and its memory differs from the gated path."""
    config = small_config()
    model = random_model(config)
    mixer = next(m for m in model.modules() if type(m) is MemoryMamba)
    h = torch.randn(1, 6, config.d_model)
    with torch.no_grad():
        out, memory = mixer(h, Span.make(torch.zeros(1, dtype=torch.long), 6, None), None)
        z = mixer.in_proj(h).chunk(2, -1)[1]
        assert_close(out, mixer.out_proj(torch.nn.functional.silu(z) * memory), **FP32, what="gating")
        gated, _ = Mamba.forward(mixer, h, Span.make(torch.zeros(1, dtype=torch.long), 6, None), None)
        assert_close(gated, out, **FP32, what="same math as a plain Mamba")
