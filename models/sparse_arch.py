"""Sparse arch: the schema's ID features -> pooled embeddings, with TorchRec's EmbeddingBagCollection.

Design choices:
- One `EmbeddingBagConfig` per schema table (`Schema.tables()`): features that name the same table share it
  (e.g. the candidate `item_id` and the behaviour sequence's item ids), so one schema drives the tables.
- A table's pooling is per table in TorchRec. Single-hot features are indifferent (sum == mean of one row),
  so the pooling comes from the table's multi-valued features; two multi-valued features that disagree are
  a schema error, raised here with both names.
- Behaviour-sequence features are pooled bags here (`sequence=mean_pool`); the sequence's max length is
  enforced by the reader, which keeps the most recent items.
- This module owns no distribution: `pipeline.sharding` shards it with `DistributedModelParallel`.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from data.schema import Schema, SchemaError

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def _table_pooling(schema: Schema, table: str, feature_names: list[str]) -> PoolingType:
    """The pooling of a (possibly shared) table, decided by its multi-valued features."""
    multi: dict[str, str] = {}
    for f in schema.sparse:
        if f.name in feature_names and f.multi_hot:
            multi[f.name] = f.pooling
    if schema.sequence is not None:
        for f in schema.sequence.features:
            if f.name in feature_names:
                multi[f.name] = schema.sequence.pooling
    poolings = set(multi.values())
    if len(poolings) > 1:
        raise SchemaError(
            f"table {table!r}: multi-valued features {sorted(multi)} ask for different poolings "
            f"{multi}; TorchRec pools per table, so give them separate tables or one pooling"
        )
    if poolings:
        return _POOLING[poolings.pop()]
    singles = {f.pooling for f in schema.sparse if f.name in feature_names}
    return _POOLING[singles.pop() if len(singles) == 1 else "sum"]


def embedding_bag_configs(schema: Schema) -> list[EmbeddingBagConfig]:
    """The TorchRec table configs of a schema, in a stable (sorted) order."""
    configs = []
    for table, spec in sorted(schema.tables().items()):
        configs.append(
            EmbeddingBagConfig(
                name=table,
                num_embeddings=spec["num_embeddings"],
                embedding_dim=spec["embedding_dim"],
                feature_names=list(spec["feature_names"]),
                pooling=_table_pooling(schema, table, list(spec["feature_names"])),
            )
        )
    return configs


class SparseArch(nn.Module):
    """KJT of raw IDs (keys = `schema.sparse_keys`) -> KeyedTensor of pooled embeddings, one per feature."""

    def __init__(self, schema: Schema, device: torch.device | None = None) -> None:
        super().__init__()
        self.embedding_bag_collection = EmbeddingBagCollection(
            tables=embedding_bag_configs(schema), device=device
        )

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.embedding_bag_collection(features)
