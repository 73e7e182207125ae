"""Sparse arch: the schema's ID features -> pooled embeddings, with TorchRec's EmbeddingBagCollection.

Design choices:
- One `EmbeddingBagConfig` per schema table (`Schema.tables()`): features that name the same table share it
  (e.g. the candidate `item_id` and the behaviour sequence's item ids), so one schema drives the tables.
- A table's pooling is per table. Single-hot features are indifferent (sum == mean of one row), so the
  pooling comes from the table's multi-valued features; two multi-valued features that disagree are a
  schema error, raised here with both names.
- TorchRec's tables always sum; mean-pooled features are divided by their bag sizes here (`mean_pool`).
  TorchRec's own mean, under row-wise sharding, divides every feature of the bag collection by its bag
  size once any row-wise table is mean-pooled (its divisor leaves only row-wise sum features alone;
  TorchRec 1.8, measured: a table-wise mean feature came out divided twice), so a plan mixing row-wise
  and other shardings would train and serve another model than the unsharded one.
- Behaviour sequences (`model.sequence`): `mean_pool` pools them as bags here; `none` leaves them out;
  `longer` looks them up unpooled with an `EmbeddingCollection` (sharded by the planner like the bags),
  together with every other feature on the same tables (e.g. the candidate `item_id` shares the item
  table with the sequence's item ids), so a shared table stays one table. The other features stay in the
  bag collection. TorchRec's EmbeddingCollection needs one embedding dim for all its tables; a schema
  whose sequence tables differ is a schema error. The sequence's max length is enforced by the reader,
  which keeps the most recent items.
- The first-order (wide) term (`model.wide`): one small table per ID feature of the schema's `sparse`
  list, `wide_<feature>`, whose row holds the id's learned bias for each task, pooled like the feature and
  summed over features into (B, num_tasks) (Wide & Deep's wide part, FM's first order). Its tables are
  ordinary TorchRec bags, so the planner shards them and the fused sparse optimizer trains them like the
  others. FBGEMM's tables need an embedding dim that is a multiple of 4, so a row holds num_tasks biases
  rounded up to a multiple of 4 and the rest stay unused (their gradient is 0). They start at 0: the
  model starts as without them. Two bag collections, because TorchRec's pipeline needs each sharded module
  fed a KJT straight from the batch: the features in `features` and those in `unpooled` (sequence=longer
  moves the candidate item id there).
- Managed collisions (`zch:` on a table, `ZchSpec`): its bags go into a TorchRec
  `ManagedCollisionEmbeddingBagCollection`, whose per-table module maps raw int64 ids to rows (admitting
  new ids in training, evicting by LFU/LRU when full, unseen ids to the table's reserved last row at
  evaluation). It is fed the same KJT as the plain bags (each takes its own keys) and its pooled output
  joins theirs (`concat_keyed`). `input_hash_size=0` routes ids to ranks by id modulo the buckets (TorchRec's
  default sends every id below 2^62 to rank 0); one bucket per rank (`zch_buckets`), as the row-wise
  sharding TorchRec allows for it requires. Tables looked up unpooled (sequence=longer) cannot be zch yet.
- This module owns no distribution: `pipeline.sharding` shards it with `DistributedModelParallel`.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.profiler import record_function
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.modules.mc_modules import (
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from data.schema import Schema, SchemaError, ZchSpec

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
_DATA_TYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16}  # model.table_dtype


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


SEQUENCE_MODES = ("none", "mean_pool", "longer")


def input_keys(schema: Schema, sequence: str = "mean_pool") -> tuple[list[str], list[str]]:
    """(pooled keys, unpooled keys): the KJT keys of the bag collection and of the embedding collection,
    in schema key order."""
    if sequence not in SEQUENCE_MODES:
        raise ValueError(f"model.sequence must be one of {SEQUENCE_MODES}, got {sequence!r}")
    seq_names = {f.name for f in schema.sequence_features}
    if sequence == "mean_pool":
        return list(schema.sparse_keys), []
    if sequence == "none":
        return [k for k in schema.sparse_keys if k not in seq_names], []
    table_of = {name: t for t, spec in schema.tables().items() for name in spec["feature_names"]}
    unpooled_tables = {table_of[name] for name in seq_names}
    unpooled = [k for k in schema.sparse_keys if table_of[k] in unpooled_tables]
    return [k for k in schema.sparse_keys if k not in unpooled], unpooled


def _tables_for(schema: Schema, keys: list[str]) -> list[tuple[str, dict, list[str]]]:
    """(table, spec, features among `keys`) of every table some key uses, sorted by table name."""
    wanted = set(keys)
    out = []
    for table, spec in sorted(schema.tables().items()):
        names = [n for n in spec["feature_names"] if n in wanted]
        if names:
            out.append((table, spec, names))
    return out


def embedding_bag_configs(
    schema: Schema, keys: list[str] | None = None, dtype: str = "fp32"
) -> list[EmbeddingBagConfig]:
    """The TorchRec bag configs of a schema's features `keys` (default: all), in a stable (sorted) order,
    stored as `dtype` (fp32 | fp16). Every table sums; `feature_poolings` says which features `mean_pool`
    turns into means."""
    return [
        EmbeddingBagConfig(
            name=table,
            num_embeddings=spec["num_embeddings"],
            embedding_dim=spec["embedding_dim"],
            feature_names=names,
            pooling=PoolingType.SUM,
            data_type=_DATA_TYPES[dtype],
        )
        for table, spec, names in _tables_for(schema, list(schema.sparse_keys) if keys is None else keys)
    ]


def feature_poolings(schema: Schema, keys: list[str]) -> dict[str, str]:
    """{feature: "sum" | "mean"} of the bag-pooled features `keys`: their table's pooling."""
    return {
        name: _table_pooling(schema, table, names).value.lower()
        for table, _, names in _tables_for(schema, keys)
        for name in names
    }


