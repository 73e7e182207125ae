"""`export(checkpoint, out, quantize)`: a (sharded) training checkpoint -> a self-contained inference
artifact that `pipeline.predictor.Predictor` loads with plain PyTorch (no TorchRec, no FBGEMM).

What the artifact holds (`<out>/`):
- `embeddings.pt`: every embedding table gathered whole (DCP reshards the saved shards into one process),
  as fp32, fp16, or int8 rows with a per-row fp32 scale and bias (FBGEMM's 8-bit row-wise layout: row =
  q * scale + bias, scale = (max - min) / 255, bias = min). Quantizing in plain torch keeps the artifact
  loadable where TorchRec / FBGEMM are not installed (a serving host, the GPU box of this project); the
  lookups are a gather and a segment sum, which is all a CPU scorer needs.
- `dense.pt2`: the dense path (feature groups -> sequence module -> dense arch -> logits) exported with
  `torch.export`, batch size (and sequence length) dynamic, computed as at serving (the dense arch in its
  serving inference mode, the sequence arch's full forward): `RankingModel.logits_from_parts`.
- A model whose sequence arch serves a per-user cache (`RankingModel.serves_sequence_cache`) also gets
  `encode_user.pt2` and `score_candidates.pt2` (`sequence_cache`, `logits_from_cache`): a user's sequence
  is encoded once, then each candidate costs only the global
  queries against the cached keys / values.
- `manifest.json`: the schema, the feature -> table -> pooling wiring, the dense path's column layout,
  and the parity check export ran against the training model (max |logit difference| on real rows).

A program that does not trace is an error naming the program and torch.export's first line, never a
silent fallback to pickled Python code.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.export import Dim

from data.batch import RecBatch
from data.dataset_dir import atomic_dir
from data.decode import open_parquet
from data.partitions import split_files
from data.reader import ParquetReader
from data.schema import Schema
from data.storage import display, exists, is_uri, publish_dir
from models.feature_groups import signed_log
from models.ranking import RankingModel, RankingTrainWrapper
from models.sparse_arch import input_keys
from pipeline.checkpoint import load_run_config
from pipeline.config import Quantize, TrainConfig
from pipeline.files import write_json_atomic
from pipeline.predictor import FORMAT_VERSION, MANIFEST, Predictor, quantize_rows

log = logging.getLogger(__name__)
TRACE_ROWS = 37


class ExportError(ValueError):
    """A model part that torch.export cannot capture; the message names the part and the cause."""


def load_unsharded(checkpoint: str | Path) -> tuple[RankingModel, TrainConfig, Schema]:
    """The trained RankingModel in this one process, every table whole, in eval mode."""
    cfg = load_run_config(checkpoint)
    schema = Schema.from_dict(cfg.data.schema)
    model = RankingModel(schema, cfg.model, negative_rate=cfg.data.negative_rate)
    wrapper = RankingTrainWrapper(model)  # the module the checkpoint's "model" entry was saved from
    state = {"model": wrapper.state_dict()}
    dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    wrapper.load_state_dict(state["model"])
    return model.eval(), cfg, schema


@dataclasses.dataclass(frozen=True)
class Wiring:
    """How the Predictor feeds the dense path: the pooled columns in order, each (feature, table,
    pooling, dim); the sequence arch's item features and their tables."""

    pooled: list[tuple[str, str, str, int]]
    sequence: list[tuple[str, str]]


