"""`run_predict(cfg)`: batch scoring of a Parquet split with a trained checkpoint, on N ranks.

- Rows: every rank streams its share of the split's row groups (the reader's sharding, unshuffled, policy
  "pad"), so each input row is scored exactly once across ranks. The label columns are not needed.
- Output: `<out>/part-<rank>.parquet`, one row per input row, one Parquet row group per input row group:
  `row_id` (the row's position in the split, files read in name order), the schema's user id column,
  `score_<task>` (the predicted probability of each task) and the passthrough columns the user names.
  `<out>/_predict.json` records the checkpoint, split, row count and columns (a leading `_` keeps it out of
  `pyarrow.parquet.read_table(out)`).
- Atomicity: the parts are written into a hidden `.<out>.tmp-<id>` directory next to `out`, which rank 0
  renames to `out` only after every rank finished and the row count matched the input's; a failed job
  leaves no `out` (a later run removes the stale temp dir). `overwrite=true` replaces an existing `out`
  only at that last rename. An object store has no rename: there the parts go to `out` in place and
  rank 0 writes the commit marker `_COMMITTED` last (data/storage.py); consumers require it (as Spark's
  `_SUCCESS`), and a failed job removes what it wrote.
- The computation is the serving one: the model in eval mode (the dense arch's serving inference mode,
  the sequence arch's full forward), as `launch/eval.py` scores the same rows.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from data.dataset_dir import replace_dir
from data.decode import open_parquet
from data.partitions import split_files
from data.reader import ParquetReader
from data.schema import Schema
from data.storage import (
    COMMIT_MARKER,
    display,
    exists,
    is_uri,
    join,
    publish_marker,
    remove_tree,
    resolve,
    write_bytes,
)
from models.sparse_arch import input_keys
from pipeline.checkpoint import load_checkpoint_into
from pipeline.config import PredictConfig
from pipeline.dist import broadcast_object
from pipeline.evaluate import batch_outputs
from pipeline.job import build_model, open_checkpoint_job

log = logging.getLogger(__name__)

ROW_ID = "row_id"
MANIFEST = "_predict.json"


def score_columns(schema: Schema) -> list[str]:
    return [f"score_{t}" for t in schema.labels]


def check_output(cfg: PredictConfig, schema: Schema) -> list[str]:
    """The passthrough columns to copy (the user id column is always written), after checking that `out`
    may be written and that no passthrough name collides with a written column."""
    if exists(cfg.out) and not cfg.overwrite:
        raise ValueError(
            f"out={display(cfg.out)} exists; choose another out or pass overwrite=true to replace it"
        )
    reserved = {ROW_ID, *score_columns(schema)}
    clash = sorted(reserved & set(cfg.passthrough))
    if clash:
        raise ValueError(f"passthrough: {clash} would collide with the output's columns {sorted(reserved)}")
    return [c for c in dict.fromkeys(cfg.passthrough) if c != schema.user_id]


class PartWriter:
    """This rank's part file: the scored rows of each of its row groups, written as that row group is
    complete (memory stays at one row group plus one batch)."""

    def __init__(self, path: str, reader: ParquetReader, schema: Schema, passthrough: list[str]) -> None:
        self.schema, self.passthrough = schema, passthrough
        self.pending = list(reader.shard_row_groups())  # (file, row group, rows, first row), in read order
        first_file = reader.files[0]
        file_schema = open_parquet(first_file).schema_arrow
        fields = [pa.field(ROW_ID, pa.int64()), pa.field(schema.user_id, pa.int64())]
        fields += [pa.field(c, pa.float32()) for c in score_columns(schema)]
        fields += [file_schema.field(c) for c in passthrough]
        self.arrow_schema = pa.schema(fields)
        fs, inner = resolve(path)
        self.writer = pq.ParquetWriter(inner, self.arrow_schema, compression="zstd", filesystem=fs)
        self.user_ids: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []
        self.buffered = 0
        self.rows = 0

    def add(self, user_id: np.ndarray, scores: np.ndarray) -> None:
        """The next scored rows of this rank's stream, in order."""
        self.user_ids.append(user_id)
        self.scores.append(scores)
        self.buffered += len(user_id)
        while self.pending and self.buffered >= self.pending[0][2]:
            self._write_row_group(*self.pending.pop(0))

    def _write_row_group(self, path: str, index: int, rows: int, first_row: int) -> None:
        user_id, scores = np.concatenate(self.user_ids), np.concatenate(self.scores)
        self.user_ids, self.scores = [user_id[rows:]], [scores[rows:]]
        self.buffered -= rows
        cols: dict[str, Any] = {
            ROW_ID: pa.array(np.arange(first_row, first_row + rows, dtype=np.int64)),
            self.schema.user_id: pa.array(user_id[:rows]),
        }
        for j, name in enumerate(score_columns(self.schema)):
            cols[name] = pa.array(scores[:rows, j])
        if self.passthrough:
            extra = open_parquet(path).read_row_group(index, columns=self.passthrough)
            cols.update({c: extra.column(c) for c in self.passthrough})
        self.writer.write_table(pa.table(cols, schema=self.arrow_schema))
        self.rows += rows

    def close(self) -> int:
        """Closes the file; the rows written (every row of this rank's row groups, or it raises)."""
        self.writer.close()
        if self.pending or self.buffered:
            raise RuntimeError(
                f"predict: {len(self.pending)} row group(s) unscored and {self.buffered} scores left over"
            )
        return self.rows


