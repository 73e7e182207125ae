"""Schema validation: a plain mapping (a parsed YAML data config) -> a checked `Schema`.

`Schema.from_dict` calls `parse_schema`. It checks keys (unknown / required), types, choices, group
references, unique names and labels, that a shared column is read as one Parquet type and that features
sharing a table agree on its shape. Every SchemaError starts with the key path, e.g.
`schema.sparse[3].group`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from data.schema import (
    MISSING_SUFFIX,
    DenseFeature,
    Schema,
    SchemaError,
    SequenceFeature,
    SequenceSpec,
    SparseFeature,
    ZchSpec,
)

_ON_MISSING = ("error", "fill")
_SPARSE_POOLING = ("sum", "mean")
_ZCH_EVICTION = ("lfu", "lru")
_SEQUENCE_POOLING = ("mean", "sum", "none")
_ROLES = ("candidate", "user")


def parse_schema(d: Any, path: str = "schema") -> Schema:
    """The Schema described by mapping `d`; errors name key paths starting at `path`."""
    return _Parser().schema(d, path)


# -------------------------------------------------------------------- validation
class _Parser:
    """Turns a plain mapping into a Schema, checking types and cross-references as it goes."""

    def schema(self, d: Any, path: str) -> Schema:
        self._mapping(
            d,
            path,
            required=("name", "labels", "user_id", "groups"),
            optional=("dense", "sparse", "sequence", "roles", "weight"),
        )
        name = self._str(d["name"], f"{path}.name")
        labels = self._names(d["labels"], f"{path}.labels", "label")
        user_id = self._str(d["user_id"], f"{path}.user_id")
        weight = None if d.get("weight") is None else self._str(d["weight"], f"{path}.weight")
        groups = self._names(d["groups"], f"{path}.groups", "group")

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
        self._check_columns(path, labels, user_id, weight, dense, sparse, sequence)
        self._check_tables(path, sparse, sequence)
        used = {f.group for f in (*dense, *sparse)} | ({sequence.group} if sequence else set())
        for i, g in enumerate(groups):
            if g not in used:
                raise SchemaError(f"{path}.groups[{i}]: group {g!r} has no features")
        roles = self.roles(d.get("roles") or {}, f"{path}.roles", groups)
        return Schema(
            name=name,
            labels=labels,
            user_id=user_id,
            dense=dense,
            sparse=sparse,
            sequence=sequence,
            groups=groups,
            candidate_groups=roles.get("candidate", ()),
            user_groups=roles.get("user", ()),
            weight=weight,
        )

    def roles(self, d: Any, path: str, groups: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
        """{role: groups}: `candidate` (the item being ranked) and `user` (who it is ranked for)."""
        self._mapping(d, path, required=(), optional=_ROLES)
        out = {}
        for role in _ROLES:
            if role in d:
                names = tuple(
                    self._group(g, f"{path}.{role}[{i}]", groups)
                    for i, g in enumerate(self._list(d[role], f"{path}.{role}"))
                )
                self._unique(names, f"{path}.{role}", "group")
                out[role] = names
        both = set(out.get("candidate", ())) & set(out.get("user", ()))
        if both:
            raise SchemaError(f"{path}: group(s) {sorted(both)} cannot be both candidate and user")
        return out

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
            optional=("column", "pooling", "multi_hot", "hash", "table", "zch"),
        )
        name = self._str(d["name"], f"{path}.name")
        zch = self.zch(d.get("zch"), f"{path}.zch", hashed=bool(d.get("hash")))
        if zch is not None and d.get("multi_hot"):
            raise SchemaError(
                f"{path}.zch: managed collisions take single-valued features (a list column has no bound on "
                "the ids a batch brings); hash its ids (hash: true) instead"
            )
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
            zch=zch,
        )

    def zch(self, d: Any, path: str, hashed: bool) -> ZchSpec | None:
        """`zch: {eviction: lfu|lru, eviction_interval: K}` (`zch: {}`: lfu, every step), or None."""
        if d is None:
            return None
        self._mapping(d, path, required=(), optional=("eviction", "eviction_interval"))
        if hashed:
            raise SchemaError(f"{path}: zch and hash: true exclude each other (zch takes the raw ids)")
        return ZchSpec(
            eviction=self._choice(d.get("eviction", "lfu"), f"{path}.eviction", _ZCH_EVICTION),
            eviction_interval=self._pos_int(d.get("eviction_interval", 1), f"{path}.eviction_interval"),
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
                optional=("column", "hash", "table", "zch"),
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
                    zch=self.zch(x.get("zch"), f"{p}.zch", hashed=bool(x.get("hash"))),
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

    def _check_columns(self, path: str, labels, user_id, weight, dense, sparse, sequence) -> None:
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
        if weight is not None:
            use(weight, "sample weight", f"{path}.weight")
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
            for attr in ("num_embeddings", "embedding_dim", "hash", "zch"):
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

    def _names(self, x: Any, path: str, what: str) -> tuple[str, ...]:
        """A non-empty list of unique non-empty strings (labels, groups)."""
        names = tuple(self._str(v, f"{path}[{i}]") for i, v in enumerate(self._list(x, path)))
        if not names:
            raise SchemaError(f"{path}: at least one {what} is required")
        self._unique(names, path, what)
        return names

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