def wiring(model: RankingModel, schema: Schema) -> Wiring:
    """Column order of the dense path's pooled input: per group (schema order), the group's bag-pooled
    features (the sparse arch's key order), then its features pooled after an unpooled lookup (the sequence's
    shared tables): exactly the order `FeatureGroups.parts` concatenates them in."""
    fg = model.feature_groups
    ebc = model.sparse_arch.embedding_bag_collection
    table_of, pooling_of = {}, dict(model.sparse_arch.poolings)
    for c in ebc.embedding_bag_configs() + model.sparse_arch.zch_configs:
        for f in c.feature_names:
            table_of[f] = c.name
    loose_pooling = dict(model.pooled_unpooled)
    if model.sparse_arch.embedding_collection is not None:
        for c in model.sparse_arch.embedding_collection.embedding_configs():
            for f in c.feature_names:
                table_of[f] = c.name
    dims = {n: t["embedding_dim"] for t in schema.tables().values() for n in t["feature_names"]}
    pooled = []
    for g in fg.groups:
        for name in fg.emb_features[g]:
            pooled.append((name, table_of[name], pooling_of[name], dims[name]))
        for name in fg.loose_features[g]:
            pooled.append((name, table_of[name], loose_pooling[name], dims[name]))
    sa = model.sparse_arch
    for bags, mean_keys in sa.wide_collections():  # the first-order term (model.wide), after the rest
        for c in bags.embedding_bag_configs():
            (name,) = c.feature_names
            pooled.append((name, c.name, "mean" if name in mean_keys else "sum", c.embedding_dim))
    seq = [(f, table_of[f]) for f in model.seq_features]
    return Wiring(pooled, seq)


class DensePath(nn.Module):
    """The trained model after its embedding lookups: dense (B, Nd) + pooled (B, W) [+ sequence items
    (N, d_item), lengths (B,)] -> logits (B, T). Reuses the trained submodules; only the regroup of the
    pooled embeddings (TorchRec's KeyedTensor) becomes a column selection."""

    def __init__(self, model: RankingModel, wire: Wiring) -> None:
        super().__init__()
        # The modules after the lookups are registered here; the RankingModel is only referenced (not a
        # submodule), or its embedding tables would be saved a second time inside the .pt2.
        self.feature_groups, self.sequence_arch, self.dense_arch = (
            model.feature_groups,
            model.sequence_arch,
            model.dense_arch,
        )
        self.__dict__["model"] = model
        fg = model.feature_groups
        start, cols, wide_cols = 0, {}, []
        wide_tables = model.sparse_arch.wide_tables
        for name, table, _, dim in wire.pooled:
            if table in wide_tables:
                wide_cols += range(start, start + dim)
            else:
                cols[name] = list(range(start, start + dim))
            start += dim
        # the first-order term's columns (model.wide): one width of per-task biases per feature
        self.wide_width, self.num_tasks = model.sparse_arch.wide_width, model.sparse_arch.num_tasks
        self.register_buffer("wide_cols", torch.tensor(wide_cols, dtype=torch.long), persistent=False)
        self.groups = [g for g in fg.groups if fg.emb_features[g] or fg.loose_features[g]]
        for g in self.groups:
            idx = [c for n in (*fg.emb_features[g], *fg.loose_features[g]) for c in cols[n]]
            self.register_buffer(f"cols_{g}", torch.tensor(idx), persistent=False)

    def parts(self, dense: torch.Tensor, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """{group: (B, w_g)}: as FeatureGroups.parts (embeddings, then the projected dense features)."""
        fg = self.model.feature_groups
        dense = signed_log(dense)
        out = {}
        for g in fg.groups:
            pieces = [pooled.index_select(1, getattr(self, f"cols_{g}"))] if g in self.groups else []
            if g in fg.dense_proj:
                pieces.append(fg.dense_proj[g](dense.index_select(1, getattr(fg, f"dense_idx_{g}"))))
            if pieces:
                out[g] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        return out

    def with_wide(self, logits: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """logits (B, T) plus the first-order term from its pooled columns, as `SparseArch.wide_logits`."""
        if self.wide_cols.numel() == 0:
            return logits
        biases = pooled.index_select(1, self.wide_cols).unflatten(1, (-1, self.wide_width))  # (B, F, width)
        return logits + biases.sum(1)[:, : self.num_tasks]

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor, *sequence: torch.Tensor) -> torch.Tensor:
        return self.with_wide(self.model.logits_from_parts(self.parts(dense, pooled), *sequence), pooled)


class EncodeUser(nn.Module):
    """The model's candidate-independent half: items (N, d_item), lengths (U,) -> the flat cached states."""

    def __init__(self, model: RankingModel) -> None:
        super().__init__()
        self.sequence_arch = model.sequence_arch  # registered: its weights go into the program
        self.__dict__["model"] = model  # referenced only (see DensePath)

    def forward(self, items: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model.sequence_cache(items, lengths)


class ScoreCandidates(nn.Module):
    """dense (N, Nd) + pooled (N, W) + user_index (N,) + the cached states of U users -> logits (N, T)."""

    def __init__(self, path: DensePath) -> None:
        super().__init__()
        self.path = path

    def forward(
        self, dense: torch.Tensor, pooled: torch.Tensor, user_index: torch.Tensor, *cache: torch.Tensor
    ) -> torch.Tensor:
        logits = self.path.model.logits_from_cache(self.path.parts(dense, pooled), user_index, *cache)
        return self.path.with_wide(logits, pooled)


def _export(name: str, module: nn.Module, args: tuple, dynamic: Any, path: Path) -> None:
    try:
        program = torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)
    except Exception as e:  # torch.export's errors are long; the first line names the failing construct
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"export: {name} does not trace with torch.export: {first}") from e
    torch.export.save(program, str(path))