@torch.fx.wrap  # one node for TorchRec's pipeline tracer: the key bookkeeping is not traceable
def mean_pool(pooled: KeyedTensor, features: KeyedJaggedTensor, mean_keys: tuple[str, ...]) -> KeyedTensor:
    """Summed bags -> means for the features in `mean_keys` (an empty bag stays 0)."""
    with record_function("## mean_pool ##"):  # a part of pipeline/profiler.py's step breakdown
        keys, batch = features.keys(), features.stride()
        values = pooled.values()  # (B, sum of dims)
        lengths = features.lengths().view(len(keys), batch).clamp_min(1)  # (F, B), KJT key order
        table = torch.cat([lengths, lengths.new_ones(1, batch)])  # (F + 1, B); the last row divides by 1
        dims = pooled.length_per_key()
        rows = _mean_pool_rows(tuple(keys), tuple(pooled.keys()), mean_keys, tuple(dims), table.device)
        # (B, sum of dims), each column's divisor: one gather from the small table, contiguous (a strided
        # divisor would slow the division and its backward)
        divisor = table.to(values.dtype).T.index_select(1, rows)
        return KeyedTensor(keys=pooled.keys(), length_per_key=dims, values=values / divisor)


@functools.cache
def _mean_pool_rows(
    keys: tuple[str, ...],
    pooled_keys: tuple[str, ...],
    mean_keys: tuple[str, ...],
    dims: tuple[int, ...],
    device: torch.device,
) -> torch.Tensor:
    """The lengths row dividing each pooled column (sum of dims,), as a tensor on `device`, made once per
    key order: a tensor built from a Python list every forward is a blocking host-to-device copy on a GPU.
    Key orders are fixed once the model is sharded, so the cache holds one entry per collection."""
    row = {k: i for i, k in enumerate(keys)}
    index = [row[k] if k in mean_keys else len(keys) for k in pooled_keys]
    return torch.tensor([i for i, d in zip(index, dims) for _ in range(d)], device=device)


@torch.fx.wrap  # one node for TorchRec's pipeline tracer: key lists are not traceable
def concat_keyed(a: KeyedTensor, b: KeyedTensor) -> KeyedTensor:
    """Two KeyedTensors of the same rows as one (a's keys, then b's)."""
    return KeyedTensor(
        keys=[*a.keys(), *b.keys()],
        length_per_key=[*a.length_per_key(), *b.length_per_key()],
        values=torch.cat([a.values(), b.values()], dim=1),
    )


