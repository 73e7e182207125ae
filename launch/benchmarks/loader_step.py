"""Does the loader keep up with training? The step time of the real training job (the make-train model,
sharded, TrainPipelineSparseDist, fused optimizer) fed by the reader, against the same job fed a few
pre-loaded batches over and over (no loading at all), in one process group.

    torchrun --standalone --nproc_per_node R launch/bench.py loader --in-training --workers 0,1 [--steps 150]
        [--batch-size 512] [--override key=value ...]

Each --workers count gets its own reader (data.workers=N); streamed and pre-loaded steps alternate in blocks
of 25 so that drift (caches, the machine) hits both alike (the pipeline's 2 batches in flight at a switch come
from the other source: the same work either way). Prints one JSON line per count on rank 0:
ms per step streamed and pre-loaded, and their ratio.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

BLOCK = 25  # steps per alternating block
PRELOADED = 8  # batches read ahead of time and cycled through


def bench_in_training(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch
    from omegaconf import OmegaConf
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from data.schema import Schema
    from launch.configs import compose_train
    from pipeline.config import TrainConfig
    from pipeline.dist import init_distributed
    from pipeline.job import build_model, make_reader, seed_everything

    overrides = [f"data.root={args.root}", f"data.batch_size={args.batch_size}", *args.override]
    cfg: TrainConfig = OmegaConf.to_object(compose_train(overrides))  # type: ignore[assignment]
    info = init_distributed(cfg.trainer.device)
    seed_everything(cfg.trainer.seed)
    schema = Schema.from_dict(cfg.data.schema)
    dmp, optimizer = build_model(cfg, schema, info, total_steps=10**6)
    pipeline = TrainPipelineSparseDist(dmp, optimizer, info.device, execute_all_batches=True)
    steps = args.steps - args.steps % BLOCK or BLOCK
    results = []
    for workers in args.workers:
        cfg.data.workers = workers
        reader = make_reader(cfg, schema, info, cfg.data.train_split, train=True)
        streamed = _endless(reader)
        # distinct objects: the pipeline keeps batches in flight, and one object twice in flight is not the
        # real job
        preloaded = itertools.cycle(list(itertools.islice(_endless(reader), PRELOADED)))
        for _ in range(BLOCK):  # warm-up: the workers' first windows, the allocator
            pipeline.progress(streamed)
        seconds = {"streamed": 0.0, "preloaded": 0.0}
        for _ in range(steps // BLOCK):
            for mode, source in (("streamed", streamed), ("preloaded", preloaded)):
                torch.distributed.barrier()
                t0 = time.perf_counter()
                for _ in range(BLOCK):
                    pipeline.progress(source)
                seconds[mode] += time.perf_counter() - t0
        streamed.close()
        row = {
            "workers": workers,
            "ranks": info.world_size,
            "batch_size": cfg.data.batch_size,
            "steps": steps,
            "ms_per_step_streamed": round(1e3 * seconds["streamed"] / steps, 2),
            "ms_per_step_preloaded": round(1e3 * seconds["preloaded"] / steps, 2),
            "streamed_over_preloaded": round(seconds["streamed"] / seconds["preloaded"], 3),
        }
        results.append(row)
        if info.is_main:
            print(json.dumps(row), flush=True)
    torch.distributed.destroy_process_group()
    return results


def _endless(reader: Any) -> Iterator[Any]:
    """The reader's batches, epoch after epoch."""
    for epoch in itertools.count():
        reader.set_epoch(epoch)
        yield from reader
