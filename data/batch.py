"""RecBatch: what the reader yields and TrainPipelineSparseDist moves to the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class RecBatch(Pipelineable):
    dense: torch.Tensor  # (B, Nd) float32, schema.dense_names order
    sparse: KeyedJaggedTensor  # keys = schema.sparse_keys, lengths/values int64
    labels: torch.Tensor  # (B, n_tasks) float32, schema.labels order
    user_id: torch.Tensor  # (B,) int64, the raw user id column
    mask: torch.Tensor  # (B,) bool, False for padding rows (reader policy "pad")
    weight: torch.Tensor  # (B,) float32, each row's share of the loss and metrics: 0 for padding rows
    # ID features looked up unpooled (sequence=longer: the sequence features and every feature sharing a
    # table with them), keys = SparseArch.input_keys(...)[1]; None when the model pools everything
    sequence: KeyedJaggedTensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device, non_blocking: bool = False) -> RecBatch:
        seq = self.sequence
        return RecBatch(
            dense=self.dense.to(device=device, non_blocking=non_blocking),
            sparse=self.sparse.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            user_id=self.user_id.to(device=device, non_blocking=non_blocking),
            mask=self.mask.to(device=device, non_blocking=non_blocking),
            weight=self.weight.to(device=device, non_blocking=non_blocking),
            sequence=None if seq is None else seq.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.dense.record_stream(stream)
        self.sparse.record_stream(stream)
        self.labels.record_stream(stream)
        self.user_id.record_stream(stream)
        self.mask.record_stream(stream)
        self.weight.record_stream(stream)
        if self.sequence is not None:
            self.sequence.record_stream(stream)

    def pin_memory(self) -> RecBatch:
        return RecBatch(
            dense=self.dense.pin_memory(),
            sparse=self.sparse.pin_memory(),
            labels=self.labels.pin_memory(),
            user_id=self.user_id.pin_memory(),
            mask=self.mask.pin_memory(),
            weight=self.weight.pin_memory(),
            sequence=None if self.sequence is None else self.sequence.pin_memory(),
        )
