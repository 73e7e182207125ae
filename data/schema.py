"""The dataset schema: the one contract between data and model (DESIGN.md s.2).

One `Schema` drives the generator, the reader, the model's embedding tables and the tokenizer, so every
feature is described exactly once. `Schema.from_dict` validates eagerly (data.schema_parser) and names
the offending key path in every error, because a typo found here costs seconds and one found
mid-training costs hours.

Layout of the dense tensor: dense features in schema order; a feature with `on_missing: fill` is followed
by one 0/1 indicator column `<name>__missing`.
KJT key order: sparse features in schema order, then sequence features.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

MISSING_SUFFIX = "__missing"


def _plain_value(value: Any) -> Any:
    """A field's value as YAML holds it: a nested spec (ZchSpec) as its mapping."""
    return {f.name: getattr(value, f.name) for f in fields(value)} if is_dataclass(value) else value


class SchemaError(ValueError):
    """An invalid schema; the message starts with the key path, e.g. `schema.sparse[3].group`."""


@dataclass(frozen=True)
class DenseFeature:
    name: str
    column: str
    group: str
    on_missing: str = "error"  # "error": NaN/null rejected by the reader; "fill": fill_value + indicator
    fill_value: float = 0.0


@dataclass(frozen=True)
class ZchSpec:
    """Managed collisions (`zch:` on a feature; its table's): raw int64 ids of any range, each given a row of
    the table while it is in use, the least frequently (lfu) or least recently (lru) used one evicted when
    the table is full; unseen ids at evaluation and serving take a reserved default row (models/zch.py)."""

    eviction: str = "lfu"  # lfu | lru
    eviction_interval: int = 1  # training steps between admissions; 1: a batch's new ids get rows at once


@dataclass(frozen=True)
class SparseFeature:
    name: str
    column: str
    num_embeddings: int
    embedding_dim: int
    group: str
    pooling: str = "sum"
    multi_hot: bool = False  # list<int64> column instead of an int64 column
    hash: bool = False  # map raw ids into [0, num_embeddings) (data.hashing) instead of rejecting them
    table: str | None = None  # features naming the same table share one embedding table
    zch: ZchSpec | None = None  # managed collisions: raw ids of any range (single-valued features only)

    @property
    def table_name(self) -> str:
        return self.table or self.name


@dataclass(frozen=True)
class SequenceFeature:
    name: str
    column: str  # list<int64>, position-aligned with the other sequence columns, most recent item last
    num_embeddings: int
    embedding_dim: int
    hash: bool = False
    table: str | None = None
    zch: ZchSpec | None = None  # as SparseFeature.zch (a table shared with a zch feature must say so too)

    @property
    def table_name(self) -> str:
        return self.table or self.name


@dataclass(frozen=True)
class SequenceSpec:
    group: str
    max_len: int  # the reader keeps the last min(len, max_len) items
    features: tuple[SequenceFeature, ...]
    pooling: str = "mean"


