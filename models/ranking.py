"""RankingModel: sparse arch -> semantic feature groups -> dense arch -> one logit per task.

Design choices:
- `FeatureGroups` (models/feature_groups.py) turns the sparse arch's pooled embeddings and the dense float
  features into the ordered list of semantic-group vectors the dense arch takes (paper s3.2, DESIGN s2).
- The dense arch is any `DenseArch` (models/dense_arch.py) mapping `list[(B, d_g)] -> (B, num_tasks)`,
  picked by the typed `ModelConfig` (models/config.py), so baselines run through the same pipeline.
- `lr_scales()` gathers the parameter groups that step at a scaled dense lr: the dense arch's own
  (Sparse-MoE routers) and the sequence arch's (`model.longer.lr_scale`).
- `RankingTrainWrapper` is the contract of TorchRec's `TrainPipelineSparseDist`: `forward(batch)` returns
  `(loss, output)` and never modifies the batch (a module that mutates its inputs is silently not
  pipelined). loss = sum over tasks of the mean BCE over valid rows (DESIGN s1).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
from torch import nn
from torch.profiler import record_function
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from data.batch import RecBatch
from data.schema import Schema, SchemaError
from models.config import ModelConfig
from models.dense_arch import DenseArch
from models.feature_groups import FeatureGroups
from models.longer import Longer, LongerConfig, SequenceStates
from models.sparse_arch import SparseArch


def pool_jagged(jt: JaggedTensor, pooling: str) -> torch.Tensor:
    """Sum / mean of each row of a (B rows, values (N, d)) jagged tensor -> (B, d); empty rows give 0."""
    lengths = jt.lengths()
    values = jt.values()  # (N, d)
    # output_size: without it repeat_interleave reads the total length back from the device (a host sync)
    rows = torch.arange(lengths.numel(), device=lengths.device).repeat_interleave(
        lengths, output_size=values.shape[0]
    )
    out = values.new_zeros(lengths.numel(), values.shape[1]).index_add(0, rows, values)  # (B, d)
    if pooling == "mean":
        out = out / lengths.clamp_min(1).unsqueeze(1).to(values.dtype)
    return out


def longer_groups(schema: Schema, cfg: LongerConfig) -> tuple[list[str], list[str]]:
    """(candidate groups, user groups) of LONGER's global tokens: model.longer's if set, else the schema's
    declared roles. A candidate token is required (it is what target attention attends for)."""
    candidate = list(schema.candidate_groups) if cfg.candidate_groups is None else list(cfg.candidate_groups)
    user = list(schema.user_groups) if cfg.user_groups is None else list(cfg.user_groups)
    if not candidate:
        raise SchemaError(
            f"schema {schema.name!r}: model.sequence=longer needs the groups that describe the candidate "
            f"item; declare them in the schema, e.g. `roles: {{candidate: [item], user: [user]}}` "
            f"(groups: {', '.join(schema.groups)}), or set model.longer.candidate_groups"
        )
    for g in (*candidate, *user):
        if g not in schema.groups:
            raise SchemaError(f"model.longer: unknown group {g!r} (groups: {', '.join(schema.groups)})")
    return candidate, user


class RankingModel(nn.Module):
    """sparse arch (TorchRec) -> feature groups (+ sequence arch) -> dense arch -> logits (B, num_tasks)."""

    def __init__(
        self,
        schema: Schema,
        model_cfg: ModelConfig,
        device: torch.device | None = None,
        negative_rate: float = 1.0,
        zch_buckets: int = 1,
    ) -> None:
        super().__init__()
        # Trained on down-sampled negatives (data.negative_rate), a task whose negatives were kept at rate r_t
        # predicts odds 1/r_t times the true ones: evaluation and serving add log r_t to its logit, p -> p /
        # (p + (1 - p) / r_t). r_t is the training split's own (`set_negative_keep_rates`: r for single-task
        # data; above r for a task whose negatives are often another task's positives, which are always
        # kept). A buffer, so checkpoints and exported programs carry it; training uses the raw logits.
        correction = torch.full((len(schema.labels),), math.log(negative_rate)) if negative_rate < 1 else None
        self.register_buffer("logit_correction", correction)  # None: no buffer, no state_dict entry
        dense_proj_dim = model_cfg.dense_proj_dim
        self.sequence_mode, longer_cfg = model_cfg.sequence, model_cfg.longer
        self.sparse_arch = SparseArch(
            schema,
            self.sequence_mode,
            device=device,
            table_dtype=model_cfg.table_dtype,
            wide=model_cfg.wide,
            zch_buckets=zch_buckets,  # one per rank: the managed-collision tables' row-wise shards
        )
        self.sequence_arch: Longer | None = None
        self.pooled_unpooled: list[tuple[str, str]] = []  # (feature, pooling) looked up unpooled, then pooled
        self.seq_features: list[str] = []  # the sequence arch's item features, side by side
        extra = {}
        group_keys = self.sparse_arch.pooled_keys  # pooled features, by group
        loose_keys: list[str] = []  # features looked up unpooled and pooled here
        if self.sequence_mode == "longer":
            if schema.sequence is None:
                raise ValueError("model.sequence=longer: the schema has no sequence features")
            self.seq_features = [f.name for f in schema.sequence_features]
            self.pooled_unpooled = [  # features that share a table with the sequence: pooled after lookup
                (f.name, f.pooling) for f in schema.sparse if f.name in self.sparse_arch.unpooled_keys
            ]
            loose_keys = [name for name, _ in self.pooled_unpooled]
            base = FeatureGroups(schema, dense_proj_dim, group_keys, loose_keys=loose_keys)  # widths only
            width = dict(zip(base.groups, base.group_dims))
            candidate_groups, user_groups = longer_groups(schema, longer_cfg)
            seq_dims = {n: t["embedding_dim"] for t in schema.tables().values() for n in t["feature_names"]}
            longer_cfg = dataclasses.replace(
                longer_cfg,
                candidate_groups=candidate_groups,
                user_groups=user_groups,
                item_dim=sum(seq_dims[n] for n in self.seq_features),
                candidate_dim=sum(width.get(g, 0) for g in candidate_groups),
                user_dim=sum(width.get(g, 0) for g in user_groups),
                max_len=schema.sequence.max_len,
            )
            self.sequence_arch = Longer(longer_cfg)
            self.sequence_group = schema.sequence.group
            extra = {self.sequence_group: longer_cfg.num_globals * longer_cfg.dim}
        self.longer_cfg = longer_cfg
        self.feature_groups = FeatureGroups(schema, dense_proj_dim, group_keys, extra, loose_keys=loose_keys)
        self.dense_arch: DenseArch = model_cfg.build_dense_arch(
            self.feature_groups.group_dims, len(schema.labels)
        )

    def lr_scales(self) -> dict[str, float]:
        """{parameter name: dense-lr multiplier}: the dense arch's own (`DenseArch.lr_scales`) and, with
        sequence=longer, every LONGER parameter at `model.longer.lr_scale`."""
        scales = {f"dense_arch.{name}": s for name, s in self.dense_arch.lr_scales().items()}
        if self.sequence_arch is not None and self.longer_cfg.lr_scale != 1.0:
            scales.update(
                {
                    f"sequence_arch.{n}": self.longer_cfg.lr_scale
                    for n, _ in self.sequence_arch.named_parameters()
                }
            )
        return scales

    def forward(
        self, dense: torch.Tensor, sparse: KeyedJaggedTensor, sequence: KeyedJaggedTensor | None = None
    ) -> torch.Tensor:
        return self.forward_with_embedding_sq(dense, sparse, sequence, with_sq=False)[0]

    def forward_with_embedding_sq(
        self,
        dense: torch.Tensor,
        sparse: KeyedJaggedTensor,
        sequence: KeyedJaggedTensor | None = None,
        with_sq: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits (B, num_tasks), the squared L2 norm of every embedding the batch looked up, per row
        (pooled bags as the model sees them, every unpooled item), as a scalar mean over rows, or None)."""
        pooled, unpooled = self.sparse_arch(sparse, sequence)
        sq = None
        if with_sq:
            with record_function("## loss ##"):
                batch = dense.shape[0]
                sq = pooled.values().square().sum() / batch
                # Over the static key list, never over `unpooled` itself: TrainPipelineSparseDist
                # fx-traces this forward, and a traced value cannot decide control flow
                # (`unpooled or {}` raised).
                for name in self.sparse_arch.unpooled_keys:
                    sq = sq + unpooled[name].values().square().sum() / batch
        with record_function("## feature_groups ##"):
            parts = self._group_parts(pooled, unpooled, dense)
        with record_function("## dense_arch ##"):
            if self.sequence_arch is None:
                logits = self.logits_from_parts(parts)  # (B, num_tasks)
            else:
                logits = self.logits_from_parts(parts, *self._sequence_items(unpooled))
        return self._with_wide(logits, sparse, sequence), sq

    def _with_wide(
        self, logits: torch.Tensor, sparse: KeyedJaggedTensor, sequence: KeyedJaggedTensor | None
    ) -> torch.Tensor:
        """logits (B, num_tasks) plus the first-order term (model.wide), if any."""
        wide = self.sparse_arch.wide_logits(sparse, sequence)
        return logits if wide is None else logits + wide

    def _group_parts(
        self, pooled: KeyedTensor, unpooled: dict[str, JaggedTensor] | None, dense: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """{group: (B, w_g)} of the embeddings and projected dense features (before the sequence group).
        Features sharing a table with the sequence were looked up unpooled: they are pooled here."""
        loose = {name: pool_jagged(unpooled[name], pooling) for name, pooling in self.pooled_unpooled}
        return self.feature_groups.parts([pooled], dense, loose)

    def _sequence_items(self, unpooled: dict[str, JaggedTensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The jagged items (N, d_item) and lengths (B,) (aligned features: one length)."""
        items = torch.cat([unpooled[n].values() for n in self.seq_features], dim=1)
        return items, unpooled[self.seq_features[0]].lengths()

    def _global_inputs(self, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The candidate (B, d_cand) and user (B, d_user) vectors LONGER's global tokens are made of."""
        cfg = self.longer_cfg
        candidate = torch.cat([parts[g] for g in cfg.candidate_groups], dim=1)
        user = torch.cat([parts[g] for g in cfg.user_groups], dim=1) if cfg.user_groups else None
        return candidate, user

    def _dense_logits(self, parts: dict[str, torch.Tensor], e_s: torch.Tensor) -> torch.Tensor:
        """The dense arch on the groups, with e_s (B, G, D) flattened into the sequence group."""
        return self.dense_arch(self.feature_groups.assemble(parts, {self.sequence_group: e_s.flatten(1)}))

    # ---- serving programs: the model after its embedding lookups ----------------------------------
    # What an exported artifact runs (pipeline/export.py traces these; the Predictor feeds them). Each
    # takes the group parts (`FeatureGroups.parts`), never KJTs, so no TorchRec is traced.

    @property
    def serves_sequence_cache(self) -> bool:
        """Whether the sequence arch serves through a per-user cache (`sequence_cache`,
        `logits_from_cache`)."""
        return self.sequence_arch is not None

    def logits_from_parts(
        self,
        parts: dict[str, torch.Tensor],
        items: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Group parts (+ the jagged sequence items (N, d_item) and lengths (B,)) -> logits (B, num_tasks)."""
        if self.sequence_arch is None:
            return self._served(self.dense_arch(self.feature_groups.assemble(parts, {})))
        e_s = self.sequence_arch(items, lengths, *self._global_inputs(parts))  # (B, G, D)
        return self._served(self._dense_logits(parts, e_s))

    def _served(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits as evaluation and serving see them: corrected for negative down-sampling."""
        if self.training or self.logit_correction is None:
            return logits
        return logits + self.logit_correction  # (B, num_tasks) + (num_tasks,)

    @torch.no_grad()
    def set_negative_keep_rates(self, rates: tuple[float, ...]) -> None:
        """Each task's share of negatives the training data kept (`ParquetReader.negative_keep_rates`)."""
        assert self.logit_correction is not None, "the model was built without data.negative_rate"
        self.logit_correction.copy_(torch.tensor(rates, dtype=torch.float64).log())

    def sequence_cache(self, items: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Once per user: jagged items (N, d_item) + lengths (U,) -> the candidate-independent states of the
        sequence arch, as a flat tuple of (U, ...) tensors (`logits_from_cache` takes them back)."""
        return self._longer("sequence_cache").encode_user(items, lengths).flat()

    def logits_from_cache(
        self, parts: dict[str, torch.Tensor], user_index: torch.Tensor, *cache: torch.Tensor
    ) -> torch.Tensor:
        """Logits (N, num_tasks) of N candidate rows' group parts; row n is scored against cached user
        `user_index[n]` (N,) of `sequence_cache`'s flat states."""
        longer = self._longer("logits_from_cache")
        states = SequenceStates.from_flat(cache, longer.cfg.num_layers).index_select(user_index)
        candidate, user = self._global_inputs(parts)
        e_s = longer.global_outputs(longer.globals_of(candidate, user), states)
        return self._served(self._dense_logits(parts, e_s))

    # ---- KV-cache serving from KJTs (sequence=longer) -------------------------------------------

    def _longer(self, what: str) -> Longer:
        if self.sequence_arch is None:
            raise ValueError(
                f"{what}: KV-cache serving needs model.sequence=longer (got {self.sequence_mode})"
            )
        return self.sequence_arch

    @torch.no_grad()
    def encode_users(self, sequence: KeyedJaggedTensor) -> SequenceStates:
        """Once per user: the unpooled KJT of U users (their sequence features; the candidate keys in it
        may be empty) -> the LONGER keys/values of every layer, to score any number of candidates."""
        longer = self._longer("encode_users")
        unpooled = self.sparse_arch.embedding_collection(sequence)
        return longer.encode_user(*self._sequence_items(unpooled))

    @torch.no_grad()
    def score_candidates(
        self,
        cache: SequenceStates,
        user_index: torch.Tensor,
        dense: torch.Tensor,
        sparse: KeyedJaggedTensor,
        sequence: KeyedJaggedTensor,
    ) -> torch.Tensor:
        """Logits (N, num_tasks) of N candidate rows, row n of cached user `user_index[n]`. The rows carry
        their features as in training, except that their sequence features may be empty: the sequence
        comes from the cache, so a candidate costs only LONGER's G global queries. Equal to `forward` on
        the same rows with their users' sequences, up to float rounding."""
        pooled, unpooled = self.sparse_arch(sparse, sequence)
        parts = self._group_parts(pooled, unpooled, dense)
        return self._with_wide(self.logits_from_cache(parts, user_index, *cache.flat()), sparse, sequence)


class RankingOutput(NamedTuple):
    task_losses: torch.Tensor  # (num_tasks,) detached weighted mean BCE per task
    aux_loss: torch.Tensor  # () detached auxiliary loss: the dense arch's (Sparse-MoE L_reg) + embedding L2
    logits: torch.Tensor  # (B, num_tasks) detached
    labels: torch.Tensor  # (B, num_tasks)
    user_id: torch.Tensor  # (B,)
    mask: torch.Tensor  # (B,) bool
    weight: torch.Tensor  # (B,) the rows' sample weights, 0 for padding
    # (num_tasks, 4) detached sums over the batch's rows: weight * BCE, weight * label, weight * predicted
    # probability, weight; the train log's windows add them up into logloss, NE and calibration
    task_sums: torch.Tensor


class RankingTrainWrapper(nn.Module):
    """`forward(batch) -> (loss, RankingOutput)`, the contract of `TrainPipelineSparseDist`.

    loss = sum over tasks of task_weights[t] * (the task's BCE averaged over rows with the rows' sample
    weights) + the auxiliary terms."""

    def __init__(
        self,
        model: RankingModel,
        autocast_dtype: torch.dtype | None = None,
        device_type: str = "cpu",
        embedding_l2: float = 0.0,
        task_weights: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        # bf16 autocast is for GPUs: on CPU bf16 matmul is orders of magnitude slower than fp32. Decided
        # here, not from the batch: TrainPipelineSparseDist fx-traces this forward, so it must be static.
        self.autocast_dtype = autocast_dtype
        self.device_type = device_type
        # L2 on the looked-up embeddings (optim.sparse.l2): lazy embedding weight decay, in the loss
        self.embedding_l2 = embedding_l2
        # Python floats, not a tensor: a tensor made from them each step is a host-to-device copy on a GPU
        unweighted = task_weights is None or all(w == 1 for w in task_weights)
        self.task_weights = None if unweighted else task_weights

    def forward(self, batch: RecBatch) -> tuple[torch.Tensor, RankingOutput]:
        with_sq = self.embedding_l2 > 0 and self.training
        inputs = (batch.dense, batch.sparse, batch.sequence, with_sq)
        if self.autocast_dtype is None:
            logits, emb_sq = self.model.forward_with_embedding_sq(*inputs)
        else:
            with torch.autocast(self.device_type, dtype=self.autocast_dtype):
                logits, emb_sq = self.model.forward_with_embedding_sq(*inputs)
        with record_function("## loss ##"):
            return self._loss(logits, emb_sq, batch)

    def _loss(
        self, logits: torch.Tensor, emb_sq: torch.Tensor | None, batch: RecBatch
    ) -> tuple[torch.Tensor, RankingOutput]:
        logits = logits.float()  # (B, num_tasks)
        weight = batch.weight.to(logits.dtype).unsqueeze(1)  # (B, 1): padding rows weigh 0
        bce = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
        weighted_bce = (bce * weight).sum(0)  # (num_tasks,)
        total_weight = weight.sum()
        task_losses = weighted_bce / total_weight.clamp_min(1e-12)  # (num_tasks,)
        if self.task_weights is None:
            loss = task_losses.sum()
        else:
            loss = sum(w * task_losses[t] for t, w in enumerate(self.task_weights))
        # the dense arch's auxiliary term of this training forward (Sparse-MoE: lambda * L_reg), if any
        aux = self.model.dense_arch.aux_loss() if self.training else None
        if emb_sq is not None:
            l2 = self.embedding_l2 * emb_sq.float()
            aux = l2 if aux is None else aux + l2
        if aux is not None:
            loss = loss + aux
        aux_value = aux.detach() if aux is not None else torch.zeros((), device=loss.device)
        with torch.no_grad():
            sums = torch.stack(
                [
                    weighted_bce,
                    (batch.labels * weight).sum(0),
                    (torch.sigmoid(logits) * weight).sum(0),
                    total_weight.expand(logits.shape[1]),
                ],
                dim=1,
            )  # (num_tasks, 4)
        output = RankingOutput(
            task_losses.detach(),
            aux_value,
            logits.detach(),
            batch.labels,
            batch.user_id,
            batch.mask,
            batch.weight,
            sums.detach(),
        )
        return loss, output