def _first_rows(cfg: TrainConfig, schema: Schema, data_root: str, split: str, rows: int) -> RecBatch:
    """The first `rows` rows of `split` (files in name order; all of them if fewer) as the training model
    takes them."""

    def reader(batch_size: int) -> ParquetReader:
        return ParquetReader(
            split_files(data_root, split),
            schema,
            batch_size=batch_size,
            shuffle=False,
            policy="pad",
            prefetch=0,
            split_keys=input_keys(schema, cfg.model.sequence),
            labels=False,
        )

    r = reader(rows)
    if r.num_rows < rows:
        r = reader(r.num_rows)
    if r.num_rows < TRACE_ROWS:
        raise ValueError(
            f"export: split {split!r} of {data_root} has {r.num_rows} rows; need >= {TRACE_ROWS}"
        )
    return next(iter(r))


def export(
    checkpoint: str | Path,
    out: str | Path,
    quantize: str = "none",
    data_root: str | None = None,
    split: str = "test",
    parity_rows: int = 2048,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the artifact to `out` (atomically: a hidden temp dir renamed at the end; on an object store,
    uploaded with the commit marker written last, data/storage.py); returns the manifest. The parity
    check scores `parity_rows` real rows of the split (default data root: the run's) with both the
    training model and the loaded artifact."""
    quantize = Quantize.parse(quantize, "quantize")
    if exists(out) and not overwrite:
        raise ValueError(
            f"out={display(out)} exists; choose another out or pass overwrite=true to replace it"
        )
    if is_uri(out):  # an object store: built here, then uploaded with its commit marker last
        with tempfile.TemporaryDirectory() as local:
            manifest = export(checkpoint, Path(local) / "artifact", quantize, data_root, split, parity_rows)
            publish_dir(Path(local) / "artifact", str(out))
        return manifest
    out = Path(out)
    model, cfg, schema = load_unsharded(checkpoint)
    wire = wiring(model, schema)
    batch = _first_rows(cfg, schema, data_root or cfg.data.root, split, parity_rows)

    with atomic_dir(out) as tmp:  # the artifact appears whole or not at all
        tables = {name: t.weight.detach() for name, t in _tables(model).items()}
        stored = {name: quantize_rows(w, quantize) for name, w in tables.items()}
        for name, remap in zch_remaps(model).items():  # managed collisions: raw id -> row, for lookup_rows
            stored[name].update(remap)
        torch.save(stored, tmp / "embeddings.pt")
        manifest = {
            "format": FORMAT_VERSION,
            "checkpoint": str(checkpoint),
            "arch": cfg.model.arch,
            "sequence": cfg.model.sequence,
            "quantize": quantize,
            "schema": schema.to_dict(),
            "tasks": list(schema.labels),
            "pooled": [list(p) for p in wire.pooled],
            "sequence_features": [list(s) for s in wire.sequence],
            "programs": ["dense.pt2"],
        }
        write_json_atomic(tmp / MANIFEST, manifest)
        # the programs are traced on the Predictor's own inputs for these rows, so export and serving
        # agree on every shape and dtype
        lookups = Predictor(tmp, load_programs=False)
        table = batch_table(schema, data_root or cfg.data.root, split, batch.batch_size)
        # A small example batch: ExportedProgram keeps its example inputs in the .pt2; TRACE_ROWS is an
        # odd size no model dimension equals, so the batch and item dims stay symbolic.
        inputs = lookups.inputs(table.slice(0, TRACE_ROWS))
        path = DensePath(model, wire).eval()
        B = Dim("batch", min=1)
        dense_dyn: dict[str, Any] = {"dense": {0: B}, "pooled": {0: B}}
        if model.serves_sequence_cache:
            N = Dim("items", min=0)
            seq_args = (inputs.items, inputs.lengths)
            dynamic = {**dense_dyn, "sequence": ({0: N}, {0: B})}
        else:
            seq_args, dynamic = (), dense_dyn
        with torch.no_grad():
            _export("dense path", path, (inputs.dense, inputs.pooled, *seq_args), dynamic, tmp / "dense.pt2")
            if model.serves_sequence_cache:
                U = Dim("users", min=1)
                enc = EncodeUser(model).eval()
                enc_dyn = {"items": {0: N}, "lengths": {0: U}}
                _export("encode_user", enc, seq_args, enc_dyn, tmp / "encode_user.pt2")
                cache = enc(*seq_args)
                user_index = torch.arange(inputs.dense.shape[0])
                cache_dyn = tuple({0: U} for _ in cache)
                _export(
                    "score_candidates",
                    ScoreCandidates(path).eval(),
                    (inputs.dense, inputs.pooled, user_index, *cache),
                    {"dense": {0: B}, "pooled": {0: B}, "user_index": {0: B}, "cache": cache_dyn},
                    tmp / "score_candidates.pt2",
                )
                manifest["programs"] += ["encode_user.pt2", "score_candidates.pt2"]
            # parity: the training model (TorchRec lookups, eager) vs the artifact, on the same rows
            wrapper = RankingTrainWrapper(model).eval()
            reference = wrapper(batch)[1].logits
        manifest["parity"] = {"split": split, "rows": int(batch.batch_size)}
        write_json_atomic(tmp / MANIFEST, manifest)
        served = Predictor(tmp).logits(lookups.inputs(table))
        manifest["parity"]["max_abs_logit_diff"] = float((served - reference).abs().max())
        write_json_atomic(tmp / MANIFEST, manifest)
    return manifest


def zch_remaps(model: RankingModel) -> dict[str, dict[str, torch.Tensor]]:
    """{zch table: {"zch_sorted_ids", "zch_rows"}}: each managed-collision module's sorted raw ids and
    their rows, as loaded into this unsharded model (TorchRec merges and re-sorts the shards on load)."""
    mc = model.sparse_arch.zch_bags
    if mc is None:
        return {}
    modules = mc._managed_collision_collection._managed_collision_modules  # TorchRec's own attribute names
    return {
        table: {
            "zch_sorted_ids": m._mch_sorted_raw_ids.clone(),
            "zch_rows": m._mch_remapped_ids_mapping.clone(),
        }
        for table, m in modules.items()
    }


def _tables(model: RankingModel) -> dict[str, nn.Module]:
    """Every embedding table module of the sparse arch by table name (bags and unpooled)."""
    sa = model.sparse_arch
    out = dict(sa.embedding_bag_collection.embedding_bags.items())
    if sa.zch_bags is not None:
        out.update(sa.zch_bags._embedding_module.embedding_bags.items())  # the bags behind the remapping
    if sa.embedding_collection is not None:
        out.update(sa.embedding_collection.embeddings.items())
    for bags, _ in sa.wide_collections():
        out.update(bags.embedding_bags.items())
    return out


def batch_table(schema: Schema, root: str, split: str, rows: int):
    """The first `rows` rows of a split, files in name order, as one Arrow table."""
    import pyarrow as pa

    tables, have = [], 0
    for f in split_files(root, split):
        t = open_parquet(f).read(columns=schema.columns(labels=False))
        tables.append(t.slice(0, rows - have))
        have += tables[-1].num_rows
        if have >= rows:
            break
    return pa.concat_tables(tables)
