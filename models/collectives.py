"""Collectives the model itself needs, and the pipeline reuses rather than writing its own.

Sparse-MoE's controllers steer on routing statistics of the global batch, so the model averages them over
ranks inside its training forward (TorchRec's DDP does not broadcast buffers, and ranks must not drift
apart); the pipeline averages losses and evaluation statistics the same way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over the default process group: a new tensor, `value` is left as it is. Without a
    process group (or with one rank, or under fx tracing, where there is nothing to reduce) a copy."""
    if isinstance(value, torch.fx.Proxy):
        return value
    total = value.clone()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return total
    dist.all_reduce(total)
    return total / dist.get_world_size()