def managed_collision_bags(
    configs: list[EmbeddingBagConfig], specs: dict[str, ZchSpec], device: torch.device | None, buckets: int
) -> ManagedCollisionEmbeddingBagCollection:
    """The bags of the zch tables behind TorchRec's managed-collision modules (one per table)."""
    policies = {"lfu": LFU_EvictionPolicy, "lru": LRU_EvictionPolicy}
    modules = {
        c.name: MCHManagedCollisionModule(
            zch_size=c.num_embeddings,
            device=device,
            eviction_policy=policies[specs[c.name].eviction](),
            eviction_interval=specs[c.name].eviction_interval,
            input_hash_size=0,  # route by id modulo buckets (the default sends ids < 2^62 to rank 0)
            buckets=buckets,
        )
        for c in configs
    }
    return ManagedCollisionEmbeddingBagCollection(
        EmbeddingBagCollection(tables=configs, device=device),
        ManagedCollisionCollection(modules, configs),
        return_remapped_features=False,
    )


def wide_bag_configs(schema: Schema, keys: list[str], width: int) -> list[EmbeddingBagConfig]:
    """The first-order term's tables of the schema's `sparse` features among `keys`: `wide_<feature>`, one
    row of `width` per id, starting at 0."""
    return [
        EmbeddingBagConfig(
            name=f"wide_{f.name}",
            num_embeddings=f.num_embeddings,
            embedding_dim=width,
            feature_names=[f.name],
            pooling=PoolingType.SUM,
            init_fn=torch.nn.init.zeros_,
        )
        for f in schema.sparse
        if f.name in keys and f.zch is None  # raw ids index no table: a zch feature has no wide term yet
    ]


def embedding_configs(schema: Schema, keys: list[str], dtype: str = "fp32") -> list[EmbeddingConfig]:
    """Unpooled table configs for the embedding collection, stored as `dtype`; one embedding dim for all
    (TorchRec's rule)."""
    tables = _tables_for(schema, keys)
    dims = {table: spec["embedding_dim"] for table, spec, _ in tables}
    if len(set(dims.values())) > 1:
        raise SchemaError(
            f"sequence=longer looks up tables {sorted(dims)} unpooled, and TorchRec's EmbeddingCollection "
            f"needs one embedding_dim for all of them; got {dims}"
        )
    return [
        EmbeddingConfig(
            name=table,
            num_embeddings=spec["num_embeddings"],
            embedding_dim=spec["embedding_dim"],
            feature_names=names,
            data_type=_DATA_TYPES[dtype],
        )  # fmt: skip
        for table, spec, names in tables
    ]