@dataclass(frozen=True)
class Schema:
    name: str
    labels: tuple[str, ...]
    user_id: str
    dense: tuple[DenseFeature, ...]
    sparse: tuple[SparseFeature, ...]
    sequence: SequenceSpec | None
    groups: tuple[str, ...]
    # Roles of groups (`roles:` in YAML): the groups that describe the candidate item and the user.
    # model.sequence=longer builds its candidate / user global tokens from them.
    candidate_groups: tuple[str, ...] = ()
    user_groups: tuple[str, ...] = ()
    # The sample-weight column (`weight:` in YAML): a non-negative number per row that scales the row's
    # loss and its share of the weighted metrics (AUC, logloss, NE, calibration); None: every row 1.
    weight: str | None = None
    # derived lookups, filled in __post_init__ (not part of equality / repr)
    _by_name: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name: dict[str, Any] = {f.name: f for f in (*self.dense, *self.sparse)}
        if self.sequence is not None:
            by_name.update({f.name: f for f in self.sequence.features})
        object.__setattr__(self, "_by_name", by_name)

    # ---------------------------------------------------------------- derived views
    @property
    def task_names(self) -> tuple[str, ...]:
        return self.labels

    @property
    def sequence_features(self) -> tuple[SequenceFeature, ...]:
        return self.sequence.features if self.sequence is not None else ()

    @property
    def dense_names(self) -> tuple[str, ...]:
        """Name of each dense tensor column, in order (indicator columns included)."""
        out: list[str] = []
        for f in self.dense:
            out.append(f.name)
            if f.on_missing == "fill":
                out.append(f.name + MISSING_SUFFIX)
        return tuple(out)

    @property
    def dense_dim(self) -> int:
        return len(self.dense_names)

    @property
    def dense_groups(self) -> tuple[str, ...]:
        """Group of each dense tensor column, in order (an indicator belongs to its feature's group)."""
        out: list[str] = []
        for f in self.dense:
            out.extend([f.group] * (2 if f.on_missing == "fill" else 1))
        return tuple(out)

    @property
    def zch_tables(self) -> dict[str, ZchSpec]:
        """{table: its managed-collision spec} of the tables with `zch`."""
        return {f.table_name: f.zch for f in (*self.sparse, *self.sequence_features) if f.zch is not None}

    @property
    def sparse_keys(self) -> tuple[str, ...]:
        """KJT key order: sparse features in schema order, then sequence features."""
        return tuple(f.name for f in self.sparse) + tuple(f.name for f in self.sequence_features)

    def tables(self) -> dict[str, dict[str, Any]]:
        """Embedding tables (sparse and sequence): name -> {num_embeddings, embedding_dim, feature_names}."""
        out: dict[str, dict[str, Any]] = {}
        for f in (*self.sparse, *self.sequence_features):
            t = out.setdefault(
                f.table_name,
                {"num_embeddings": f.num_embeddings, "embedding_dim": f.embedding_dim, "feature_names": []},
            )
            t["feature_names"].append(f.name)
        return out

    def feature(self, name: str) -> DenseFeature | SparseFeature | SequenceFeature:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no feature named {name!r} in schema {self.name!r}") from None

    def group_of(self, feature_name: str) -> str:
        f = self.feature(feature_name)
        if isinstance(f, SequenceFeature):
            assert self.sequence is not None
            return self.sequence.group
        return f.group

    def columns(self, labels: bool = True) -> list[str]:
        """Every Parquet column the reader needs, each once, in a stable order (`labels=False`: scoring
        data, which need not have the label columns)."""
        cols = [*(self.labels if labels else ()), self.user_id]
        if labels and self.weight is not None:
            cols.append(self.weight)
        cols += [f.column for f in self.dense]
        cols += [f.column for f in self.sparse]
        cols += [f.column for f in self.sequence_features]
        return list(dict.fromkeys(cols))

    def to_dict(self) -> dict[str, Any]:
        """The mapping `from_dict` accepts (round-trips)."""

        def plain(obj: Any) -> dict[str, Any]:
            return {f.name: _plain_value(getattr(obj, f.name)) for f in fields(obj)}

        d: dict[str, Any] = {
            "name": self.name,
            "labels": list(self.labels),
            "user_id": self.user_id,
            "groups": list(self.groups),
            "dense": [plain(f) for f in self.dense],
            "sparse": [plain(f) for f in self.sparse],
            "sequence": None,
        }
        if self.weight is not None:
            d["weight"] = self.weight
        if self.candidate_groups or self.user_groups:
            d["roles"] = {"candidate": list(self.candidate_groups), "user": list(self.user_groups)}
        if self.sequence is not None:
            s = self.sequence
            d["sequence"] = {
                "group": s.group,
                "max_len": s.max_len,
                "pooling": s.pooling,
                "features": [plain(f) for f in s.features],
            }
        return d

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Schema:
        from data.schema_parser import parse_schema  # deferred: the parser imports this module

        return parse_schema(d, "schema")

    @classmethod
    def load(cls, path: str | Path) -> Schema:
        """A YAML file holding the schema mapping itself or a data config with a top-level `schema:` key."""
        with open(path) as fh:
            d = yaml.safe_load(fh)
        if not isinstance(d, Mapping):
            raise SchemaError(f"{path}: expected a mapping at the top level, got {type(d).__name__}")
        if "schema" in d:
            d = d["schema"]
        return cls.from_dict(d)
