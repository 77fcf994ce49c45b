"""The compiled decode step's op tables (`sambay.ops.for_compile`, `cuda_graphs.compiling`) on the CPU.

Inductor's GPU code and the capture are tested on the GPU (tests/model/test_gpu.py); here Dynamo traces the
same decode step with the ``aot_eager`` backend, which checks the part that can go wrong without a GPU: the
model's decode path is traceable around the hidden kernels, the traced references compute what our kernels
do, and the model gets its own op tables back.
"""

from __future__ import annotations

import torch

from sambay.generate.cuda_graphs import compiling
from sambay.ops import REFERENCE, TRACED_OPS, for_compile
from tests.conftest import random_model, small_config


def test_for_compile_traces_the_elementwise_references_and_hides_the_kernels():
    table = for_compile(REFERENCE)
    assert table.name == "reference+compile"
    for name in TRACED_OPS:
        assert getattr(table, name) is getattr(REFERENCE, name)
    hidden = table.selective_state_update
    assert hidden is not REFERENCE.selective_state_update
    assert getattr(hidden, "_torchdynamo_disable", False), "custom kernels must be hidden from Dynamo"


@torch.inference_mode()
def test_compiled_decode_step_equals_eager_and_restores_the_op_tables():
    torch._dynamo.reset()
    model = random_model(small_config()).eval()
    owners = [m for m in model.modules() if hasattr(m, "ops")]
    tables = [m.ops for m in owners]
    prompt = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(3))
    tokens = torch.randint(0, 97, (2, 1), generator=torch.Generator().manual_seed(4))

    def run(step):
        cache = model.new_cache(batch_size=2, max_length=32)
        model(prompt, cache)
        cache.advance(prompt.shape[1])
        out = []
        for _ in range(4):  # across the window of 5: the sliding attention drops its oldest key
            out.append(step(tokens, cache).clone())
            cache.advance(1)
        return torch.stack(out)

    eager = run(lambda t, c: model(t, c, check_inputs=False)[:, -1])
    with compiling(model):
        assert all(m.ops.name == "reference+compile" for m in owners)
        compiled = torch.compile(lambda t, c: model(t, c, check_inputs=False)[:, -1], backend="aot_eager",
                                 dynamic=False)
        traced = run(compiled)
    assert all(m.ops is table for m, table in zip(owners, tables, strict=True))
    torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)
