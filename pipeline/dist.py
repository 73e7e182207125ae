"""Process group and device from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR...).

nccl with CUDA, gloo on CPU. A plain `python launch/train.py` (no torchrun) runs as a 1-rank group so the
same code path (DistributedModelParallel, collectives) is exercised everywhere.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Initialise (or reuse) the default process group; returns this process's place in it."""
    if "RANK" not in os.environ:  # not under torchrun: a single-process group on loopback
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank, local_rank, world_size, local_world_size, device, backend)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """The value of `obj` on rank `src`, on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
