"""`Predictor`: scores rows with an exported inference artifact (pipeline/export.py), in plain PyTorch.

Needs torch, numpy and pyarrow only (no TorchRec / FBGEMM): rows are decoded and validated by the
training reader's own `data.decode.Decoder` (same hashing, same checks, same error messages), embeddings
are looked up from the artifact's whole tables (fp32, fp16 or int8 rows), and the dense path is the
`torch.export` program. Inputs: an Arrow table or record batch, a Parquet file, or a dict of feature
lists; the label columns are not needed.

A model whose sequence arch caches per user also serves through that cache: `encode_users(users)` once
per user, then `score_candidates(cache, user_index, candidates)` per batch of candidates, whose sequence
columns may be left out.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

import models  # noqa: F401  registers the model package's custom ops, which exported programs call
from data.decode import Chunk, Decoder, open_parquet
from data.schema import Schema
from data.storage import fetch_dir, is_uri

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def quantize_rows(weight: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
    """One table's rows as stored in the artifact. int8: FBGEMM's 8-bit row-wise layout, uint8 codes with
    a per-row fp32 scale and bias (row ~= code * scale + bias; max error scale / 2 per element)."""
    w = weight.detach().float().cpu()
    if mode == "none":
        return {"weight": w.contiguous()}
    if mode == "fp16":
        return {"weight": w.half().contiguous()}
    lo, hi = w.min(dim=1).values, w.max(dim=1).values  # (rows,)
    scale = ((hi - lo) / 255.0).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round((w - lo[:, None]) / scale[:, None]).clamp_(0, 255).to(torch.uint8)
    return {"codes": codes, "scale": scale, "bias": lo}


def zch_rows(table: Mapping[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Raw ids (n,) -> rows of a managed-collision table, as its trained module maps them at evaluation:
    an id the table holds gets its row, any other id the table's reserved last row (TorchRec's MCH remap,
    on the table's sorted raw ids and their rows, all shards merged)."""
    sorted_ids, rows = table["zch_sorted_ids"], table["zch_rows"]  # (N,), (N,)
    pos = torch.searchsorted(sorted_ids[:-1], ids)  # (n,)
    return torch.where(sorted_ids[pos] == ids, rows[pos], sorted_ids.numel() - 1)


