"""Process group and device from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR...).

nccl for CUDA tensors (plus gloo for CPU ones) with CUDA, gloo on CPU. A plain `python launch/train.py`
(no torchrun) runs as a 1-rank group so the same code path (DistributedModelParallel, collectives) is
exercised everywhere.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import Device
from pipeline.stack import current_stack, describe_device, resolve_device

# torchrun's restart recipe; see shared_store_restarts
RESTART_RECIPE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --rdzv-backend c10d --max-restarts N"


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


def shared_store_restarts() -> bool:
    """True when torchrun may restart this worker group on the rendezvous store of the previous group.

    The agent's shared TCPStore (static rendezvous always, c10d unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)
    outlives a restart, and the process group's keys carry no attempt prefix, so a restarted rank may read a
    dead peer's gloo/NCCL address and fail (`connectFullMesh ... Connection refused`) or hang: pytorch#135712.
    Measured here (gloo, a rank SIGKILLed): 5 of 12 shared-store jobs failed their restarts (static 2/5,
    c10d 3/7); with a fresh store per rendezvous 12 of 12 restarted and resumed (reports/reliability.md).
    """
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    return restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def backend_for(device: torch.device) -> str:
    """The process group's backend for a job on `device`. On CUDA one group carries both: nccl for CUDA
    tensors and gloo for CPU ones, so the CPU-side bookkeeping collectives (row counts, object broadcasts,
    evaluation statistics) are legal on a GPU job, where NCCL alone refuses a CPU tensor."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def served_devices(backend: str) -> set[str]:
    """The device types whose tensors a process group with this backend string takes in a collective:
    'cpu:gloo,cuda:nccl' -> {cpu, cuda}; 'nccl' -> {cuda} (NCCL refuses CPU tensors); 'gloo' -> {cpu}."""
    if ":" in backend:
        return {pair.split(":")[0] for pair in backend.split(",")}
    return {"nccl": {"cuda"}, "gloo": {"cpu"}}.get(backend, set())


def init_distributed(device: Device | str = Device.auto, key: str = "trainer.device") -> DistInfo:
    """Initialise (or reuse) the default process group on `device` (auto | cuda | cpu, the config's `key`:
    pipeline/stack.py `resolve_device`); returns this process's place in it."""
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
    device = resolve_device(device, local_rank, key)  # before any collective: a bad choice fails alone
    backend = backend_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # device_id binds the group to this rank's GPU up front (NCCL connects eagerly, no guessing)
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, local_rank, world_size, local_world_size, device, backend)


def describe_job(info: DistInfo) -> str:
    """The start-of-job line: device, backend, world, and the software stack."""
    return (
        f"device {describe_device(info.device)}, backend {info.backend}, world size {info.world_size} "
        f"({info.local_world_size} per node); {current_stack()}"
    )


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """The value of `obj` on rank `src`, on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
