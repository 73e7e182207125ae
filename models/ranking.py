"""RankingModel: sparse arch -> semantic feature groups -> dense arch -> one logit per task.

Design choices:
- `FeatureGroups` turns the sparse arch's pooled embeddings and the dense float features into the ordered
  list of semantic-group vectors the tokenizer expects (paper s3.2, DESIGN s2): each group is the
  concatenation of its features' embeddings, plus (if the group has dense features) a linear projection of
  its dense features. Features are picked by name (`KeyedTensor.regroup`), never by position.
- Dense float features go through a signed log (sign(x) * log1p(|x|)) before their projection, because
  recsys counts and durations are heavy-tailed and a plain linear layer on them trains badly.
- The dense arch is any module mapping `list[(B, d_g)] -> (B, num_tasks)`; `build_dense_arch` picks it from
  the model config's `arch` key, so baselines run through the same pipeline.
- `RankingTrainWrapper` is the contract of TorchRec's `TrainPipelineSparseDist`: `forward(batch)` returns
  `(loss, output)` and never modifies the batch (a module that mutates its inputs is silently not
  pipelined). loss = sum over tasks of the mean BCE over valid rows (DESIGN s1).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from data.batch import RecBatch
from data.schema import Schema
from models.baselines import (
    DLRM,
    AutoInt,
    AutoIntConfig,
    DCNv2,
    DCNv2Config,
    DLRMConfig,
    MMoE,
    MMoEConfig,
    Wukong,
    WukongConfig,
)
from models.longer import Longer, LongerConfig, SequenceStates
from models.rankmixer import RankMixer, RankMixerConfig
from models.sparse_arch import SparseArch

# arch name -> (config dataclass, module class). Plain dict, filled here: no import-time registration.
DENSE_ARCHS: dict[str, tuple[type, type[nn.Module]]] = {
    "rankmixer": (RankMixerConfig, RankMixer),
    "dlrm": (DLRMConfig, DLRM),
    "dcnv2": (DCNv2Config, DCNv2),
    "autoint": (AutoIntConfig, AutoInt),
    "wukong": (WukongConfig, Wukong),
    "mmoe": (MMoEConfig, MMoE),
}


def _as_dict(model_cfg: Any) -> dict[str, Any]:
    """A model config as a plain dict: Hydra hands over a typed preset dataclass, a checkpoint a mapping."""
    return dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg) else dict(model_cfg)


def dense_arch_config(model_cfg: Any, group_dims: list[int], num_tasks: int) -> Any:
    """The typed config of the dense arch named by `model_cfg["arch"]`, with the schema-derived fields set."""
    params = _as_dict(model_cfg)
    arch = params.pop("arch", "rankmixer")
    for key in SEQUENCE_ARCH_KEYS:  # the sequence arch's, not the dense arch's
        params.pop(key, None)
    if arch not in DENSE_ARCHS:
        raise ValueError(f"model.arch: unknown arch {arch!r} (known: {', '.join(sorted(DENSE_ARCHS))})")
    config_cls, _ = DENSE_ARCHS[arch]
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"model: unknown key(s) {unknown} for arch {arch!r} (known: {sorted(known)})")
    return config_cls(**{**params, "group_dims": list(group_dims), "num_tasks": num_tasks})


SEQUENCE_ARCH_KEYS = ("sequence", "longer")


def sequence_settings(model_cfg: Any) -> tuple[str, LongerConfig]:
    """`model.sequence` (none | mean_pool | longer) and the LONGER options of a model config."""
    params = _as_dict(model_cfg)
    longer = params.get("longer") or {}
    longer = longer if isinstance(longer, LongerConfig) else LongerConfig(**dict(longer))
    return params.get("sequence", "mean_pool"), longer


def build_dense_arch(model_cfg: Any, group_dims: list[int], num_tasks: int) -> nn.Module:
    _, module_cls = DENSE_ARCHS[_as_dict(model_cfg).get("arch", "rankmixer")]
    return module_cls(dense_arch_config(model_cfg, group_dims, num_tasks))


def signed_log(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(torch.abs(x))


class FeatureGroups(nn.Module):
    """Pooled embeddings (KeyedTensors) + dense features (B, Nd) -> {group: (B, d_g)}, then, with the
    sequence arch's output added to its group, the ordered list the dense arch expects."""

    def __init__(
        self,
        schema: Schema,
        dense_proj_dim: int,
        pooled_keys: list[str] | None = None,
        extra: dict[str, int] | None = None,
        loose_keys: list[str] | None = None,
    ) -> None:
        super().__init__()
        pooled_keys = list(schema.sparse_keys) if pooled_keys is None else pooled_keys
        # features handed over as separate (B, d) tensors rather than in the KeyedTensor (sequence=longer:
        # the ones sharing a table with the sequence, pooled after their unpooled lookup)
        loose = list(loose_keys or [])
        self.loose_features = {g: [n for n in loose if schema.group_of(n) == g] for g in schema.groups}
        self.extra = dict(extra or {})  # group -> width of a vector the model adds (LONGER's e_s)
        dims = {n: t["embedding_dim"] for t in schema.tables().values() for n in t["feature_names"]}
        # Embedding features of each group, by name: a sharded EmbeddingBagCollection emits its keys in an
        # order that depends on the sharding plan, so a model trained on 2 ranks and evaluated on 1 must
        # select its columns by key, never by position. KeyedTensor.regroup does that in one fused op.
        self.emb_features: dict[str, list[str]] = {
            g: [name for name in pooled_keys if schema.group_of(name) == g] for g in schema.groups
        }
        self.dense_index: dict[str, list[int]] = {
            g: [i for i, dg in enumerate(schema.dense_groups) if dg == g] for g in schema.groups
        }
        widths = {
            g: sum(dims[n] for n in (*self.emb_features[g], *self.loose_features[g]))
            + (dense_proj_dim if self.dense_index[g] else 0)
            + self.extra.get(g, 0)
            for g in schema.groups
        }
        # a group left without any input (e.g. the sequence group with sequence=none) is dropped
        self.groups = [g for g in schema.groups if widths[g] > 0]
        self.group_dims = [widths[g] for g in self.groups]
        self.dense_proj = nn.ModuleDict(
            {
                g: nn.Linear(len(self.dense_index[g]), dense_proj_dim)
                for g in self.groups
                if self.dense_index[g]
            }
        )
        for g in self.dense_proj:
            self.register_buffer(f"dense_idx_{g}", torch.tensor(self.dense_index[g]), persistent=False)
        self._emb_groups = [self.emb_features[g] for g in self.groups if self.emb_features[g]]

    def parts(
        self, embeddings: list[KeyedTensor], dense: torch.Tensor, loose: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """{group: (B, w_g)} from the embeddings, the loose features and the dense features (no extras)."""
        # indexed, not iterated: under the pipeline's fx tracing the regrouped list is one proxy
        regrouped = KeyedTensor.regroup(embeddings, self._emb_groups)  # per group (B, w_g)
        dense = signed_log(dense)  # (B, Nd)
        out, i = {}, 0
        for g in self.groups:
            pieces = []
            if self.emb_features[g]:
                pieces.append(regrouped[i])
                i += 1
            pieces += [loose[n] for n in self.loose_features[g]] if loose else []
            if g in self.dense_proj:
                pieces.append(self.dense_proj[g](dense.index_select(1, getattr(self, f"dense_idx_{g}"))))
            if pieces:
                out[g] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        return out

    def assemble(self, parts: dict[str, torch.Tensor], extra: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The dense arch's input: per group (in schema order) its extra vector first, then its parts."""
        out = []
        for g in self.groups:
            pieces = [extra[g]] if g in self.extra else []
            if g in parts:
                pieces.append(parts[g])
            out.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1))  # (B, d_g)
        return out

    def forward(self, embeddings: KeyedTensor | list[KeyedTensor], dense: torch.Tensor) -> list[torch.Tensor]:
        embeddings = embeddings if isinstance(embeddings, list) else [embeddings]
        return self.assemble(self.parts(embeddings, dense), {})


