"""Parameter initialisation for every SambaY parameter, in one function.

| parameter                         | init                                       | why / source                       |
|-----------------------------------|--------------------------------------------|------------------------------------|
| embed, every Linear weight        | normal(0, 0.02)                            | standard parametrisation (spec §7) |
| every out_proj weight             | normal(0, 0.02 / sqrt(2 · n_layers))       | GPT-2 residual scaling             |
| Linear biases                     | 0                                          |                                    |
| LayerNorm / subln weights, biases | 1, 0                                       |                                    |
| Mamba conv weight, bias           | uniform(±1/sqrt(d_conv))                   | PyTorch Conv1d default, as Mamba   |
| Mamba dt_proj weight              | uniform(±dt_rank^-0.5)                     | Mamba `dt_init="random"`           |
| Mamba dt_proj bias                | softplus⁻¹(Δ), Δ ~ log-uniform[1e-3, 1e-1] | Mamba `dt_min`, `dt_max`           |
| Mamba A_log                       | log(1 … d_state) per channel               | Mamba S4D-real init                |
| Mamba D                           | 1                                          | Mamba                              |
| λ_q1, λ_k1, λ_q2, λ_k2            | normal(0, 0.1)                             | Differential Transformer           |
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sambay.model.attention import DifferentialCore
from sambay.model.mamba import Mamba


@torch.no_grad()
def init_weights(model: nn.Module, n_layers: int, generator: torch.Generator | None = None) -> None:
    """Initialise every parameter of ``model`` in place (see the table above)."""
    residual_std = 0.02 / math.sqrt(2 * n_layers)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            std = residual_std if name.endswith("out_proj") else 0.02
            module.weight.normal_(0.0, std, generator=generator)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, 0.02, generator=generator)
        elif isinstance(module, nn.LayerNorm | nn.RMSNorm):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    for module in model.modules():
        if isinstance(module, Mamba):
            _init_mamba(module, generator)
        elif isinstance(module, DifferentialCore):
            for p in module.fp32_parameters():
                p.normal_(0.0, 0.1, generator=generator)


def _init_mamba(m: Mamba, generator: torch.Generator | None) -> None:
    bound = 1.0 / math.sqrt(m.conv.weight.shape[-1])
    m.conv.weight.uniform_(-bound, bound, generator=generator)
    if m.conv.bias is not None:
        m.conv.bias.uniform_(-bound, bound, generator=generator)
    m.dt_proj.weight.uniform_(-(m.dt_rank**-0.5), m.dt_rank**-0.5, generator=generator)
    d_inner, d_state = m.A_log.shape
    u = torch.rand(d_inner, generator=generator, device=m.A_log.device)
    dt = torch.exp(u * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
    m.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)
    a = torch.arange(1, d_state + 1, dtype=torch.float32, device=m.A_log.device)
    m.A_log.copy_(torch.log(a).expand(d_inner, d_state))
    m.D.fill_(1.0)