def _temp_dir(out: Path, is_main: bool) -> Path:
    """Rank 0 names (and creates) the hidden directory the parts are written to; stale ones of failed
    earlier runs into the same `out` are removed."""
    name = None
    if is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        name = str(tmp)
    return Path(broadcast_object(name))


def _clear_in_place(out: str, is_main: bool) -> str:
    """An object-store `out` is written in place: rank 0 removes an existing one (allowed by overwrite),
    its commit marker first, so no reader takes a mix of old and new parts for a complete output."""
    if is_main:
        remove_tree(join(out, COMMIT_MARKER))
        remove_tree(out)
    dist.barrier()
    return out


def run_predict(cfg: PredictConfig) -> dict[str, Any]:
    info, checkpoint, run_cfg, schema = open_checkpoint_job(cfg.checkpoint, cfg.device)
    data = cfg.data.over(run_cfg.data)
    passthrough = check_output(cfg, schema)
    # Every input is checked before the model is built: columns and types of every file (metadata only).
    reader = ParquetReader(
        split_files(data.root, data.split),
        schema,
        batch_size=data.eval_batch_size,
        rank=info.rank,
        world_size=info.world_size,
        shuffle=False,
        policy="pad",
        prefetch=data.prefetch,
        workers=data.workers,
        split_keys=input_keys(schema, run_cfg.model.sequence),
        labels=False,
        extra_columns=passthrough,
    )
    run_cfg.sharding = cfg.sharding
    dmp, _ = build_model(run_cfg, schema, info)
    load_checkpoint_into(checkpoint, dmp, optimizer=None)
    dmp.eval()

    out, in_place = cfg.out, is_uri(cfg.out)
    tmp = _clear_in_place(out, info.is_main) if in_place else str(_temp_dir(Path(out), info.is_main))
    try:
        part = PartWriter(join(tmp, f"part-{info.rank:05d}.parquet"), reader, schema, passthrough)
        with torch.no_grad():
            for o in batch_outputs(dmp, reader, info.device, len(reader)):
                m = o.mask
                part.add(o.user_id[m].cpu().numpy(), torch.sigmoid(o.logits[m]).float().cpu().numpy())
        rows = torch.tensor(part.close())
        dist.all_reduce(rows)
        expected = sum(reader.rows_per_rank)
        if int(rows) != expected:  # every input row exactly once, or no output at all
            raise RuntimeError(
                f"predict: wrote {int(rows)} rows for {expected} input rows; {display(out)} not published"
            )
    except BaseException:
        remove_tree(tmp)  # nothing half-written stays behind (every rank: its own part at least)
        raise
    result = {
        "checkpoint": str(checkpoint),
        "data_root": data.root,
        "split": data.split,
        "rows": expected,
        "world_size": info.world_size,
        "columns": part.arrow_schema.names,
        "out": display(out),
    }
    dist.barrier()
    if info.is_main:
        write_bytes(join(tmp, MANIFEST), json.dumps(result, indent=2).encode())
        if in_place:
            publish_marker(out)  # the last write: readers require it
        else:
            replace_dir(Path(tmp), Path(out))  # an existing `out` is replaced only now
        log.info("predictions: %d rows in %s", expected, display(out))
    dist.barrier()
    return result