def pool_jagged(jt: JaggedTensor, pooling: str) -> torch.Tensor:
    """Sum / mean of each row of a (B rows, values (N, d)) jagged tensor -> (B, d); empty rows give 0."""
    lengths = jt.lengths()
    rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)  # (N,)
    values = jt.values()
    out = values.new_zeros(lengths.numel(), values.shape[1]).index_add(0, rows, values)  # (B, d)
    if pooling == "mean":
        out = out / lengths.clamp_min(1).unsqueeze(1).to(values.dtype)
    return out


class RankingModel(nn.Module):
    """sparse arch (TorchRec) -> feature groups (+ sequence arch) -> dense arch -> logits (B, num_tasks)."""

    def __init__(
        self,
        schema: Schema,
        model_cfg: Any,
        dense_proj_dim: int = 16,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.sequence_mode, longer_cfg = sequence_settings(model_cfg)
        self.sparse_arch = SparseArch(schema, self.sequence_mode, device=device)
        self.sequence_arch: Longer | None = None
        self.pooled_unpooled: list[tuple[str, str]] = []  # (feature, pooling) looked up unpooled, then pooled
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
            for g in (*longer_cfg.candidate_groups, *longer_cfg.user_groups):
                if g not in schema.groups:
                    raise ValueError(f"model.longer: unknown group {g!r} (groups: {list(schema.groups)})")
            seq_dims = {n: t["embedding_dim"] for t in schema.tables().values() for n in t["feature_names"]}
            longer_cfg = dataclasses.replace(
                longer_cfg,
                item_dim=sum(seq_dims[n] for n in self.seq_features),
                candidate_dim=sum(width.get(g, 0) for g in longer_cfg.candidate_groups),
                user_dim=sum(width.get(g, 0) for g in longer_cfg.user_groups),
                max_len=schema.sequence.max_len,
            )
            self.sequence_arch = Longer(longer_cfg)
            self.sequence_group = schema.sequence.group
            extra = {self.sequence_group: longer_cfg.num_globals * longer_cfg.dim}
        self.longer_cfg = longer_cfg
        self.feature_groups = FeatureGroups(schema, dense_proj_dim, group_keys, extra, loose_keys=loose_keys)
        self.dense_arch = build_dense_arch(model_cfg, self.feature_groups.group_dims, len(schema.labels))

    def forward(
        self, dense: torch.Tensor, sparse: KeyedJaggedTensor, sequence: KeyedJaggedTensor | None = None
    ) -> torch.Tensor:
        pooled, unpooled = self.sparse_arch(sparse, sequence)
        if self.sequence_arch is None:
            return self.dense_arch(self.feature_groups([pooled], dense))  # (B, num_tasks)
        parts = self._group_parts(pooled, unpooled, dense)
        items, lengths = self._sequence_items(unpooled)
        e_s = self.sequence_arch(items, lengths, *self._global_inputs(parts))  # (B, G, D)
        return self._dense_logits(parts, e_s)

    def _dense_logits(self, parts: dict[str, torch.Tensor], e_s: torch.Tensor) -> torch.Tensor:
        """The dense arch on the groups, with e_s (B, G, D) flattened into the sequence group."""
        return self.dense_arch(self.feature_groups.assemble(parts, {self.sequence_group: e_s.flatten(1)}))

    def _group_parts(
        self, pooled: KeyedTensor, unpooled: dict[str, JaggedTensor], dense: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        # features sharing a table with the sequence (looked up unpooled): pool them here
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

    # ---- KV-cache serving (sequence=longer) ------------------------------------------------------

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
        longer = self._longer("score_candidates")
        pooled, unpooled = self.sparse_arch(sparse, sequence)
        parts = self._group_parts(pooled, unpooled, dense)
        candidate, user = self._global_inputs(parts)
        e_s = longer.global_outputs(longer.globals_of(candidate, user), cache.index_select(user_index))
        return self._dense_logits(parts, e_s)


class RankingOutput(NamedTuple):
    task_losses: torch.Tensor  # (num_tasks,) detached mean BCE per task
    aux_loss: torch.Tensor  # () detached auxiliary loss of the dense arch (Sparse-MoE L_reg term), 0 if none
    logits: torch.Tensor  # (B, num_tasks) detached
    labels: torch.Tensor  # (B, num_tasks)
    user_id: torch.Tensor  # (B,)
    mask: torch.Tensor  # (B,) bool


class RankingTrainWrapper(nn.Module):
    """`forward(batch) -> (loss, RankingOutput)`, the contract of `TrainPipelineSparseDist`."""

    def __init__(
        self, model: RankingModel, autocast_dtype: torch.dtype | None = None, device_type: str = "cpu"
    ) -> None:
        super().__init__()
        self.model = model
        # bf16 autocast is for GPUs: on CPU bf16 matmul is orders of magnitude slower than fp32. Decided
        # here, not from the batch: TrainPipelineSparseDist fx-traces this forward, so it must be static.
        self.autocast_dtype = autocast_dtype
        self.device_type = device_type
        # Dense archs with an auxiliary objective (Sparse-MoE: lambda * L_reg, or a balance loss) expose
        # `aux_loss()`, the term of their most recent training forward; decided once, so tracing is static.
        self.has_aux = callable(getattr(model.dense_arch, "aux_loss", None))

    def forward(self, batch: RecBatch) -> tuple[torch.Tensor, RankingOutput]:
        if self.autocast_dtype is None:
            logits = self.model(batch.dense, batch.sparse, batch.sequence)
        else:
            with torch.autocast(self.device_type, dtype=self.autocast_dtype):
                logits = self.model(batch.dense, batch.sparse, batch.sequence)
        logits = logits.float()  # (B, num_tasks)
        weight = batch.mask.to(logits.dtype).unsqueeze(1)  # (B, 1): padding rows contribute nothing
        bce = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
        task_losses = (bce * weight).sum(0) / weight.sum().clamp_min(1.0)  # (num_tasks,)
        loss = task_losses.sum()
        aux = self.model.dense_arch.aux_loss() if self.has_aux and self.training else None
        if aux is not None:
            loss = loss + aux
        aux_value = aux.detach() if aux is not None else torch.zeros((), device=loss.device)
        output = RankingOutput(
            task_losses.detach(), aux_value, logits.detach(), batch.labels, batch.user_id, batch.mask
        )
        return loss, output
