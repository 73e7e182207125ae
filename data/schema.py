"""The dataset schema: the one contract between data and model (DESIGN.md s.2).

One `Schema` drives the generator, the reader, the model's embedding tables and the tokenizer, so every
feature is described exactly once. `Schema.from_dict` validates eagerly and names the offending key path
in every error, because a typo found here costs seconds and one found mid-training costs hours.

Layout of the dense tensor: dense features in schema order; a feature with `on_missing: fill` is followed
by one 0/1 indicator column `<name>__missing`.
KJT key order: sparse features in schema order, then sequence features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

MISSING_SUFFIX = "__missing"
_ON_MISSING = ("error", "fill")
_SPARSE_POOLING = ("sum", "mean")
_SEQUENCE_POOLING = ("mean", "sum", "none")


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

    def columns(self) -> list[str]:
        """Every Parquet column the reader needs, each once, in a stable order."""
        cols = [*self.labels, self.user_id]
        cols += [f.column for f in self.dense]
        cols += [f.column for f in self.sparse]
        cols += [f.column for f in self.sequence_features]
        return list(dict.fromkeys(cols))

    def to_dict(self) -> dict[str, Any]:
        """The mapping `from_dict` accepts (round-trips)."""

        def plain(obj: Any) -> dict[str, Any]:
            return {f.name: getattr(obj, f.name) for f in fields(obj)}

        d: dict[str, Any] = {
            "name": self.name,
            "labels": list(self.labels),
            "user_id": self.user_id,
            "groups": list(self.groups),
            "dense": [plain(f) for f in self.dense],
            "sparse": [plain(f) for f in self.sparse],
            "sequence": None,
        }
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
        return _Parser().schema(d, "schema")

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


# -------------------------------------------------------------------- validation
class _Parser:
    """Turns a plain mapping into a Schema, checking types and cross-references as it goes."""

    def schema(self, d: Any, path: str) -> Schema:
        self._mapping(
            d,
            path,
            required=("name", "labels", "user_id", "groups"),
            optional=("dense", "sparse", "sequence"),
        )
        name = self._str(d["name"], f"{path}.name")
        labels = tuple(
            self._str(x, f"{path}.labels[{i}]")
            for i, x in enumerate(self._list(d["labels"], f"{path}.labels"))
        )
        if not labels:
            raise SchemaError(f"{path}.labels: at least one label is required")
        self._unique(labels, f"{path}.labels", "label")
        user_id = self._str(d["user_id"], f"{path}.user_id")
        groups = tuple(
            self._str(x, f"{path}.groups[{i}]")
            for i, x in enumerate(self._list(d["groups"], f"{path}.groups"))
        )
        if not groups:
            raise SchemaError(f"{path}.groups: at least one group is required")
        self._unique(groups, f"{path}.groups", "group")

        dense = tuple(
            self.dense(x, f"{path}.dense[{i}]", groups)
            for i, x in enumerate(self._list(d.get("dense") or [], f"{path}.dense"))
        )
        sparse = tuple(
            self.sparse(x, f"{path}.sparse[{i}]", groups)
            for i, x in enumerate(self._list(d.get("sparse") or [], f"{path}.sparse"))
        )
        sequence = None
        if d.get("sequence") is not None:
            sequence = self.sequence(d["sequence"], f"{path}.sequence", groups)

        self._check_names(path, dense, sparse, sequence)
        self._check_columns(path, labels, user_id, dense, sparse, sequence)
        self._check_tables(path, sparse, sequence)
        used = {f.group for f in (*dense, *sparse)} | ({sequence.group} if sequence else set())
        for i, g in enumerate(groups):
            if g not in used:
                raise SchemaError(f"{path}.groups[{i}]: group {g!r} has no features")
        return Schema(
            name=name,
            labels=labels,
            user_id=user_id,
            dense=dense,
            sparse=sparse,
            sequence=sequence,
            groups=groups,
        )

    def dense(self, d: Any, path: str, groups: tuple[str, ...]) -> DenseFeature:
        self._mapping(d, path, required=("name", "group"), optional=("column", "on_missing", "fill_value"))
        name = self._str(d["name"], f"{path}.name")
        on_missing = self._choice(d.get("on_missing", "error"), f"{path}.on_missing", _ON_MISSING)
        fill = d.get("fill_value", 0.0)
        if isinstance(fill, bool) or not isinstance(fill, int | float):
            raise SchemaError(f"{path}.fill_value: expected a number, got {fill!r}")
        return DenseFeature(
            name=name,
            column=self._str(d.get("column", name), f"{path}.column"),
            group=self._group(d["group"], f"{path}.group", groups),
            on_missing=on_missing,
            fill_value=float(fill),
        )

    def sparse(self, d: Any, path: str, groups: tuple[str, ...]) -> SparseFeature:
        self._mapping(
            d,
            path,
            required=("name", "num_embeddings", "embedding_dim", "group"),
            optional=("column", "pooling", "multi_hot", "hash", "table"),
        )
        name = self._str(d["name"], f"{path}.name")
        return SparseFeature(
            name=name,
            column=self._str(d.get("column", name), f"{path}.column"),
            num_embeddings=self._pos_int(d["num_embeddings"], f"{path}.num_embeddings"),
            embedding_dim=self._pos_int(d["embedding_dim"], f"{path}.embedding_dim"),
            group=self._group(d["group"], f"{path}.group", groups),
            pooling=self._choice(d.get("pooling", "sum"), f"{path}.pooling", _SPARSE_POOLING),
            multi_hot=self._bool(d.get("multi_hot", False), f"{path}.multi_hot"),
            hash=self._bool(d.get("hash", False), f"{path}.hash"),
            table=None if d.get("table") is None else self._str(d["table"], f"{path}.table"),
        )

    def sequence(self, d: Any, path: str, groups: tuple[str, ...]) -> SequenceSpec:
        self._mapping(d, path, required=("group", "max_len", "features"), optional=("pooling",))
        feats = []
        for i, x in enumerate(self._list(d["features"], f"{path}.features")):
            p = f"{path}.features[{i}]"
            self._mapping(
                x,
                p,
                required=("name", "num_embeddings", "embedding_dim"),
                optional=("column", "hash", "table"),
            )
            name = self._str(x["name"], f"{p}.name")
            feats.append(
                SequenceFeature(
                    name=name,
                    column=self._str(x.get("column", name), f"{p}.column"),
                    num_embeddings=self._pos_int(x["num_embeddings"], f"{p}.num_embeddings"),
                    embedding_dim=self._pos_int(x["embedding_dim"], f"{p}.embedding_dim"),
                    hash=self._bool(x.get("hash", False), f"{p}.hash"),
                    table=None if x.get("table") is None else self._str(x["table"], f"{p}.table"),
                )
            )
        if not feats:
            raise SchemaError(f"{path}.features: at least one sequence feature is required")
        return SequenceSpec(
            group=self._group(d["group"], f"{path}.group", groups),
            max_len=self._pos_int(d["max_len"], f"{path}.max_len"),
            features=tuple(feats),
            pooling=self._choice(d.get("pooling", "mean"), f"{path}.pooling", _SEQUENCE_POOLING),
        )

    # ---------------------------------------------------------------- cross-feature checks
    @staticmethod
    def _paths(path: str, dense: Sequence, sparse: Sequence, sequence: SequenceSpec | None) -> list:
        out = [(f"{path}.dense[{i}]", f) for i, f in enumerate(dense)]
        out += [(f"{path}.sparse[{i}]", f) for i, f in enumerate(sparse)]
        if sequence is not None:
            out += [(f"{path}.sequence.features[{i}]", f) for i, f in enumerate(sequence.features)]
        return out

    def _check_names(self, path: str, dense, sparse, sequence) -> None:
        seen: dict[str, str] = {}
        for p, f in self._paths(path, dense, sparse, sequence):
            if f.name in seen:
                raise SchemaError(f"{p}.name: duplicate feature name {f.name!r} (first at {seen[f.name]})")
            if f.name.endswith(MISSING_SUFFIX):
                raise SchemaError(f"{p}.name: {f.name!r} ends with the reserved suffix {MISSING_SUFFIX!r}")
            seen[f.name] = p

    def _check_columns(self, path: str, labels, user_id, dense, sparse, sequence) -> None:
        """A column may feed several features only if they read it as the same Parquet type."""
        kinds: dict[str, tuple[str, str]] = {}  # column -> (kind, where first used)

        def use(column: str, kind: str, where: str) -> None:
            if column in kinds and kinds[column][0] != kind:
                k0, w0 = kinds[column]
                raise SchemaError(
                    f"{where}.column: column {column!r} used as {kind} here but as {k0} at {w0}"
                )
            kinds.setdefault(column, (kind, where))

        for i, lab in enumerate(labels):
            use(lab, "label", f"{path}.labels[{i}]")
        use(user_id, "int64 id", f"{path}.user_id")
        for p, f in self._paths(path, dense, sparse, sequence):
            if isinstance(f, DenseFeature):
                use(f.column, "dense", p)
            elif isinstance(f, SparseFeature):
                use(f.column, "list<int64>" if f.multi_hot else "int64 id", p)
            else:
                use(f.column, "sequence list<int64>", p)

    def _check_tables(self, path: str, sparse, sequence) -> None:
        first: dict[str, tuple[str, Any]] = {}
        for p, f in self._paths(path, (), sparse, sequence):
            if f.table_name not in first:
                first[f.table_name] = (p, f)
                continue
            p0, f0 = first[f.table_name]
            for attr in ("num_embeddings", "embedding_dim", "hash"):
                if getattr(f, attr) != getattr(f0, attr):
                    raise SchemaError(
                        f"{p}.{attr}: table {f.table_name!r} is shared with {p0} which has "
                        f"{attr}={getattr(f0, attr)!r}, here {getattr(f, attr)!r}"
                    )

    # ---------------------------------------------------------------- leaf checks
    @staticmethod
    def _mapping(d: Any, path: str, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
        if not isinstance(d, Mapping):
            raise SchemaError(f"{path}: expected a mapping, got {type(d).__name__}")
        allowed = (*required, *optional)
        for k in d:
            if k not in allowed:
                raise SchemaError(f"{path}.{k}: unknown key {k!r} (allowed: {', '.join(allowed)})")
        for k in required:
            if k not in d:
                raise SchemaError(f"{path}.{k}: required key missing")

    @staticmethod
    def _list(x: Any, path: str) -> list:
        if isinstance(x, str | bytes) or not isinstance(x, Sequence):
            raise SchemaError(f"{path}: expected a list, got {type(x).__name__}")
        return list(x)

    @staticmethod
    def _str(x: Any, path: str) -> str:
        if not isinstance(x, str) or not x:
            raise SchemaError(f"{path}: expected a non-empty string, got {x!r}")
        return x

    @staticmethod
    def _bool(x: Any, path: str) -> bool:
        if not isinstance(x, bool):
            raise SchemaError(f"{path}: expected true/false, got {x!r}")
        return x

    @staticmethod
    def _pos_int(x: Any, path: str) -> int:
        if isinstance(x, bool) or not isinstance(x, int) or x <= 0:
            raise SchemaError(f"{path}: expected a positive integer, got {x!r}")
        return x

    @staticmethod
    def _choice(x: Any, path: str, options: tuple[str, ...]) -> str:
        if x not in options:
            raise SchemaError(f"{path}: {x!r} is not one of {', '.join(options)}")
        return x

    @staticmethod
    def _group(x: Any, path: str, groups: tuple[str, ...]) -> str:
        if x not in groups:
            raise SchemaError(f"{path}: unknown group {x!r} (groups: {', '.join(groups)})")
        return x

    @staticmethod
    def _unique(xs: tuple[str, ...], path: str, what: str) -> None:
        seen: set[str] = set()
        for i, x in enumerate(xs):
            if x in seen:
                raise SchemaError(f"{path}[{i}]: duplicate {what} {x!r}")
            seen.add(x)