class SparseArch(nn.Module):
    """KJTs of raw IDs -> (pooled embeddings as a KeyedTensor, unpooled ones as {feature: JaggedTensor}).

    `features` has the pooled keys, `unpooled` (sequence=longer only) the unpooled keys of `input_keys`."""

    def __init__(
        self,
        schema: Schema,
        sequence: str = "mean_pool",
        device: torch.device | None = None,
        table_dtype: str = "fp32",
        wide: bool = False,
        zch_buckets: int = 1,
    ):
        super().__init__()
        self.pooled_keys, self.unpooled_keys = input_keys(schema, sequence)
        self.poolings = feature_poolings(schema, self.pooled_keys)
        self.mean_keys = tuple(k for k, p in self.poolings.items() if p == "mean")  # fx takes no sets
        bag_configs = embedding_bag_configs(schema, self.pooled_keys, table_dtype)
        zch = schema.zch_tables
        unpooled_zch = sorted({t.name for t in embedding_configs(schema, self.unpooled_keys)} & set(zch))
        if unpooled_zch:
            raise SchemaError(
                f"tables {unpooled_zch}: zch on a table looked up unpooled (model.sequence=longer) is not "
                "supported; use hash: true there or model.sequence=mean_pool"
            )
        plain = [c for c in bag_configs if c.name not in zch]
        if not plain:
            raise SchemaError("zch on every table: keep at least one table without it")
        self.embedding_bag_collection = EmbeddingBagCollection(tables=plain, device=device)
        zch_configs = [c for c in bag_configs if c.name in zch]
        self.zch_bags = managed_collision_bags(zch_configs, zch, device, zch_buckets) if zch_configs else None
        self.zch_configs = zch_configs  # plain configs: the sharded module no longer exposes them
        self.embedding_collection = (
            EmbeddingCollection(
                tables=embedding_configs(schema, self.unpooled_keys, table_dtype), device=device
            )
            if self.unpooled_keys
            else None
        )
        self.num_tasks = len(schema.labels)
        self.wide_width = 4 * math.ceil(self.num_tasks / 4)  # FBGEMM: a multiple of 4
        self.wide_bags: nn.ModuleList = nn.ModuleList()  # [on `features`, on `unpooled`], when model.wide
        self.wide_mean_keys: list[tuple[str, ...]] = []
        if wide:
            for keys in (self.pooled_keys, self.unpooled_keys):
                configs = wide_bag_configs(schema, keys, self.wide_width)
                bags = EmbeddingBagCollection(tables=configs, device=device) if configs else None
                self.wide_bags.append(bags or nn.Identity())  # Identity: no feature of this KJT
                pooling = {f.name: f.pooling for f in schema.sparse}
                self.wide_mean_keys.append(
                    tuple(n for c in configs for n in c.feature_names if pooling[n] == "mean")
                )

    def wide_collections(self) -> list[tuple[EmbeddingBagCollection, tuple[str, ...]]]:
        """The first-order term's bag collections (model.wide) with their mean-pooled features."""
        pairs = zip(self.wide_bags, self.wide_mean_keys)
        return [(bags, mean) for bags, mean in pairs if not isinstance(bags, nn.Identity)]

    @property
    def zch_tables(self) -> set[str]:
        """The managed-collision tables (row-wise sharded: the only sharding TorchRec has for them)."""
        return {c.name for c in self.zch_configs}

    @property
    def wide_tables(self) -> set[str]:
        return {c.name for bags, _ in self.wide_collections() for c in bags.embedding_bag_configs()}

    def table_names(self) -> list[str]:
        """Every table this arch looks up (the planner's per-table constraints), sorted."""
        names = [c.name for c in self.embedding_bag_collection.embedding_bag_configs()]
        names += sorted(self.zch_tables)
        if self.embedding_collection is not None:
            names += [c.name for c in self.embedding_collection.embedding_configs()]
        return sorted({*names, *self.wide_tables})

    def wide_logits(
        self, features: KeyedJaggedTensor, unpooled: KeyedJaggedTensor | None = None
    ) -> torch.Tensor | None:
        """The first-order term (B, num_tasks): each feature's pooled per-id biases, summed over features;
        None without model.wide."""
        total = None
        for bags, mean_keys, kjt in zip(self.wide_bags, self.wide_mean_keys, (features, unpooled)):
            if isinstance(bags, nn.Identity):  # no feature of this KJT (a sharded collection is no EBC)
                continue
            pooled = bags(kjt)
            if mean_keys:
                pooled = mean_pool(pooled, kjt, mean_keys)
            values = pooled.values()  # (B, F * width), one width per feature
            term = values.unflatten(1, (-1, self.wide_width)).sum(1)[:, : self.num_tasks]  # (B, T)
            total = term if total is None else total + term
        return total

    def forward(
        self, features: KeyedJaggedTensor, unpooled: KeyedJaggedTensor | None = None
    ) -> tuple[KeyedTensor, dict[str, JaggedTensor] | None]:
        pooled = self.embedding_bag_collection(features)
        if self.mean_keys:
            pooled = mean_pool(pooled, features, self.mean_keys)
        if self.zch_bags is not None:
            remapped, _ = self.zch_bags(features)  # raw ids -> rows, then the bags
            if self.mean_keys:
                remapped = mean_pool(remapped, features, self.mean_keys)
            pooled = concat_keyed(pooled, remapped)
        if self.embedding_collection is None:
            return pooled, None
        return pooled, self.embedding_collection(unpooled)
