"""The GPU fast path (Triton kernels, CUDA-graph decode) against the reference path, end to end."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import sambay
from tests.conftest import TINY_FIXTURE, forward, random_model, small_config
from tests.tolerances import GOLDEN_FP32_REL_TO_MAX, LOW_PRECISION_FACTOR, assert_close, max_err, rel_err

pytestmark = pytest.mark.gpu
CHECKPOINT = TINY_FIXTURE / "checkpoint"


def _case():
    e = load_file(TINY_FIXTURE / "expected.safetensors")
    return e["case0.input_ids"], int(e["case0.prompt_len"]), e


@torch.inference_mode()
def _decode(model, ids, p):
    cache = model.new_cache(batch_size=ids.shape[0], max_length=ids.shape[1])
    forward(model, ids[:, :p], cache)
    return torch.cat([forward(model, ids[:, t : t + 1], cache) for t in range(p, ids.shape[1])], 1)


def test_triton_backend_matches_golden_logits_fp32():
    ids, p, e = _case()
    model = sambay.load_model(CHECKPOINT, device="cuda", dtype=torch.float32, backend="triton", progress=False)
    bound = GOLDEN_FP32_REL_TO_MAX * e["case0.logits_fp32"].abs().max().item()
    with torch.inference_mode():
        assert max_err(model(ids.cuda()).cpu(), e["case0.logits_fp32"]) <= bound
    assert max_err(_decode(model, ids.cuda(), p).cpu(), e["case0.decode_logits_fp32"]) <= bound


def test_triton_backend_bf16_within_twice_reference_bf16_error():
    ids, p, e = _case()
    model = sambay.load_model(CHECKPOINT, device="cuda", dtype=torch.bfloat16, backend="triton", progress=False)
    with torch.inference_mode():
        full = model(ids.cuda()).cpu()
    own = rel_err(e["case0.logits_bf16ref"], e["case0.logits_fp32"])
    assert rel_err(full, e["case0.logits_fp32"]) <= LOW_PRECISION_FACTOR * own
    own_dec = rel_err(e["case0.decode_logits_bf16ref"], e["case0.decode_logits_fp32"])
    assert rel_err(_decode(model, ids.cuda(), p).cpu(), e["case0.decode_logits_fp32"]) <= LOW_PRECISION_FACTOR * own_dec


@torch.inference_mode()
def _greedy(model, ids, steps):
    cache = model.new_cache(batch_size=ids.shape[0], max_length=ids.shape[1] + steps)
    logits, out = forward(model, ids, cache), []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
        logits = forward(model, token, cache)
    return torch.cat(out, 1).cpu()


def test_greedy_generation_on_gpu_equals_reference_path():
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    ref = sambay.load_model(CHECKPOINT, dtype=torch.float32, backend="reference", progress=False)
    gpu = sambay.load_model(CHECKPOINT, device="cuda", dtype=torch.float32, backend="triton", progress=False)
    assert torch.equal(_greedy(gpu, ids.cuda(), 24), _greedy(ref, ids, 24))


def test_cuda_graph_decode_equals_eager_decode():
    from sambay.generate.cuda_graphs import GraphedDecoder

    model = sambay.load_model(CHECKPOINT, device="cuda", dtype=torch.float32, backend="triton", progress=False)
    ids = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(1)).cuda()
    cache = model.new_cache(batch_size=3, max_length=40)
    decoder = GraphedDecoder(model, cache)
    with torch.inference_mode():
        decoder.tokens.copy_(forward(model, ids, cache)[:, -1].argmax(-1, keepdim=True))
    graphed = [decoder.tokens.clone()] + [decoder.step().clone() for _ in range(20)]
    eager = _greedy(model, ids, 21)
    assert torch.equal(torch.cat(graphed, 1).cpu(), eager)


def test_compiled_cuda_graph_decode_equals_eager_decode():
    """`GraphedDecoder(compile=True)`: inductor's fused step under our graph gives the eager tokens and logits
    (fp32), and the model's op tables are its own again afterwards."""
    from sambay.generate.cuda_graphs import GraphedDecoder

    model = sambay.load_model(CHECKPOINT, device="cuda", dtype=torch.float32, backend="triton", progress=False)
    before = model.ops
    ids = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(1)).cuda()
    cache = model.new_cache(batch_size=3, max_length=40)
    decoder = GraphedDecoder(model, cache, compile=True)
    assert model.ops is before and all(m.ops is before for m in model.modules() if hasattr(m, "ops"))
    with torch.inference_mode():
        decoder.tokens.copy_(forward(model, ids, cache)[:, -1].argmax(-1, keepdim=True))
    graphed = [decoder.tokens.clone()] + [decoder.step().clone() for _ in range(20)]
    assert torch.equal(torch.cat(graphed, 1).cpu(), _greedy(model, ids, 21))


def test_realistic_head_size_decode_equals_full_forward_across_the_window():
    config = small_config(d_model=256, n_heads=4, n_kv_heads=2, d_ff=512, window=64, vocab_size=512)
    ref = random_model(config)
    gpu = random_model(config).to("cuda")
    gpu.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 512, (2, 150), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = ref(ids)
        assert_close(gpu(ids.cuda()).cpu(), full, atol=2e-3, rtol=2e-3, what="prefill")
        cache = gpu.new_cache(batch_size=2, max_length=150)
        steps = [forward(gpu, ids[:, :40].cuda(), cache, last_only=False)]
        steps += [forward(gpu, ids[:, t : t + 1].cuda(), cache) for t in range(40, 150)]
    assert_close(torch.cat(steps, 1).cpu(), full, atol=2e-3, rtol=2e-3, what="decode")


def test_engine_with_cuda_graph_decode_equals_eager_engine():
    from sambay.generate import Engine, SamplingParams

    model = sambay.load_model(CHECKPOINT, device="cuda", dtype=torch.float32, backend="triton", progress=False)
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    params = SamplingParams(temperature=0.0, max_new_tokens=24, n=2)
    eager = Engine(model, cuda_graphs=False).generate(prompts, params)
    graphed = Engine(model).generate(prompts, params)
    assert [[c.token_ids for c in row] for row in graphed] == [[c.token_ids for c in row] for row in eager]
