"""Parallelism for inference, applied from outside the model code (which never imports torch.distributed).

- `tensor_parallel(model, group)`: shard an unmodified SambaY over a process group, in place.
  Its `new_cache` then sizes the cache for this rank's heads and channels.
- `check_tensor_parallel(config, n)`: the clear error when a model cannot be split n ways.
- `torchrun_group`, `agree_on_rng`: joining a torchrun launch from the CLI.
"""

from sambay.parallel.launch import Member, agree_on_rng, torchrun_group
from sambay.parallel.tp import TensorParallel, check_tensor_parallel, tensor_parallel

__all__ = [
    "Member",
    "TensorParallel",
    "agree_on_rng",
    "check_tensor_parallel",
    "tensor_parallel",
    "torchrun_group",
]