def lookup_rows(table: Mapping[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (n,) of a stored table as fp32 (n, d); a managed-collision table's raw ids are mapped
    to its rows first (`zch_rows`)."""
    if "zch_sorted_ids" in table:
        ids = zch_rows(table, ids)
    if "codes" in table:
        return table["codes"][ids].float() * table["scale"][ids, None] + table["bias"][ids, None]
    return table["weight"][ids].float()


def pool(rows: torch.Tensor, offsets: torch.Tensor, pooling: str) -> torch.Tensor:
    """Bags of `rows` (n, d) cut at `offsets` (B + 1,) -> (B, d) sum / mean (an empty bag gives 0)."""
    lengths = offsets[1:] - offsets[:-1]
    bag = torch.repeat_interleave(torch.arange(lengths.numel()), lengths, output_size=rows.shape[0])
    out = rows.new_zeros(lengths.numel(), rows.shape[1]).index_add_(0, bag, rows)
    return out / lengths.clamp_min(1).unsqueeze(1).to(rows.dtype) if pooling == "mean" else out


@dataclass
class ModelInputs:
    """What the exported programs take, for B rows."""

    dense: torch.Tensor  # (B, Nd) float32
    pooled: torch.Tensor  # (B, W) float32: the pooled embeddings, in the manifest's column order
    items: torch.Tensor | None = None  # (N, d_item) the sequence items of all rows
    lengths: torch.Tensor | None = None  # (B,) items per row
    user_id: torch.Tensor | None = None  # (B,) int64


@dataclass
class UserCache:
    """The sequence arch's per-user states (`RankingModel.sequence_cache`) of U users
    (`Predictor.encode_users`)."""

    states: tuple[torch.Tensor, ...]
    user_id: torch.Tensor  # (U,)


class ArtifactError(ValueError):
    """A missing or incompatible inference artifact; the message names the file."""


class Predictor:
    """Loads `<artifact>/` (manifest.json, embeddings.pt, *.pt2) and scores rows."""

    def __init__(self, path: str | Path, load_programs: bool = True) -> None:
        if is_uri(path):  # an artifact on an object store: fetched once it is published (its marker)
            self._fetched = tempfile.TemporaryDirectory()
            fetch_dir(str(path), self._fetched.name)
            path = self._fetched.name
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise ArtifactError(f"{self.path}: no {MANIFEST} (not an artifact written by launch/export.py?)")
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT_VERSION:
            raise ArtifactError(
                f"{manifest_path}: format {self.manifest.get('format')!r}; this Predictor reads "
                f"format {FORMAT_VERSION}"
            )
        self.schema = Schema.from_dict(self.manifest["schema"])
        self.tasks: list[str] = list(self.manifest["tasks"])
        self.decoder = Decoder(self.schema, labels=False)
        self.keys = list(self.schema.sparse_keys)  # Chunk key positions
        self.pooled = [tuple(p) for p in self.manifest["pooled"]]  # (feature, table, pooling, dim)
        self.sequence = [tuple(s) for s in self.manifest["sequence_features"]]  # (feature, table)
        self.tables = torch.load(self.path / "embeddings.pt", weights_only=True)
        self.programs: dict[str, Any] = {}
        if load_programs:
            for name in self.manifest["programs"]:
                self.programs[name.removesuffix(".pt2")] = torch.export.load(str(self.path / name)).module()

    # ---------------------------------------------------------------- inputs
    def decode(self, table: pa.Table | pa.RecordBatch, where: str = "input") -> Chunk:
        """Validated rows (DataError naming `where`, the column and the value on bad input)."""
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        return self.decoder(table, where)

    def inputs(self, table: pa.Table | pa.RecordBatch | Chunk, where: str = "input") -> ModelInputs:
        chunk = table if isinstance(table, Chunk) else self.decode(table, where)
        cols = []
        for feature, table_name, pooling, _ in self.pooled:
            k = self.keys.index(feature)
            offsets, ids = torch.from_numpy(chunk.key_offsets(k)), torch.from_numpy(chunk.key_values(k))
            cols.append(pool(lookup_rows(self.tables[table_name], ids), offsets, pooling))
        out = ModelInputs(
            dense=torch.from_numpy(np.ascontiguousarray(chunk.dense)),
            pooled=torch.cat(cols, dim=1),
            user_id=torch.from_numpy(np.ascontiguousarray(chunk.user_id)),
        )
        if self.sequence:
            ks = [self.keys.index(f) for f, _ in self.sequence]
            tables = [self.tables[t] for _, t in self.sequence]
            items = [lookup_rows(t, torch.from_numpy(chunk.key_values(k))) for k, t in zip(ks, tables)]
            out.items = torch.cat(items, dim=1)  # (N, d_item): the aligned features side by side
            out.lengths = torch.from_numpy(np.diff(chunk.key_offsets(ks[0])))
        return out

    # ---------------------------------------------------------------- scoring
    @torch.no_grad()
    def logits(self, inputs: ModelInputs) -> torch.Tensor:
        """(B, T) logits."""
        seq = (inputs.items, inputs.lengths) if self.sequence else ()
        return self.programs["dense"](inputs.dense, inputs.pooled, *seq)

    def predict(self, table: pa.Table | pa.RecordBatch, where: str = "input") -> np.ndarray:
        """(B, T) probabilities of the rows of an Arrow table (any extra columns are ignored)."""
        return torch.sigmoid(self.logits(self.inputs(table, where))).numpy()

    def predict_features(self, features: Mapping[str, Sequence[Any]]) -> np.ndarray:
        """Rows given as {column: values} (ints, floats, lists of ints), e.g. from a request."""
        return self.predict(pa.table(dict(features)), where="features")

    def predict_parquet(self, path: str | Path, batch_size: int = 8192) -> Iterator[np.ndarray]:
        """Probabilities (b, T) per batch of a Parquet file (a path or URI), in row order."""
        pf = open_parquet(path)
        columns = self.schema.columns(labels=False)
        for i, batch in enumerate(pf.iter_batches(batch_size=batch_size, columns=columns)):
            yield self.predict(batch, where=f"{path}: batch {i}")

    # ---------------------------------------------------------------- the per-user sequence cache
    def _require_cache(self, what: str) -> None:
        if "encode_user" not in self.programs:
            raise ArtifactError(
                f"{self.path}: {what} needs a sequence arch that caches per user; this artifact's model has "
                f"model.sequence={self.manifest['sequence']} (no encode_user.pt2)"
            )

    @torch.no_grad()
    def encode_users(self, users: pa.Table) -> UserCache:
        """One row per user with its sequence columns (other columns may be absent) -> the cache."""
        self._require_cache("encode_users")
        inputs = self.inputs(self._complete(users), "users")
        return UserCache(tuple(self.programs["encode_user"](inputs.items, inputs.lengths)), inputs.user_id)

    @torch.no_grad()
    def score_candidates(self, cache: UserCache, user_index: np.ndarray, candidates: pa.Table) -> np.ndarray:
        """(N, T) probabilities of N candidate rows; row n is scored for cached user `user_index[n]`.
        The candidates' sequence columns may be absent: the sequence comes from the cache."""
        self._require_cache("score_candidates")
        inputs = self.inputs(self._complete(candidates), "candidates")
        index = torch.as_tensor(np.asarray(user_index), dtype=torch.int64)
        logits = self.programs["score_candidates"](inputs.dense, inputs.pooled, index, *cache.states)
        return torch.sigmoid(logits).numpy()

    def _complete(self, table: pa.Table) -> pa.Table:
        """The columns a partial table (users: sequence only; candidates: no sequence) lacks, as neutral
        values: 0 ids / dense values, empty lists. They never reach the program that is run."""
        n = table.num_rows
        s = self.schema
        filler: dict[str, pa.Array] = {}
        if s.user_id not in table.column_names:
            filler[s.user_id] = pa.array(np.zeros(n, dtype=np.int64))
        for f in s.dense:
            filler.setdefault(f.column, pa.array(np.zeros(n, dtype=np.float32)))
        empty_lists = pa.array([[]] * n, pa.list_(pa.int64()))
        for f in s.sparse:
            filler.setdefault(f.column, empty_lists if f.multi_hot else pa.array(np.zeros(n, dtype=np.int64)))
        for f in s.sequence_features:
            filler.setdefault(f.column, empty_lists)
        missing = {c: a for c, a in filler.items() if c not in table.column_names}
        for c, a in missing.items():
            table = table.append_column(c, a)
        return table
