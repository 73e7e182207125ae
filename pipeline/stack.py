"""The software stack a job runs on (torch, fbgemm_gpu, torchrec builds) and the device it may use.

Two stacks exist (requirements/cpu.txt, requirements/cuda.txt); `make venv STACK=cuda|cpu` builds one and
checks it with `python -m pipeline.stack --expect STACK`, and every job names its stack in its first log
line. The check exists because pip never switches stacks by itself: `torch==2.13.0` is satisfied by an
installed `2.13.0+cpu`, and fbgemm-gpu and fbgemm-gpu-cpu write the same `fbgemm_gpu/` folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from importlib import metadata

import torch

from pipeline.config import Device

# The CUDA stack's build: PyPI's torch 2.13.0 Linux wheels are CUDA 13.0 builds (they require
# cuda-toolkit 13.0.3 and nvidia-nccl-cu13 2.29.7), and PyPI's fbgemm-gpu 1.8.0 links libcudart.so.13: one
# CUDA major for both, from the one index every mirror carries, so no extra index URL is needed.
CUDA_BUILD = "13.0"


@dataclass(frozen=True)
class Stack:
    torch: str
    torch_cuda: str | None  # the CUDA version torch was built with; None: a CPU build
    fbgemm_gpu: str
    fbgemm_variant: str  # "cuda" (the fbgemm-gpu wheel), "cpu" (fbgemm-gpu-cpu), "both" or "none"
    torchrec: str

    @property
    def name(self) -> str:
        """cuda when torch and fbgemm_gpu are both CUDA builds, cpu when both are CPU builds, else mixed."""
        kinds = {"cuda" if self.torch_cuda else "cpu", self.fbgemm_variant}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def __str__(self) -> str:
        cuda = f"CUDA {self.torch_cuda} build" if self.torch_cuda else "CPU build"
        return (
            f"torch {self.torch} ({cuda}), fbgemm_gpu {self.fbgemm_gpu} ({self.fbgemm_variant}), "
            f"torchrec {self.torchrec}"
        )


def current_stack() -> Stack:
    """The installed builds, read from the packages' metadata: importing the CUDA fbgemm_gpu loads its
    libraries, which fails on a host without a driver, where a CUDA image is often built."""
    fbgemm = {}
    for dist, variant in (("fbgemm-gpu", "cuda"), ("fbgemm-gpu-cpu", "cpu")):
        try:
            fbgemm[variant] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    variant = next(iter(fbgemm)) if len(fbgemm) == 1 else ("both" if fbgemm else "none")
    try:
        torchrec = metadata.version("torchrec")
    except metadata.PackageNotFoundError:
        torchrec = "not installed"
    return Stack(
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        fbgemm_gpu=" / ".join(fbgemm.values()) or "not installed",
        fbgemm_variant=variant,
        torchrec=torchrec,
    )


def stack_problem(expected: str, stack: Stack | None = None) -> str | None:
    """One line saying how the installed stack is not the `expected` one (cpu | cuda), or None."""
    stack = stack or current_stack()
    if expected == "cuda" and stack.name == "cuda" and stack.torch_cuda != CUDA_BUILD:
        return f"stack: {stack}: expected the CUDA {CUDA_BUILD} build of requirements/cuda.txt"
    if stack.name != expected:
        return f"stack: expected the {expected} stack, found {stack}; rebuild it: make venv STACK={expected}"
    return None


def gpu_present() -> bool:
    """An NVIDIA GPU's device node exists, whether or not this torch can use it."""
    return os.path.exists("/dev/nvidia0")


def resolve_device(choice: Device | str, local_rank: int, key: str = "trainer.device") -> torch.device:
    """This rank's device for `choice`. `cuda` fails in one ValueError line naming what is missing; `auto`
    takes the GPU when the stack can use it and otherwise the CPU, saying so when a GPU is there."""
    choice = Device.parse(choice, key)
    if choice == Device.cpu:
        return torch.device("cpu")
    stack = current_stack()
    if choice == Device.auto and not torch.cuda.is_available():
        if gpu_present():
            print(f"warning: {key}=auto runs on the CPU: a GPU is here, but {stack} cannot use it "
                  f"(make venv STACK=cuda; {key}=cpu silences this)", file=sys.stderr)  # fmt: skip
        return torch.device("cpu")
    if stack.torch_cuda is None:
        raise ValueError(f"{key}=cuda: {stack} has no CUDA; build the CUDA stack: make venv STACK=cuda")
    if not torch.cuda.is_available():
        raise ValueError(
            f"{key}=cuda: no usable GPU ({stack}; torch.cuda.is_available() is False: check the NVIDIA "
            f"driver and CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')})"
        )
    if stack.fbgemm_variant != "cuda":
        raise ValueError(f"{key}: {stack}: fbgemm_gpu is not the CUDA build; rebuild: make venv STACK=cuda")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"{key}: LOCAL_RANK {local_rank} has no GPU (this node has {torch.cuda.device_count()}); "
            "start one process per GPU (torchrun --nproc_per_node <GPUs>)"
        )
    return torch.device("cuda", local_rank)


def describe_device(device: torch.device) -> str:
    if device.type != "cuda":
        return str(device)
    props = torch.cuda.get_device_properties(device)
    return f"{device} ({props.name}, {props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor})"


def main() -> None:
    parser = argparse.ArgumentParser(description="Check the installed torch / fbgemm_gpu / torchrec stack.")
    parser.add_argument("--expect", choices=["cpu", "cuda"], required=True)
    args = parser.parse_args()
    problem = stack_problem(args.expect)
    if problem:
        sys.exit(problem)
    print(f"stack {args.expect}: {current_stack()}")


if __name__ == "__main__":
    main()
