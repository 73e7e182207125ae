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
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

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
from models.rankmixer import RankMixer, RankMixerConfig
from models.sparse_arch import SparseArch, embedding_bag_configs

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
    if arch not in DENSE_ARCHS:
        raise ValueError(f"model.arch: unknown arch {arch!r} (known: {', '.join(sorted(DENSE_ARCHS))})")
    config_cls, _ = DENSE_ARCHS[arch]
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"model: unknown key(s) {unknown} for arch {arch!r} (known: {sorted(known)})")
    return config_cls(**{**params, "group_dims": list(group_dims), "num_tasks": num_tasks})


def build_dense_arch(model_cfg: Any, group_dims: list[int], num_tasks: int) -> nn.Module:
    _, module_cls = DENSE_ARCHS[_as_dict(model_cfg).get("arch", "rankmixer")]
    return module_cls(dense_arch_config(model_cfg, group_dims, num_tasks))


def signed_log(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(torch.abs(x))


class FeatureGroups(nn.Module):
    """Pooled embeddings (KeyedTensor) + dense features (B, Nd) -> [ (B, d_g) for g in schema.groups ]."""

    def __init__(self, schema: Schema, dense_proj_dim: int) -> None:
        super().__init__()
        self.groups = list(schema.groups)
        dims = {n: cfg.embedding_dim for cfg in embedding_bag_configs(schema) for n in cfg.feature_names}
        # Embedding features of each group, by name: a sharded EmbeddingBagCollection emits its keys in an
        # order that depends on the sharding plan, so a model trained on 2 ranks and evaluated on 1 must
        # select its columns by key, never by position. KeyedTensor.regroup does that in one fused op.
        self.emb_features: list[list[str]] = [
            [name for name in schema.sparse_keys if schema.group_of(name) == g] for g in self.groups
        ]
        emb_widths = [sum(dims[name] for name in names) for names in self.emb_features]
        self.dense_index: dict[str, list[int]] = {
            g: [i for i, dg in enumerate(schema.dense_groups) if dg == g] for g in self.groups
        }
        self.dense_proj = nn.ModuleDict(
            {g: nn.Linear(len(idx), dense_proj_dim) for g, idx in self.dense_index.items() if idx}
        )
        for g, idx in self.dense_index.items():
            if idx:
                self.register_buffer(f"dense_idx_{g}", torch.tensor(idx, dtype=torch.long), persistent=False)
        self.group_dims = [
            w + (dense_proj_dim if self.dense_index[g] else 0) for g, w in zip(self.groups, emb_widths)
        ]
        empty = [g for g, d in zip(self.groups, self.group_dims) if d == 0]
        if empty:
            raise ValueError(f"schema.groups: group(s) {empty} have no sparse or dense feature")
        # Groups without embedding features get their dense projection alone.
        self._emb_groups = [names for names in self.emb_features if names]

    def forward(self, embeddings: KeyedTensor, dense: torch.Tensor) -> list[torch.Tensor]:
        parts = iter(KeyedTensor.regroup([embeddings], self._emb_groups))  # per group (B, w_g)
        dense = signed_log(dense)  # (B, Nd)
        out = []
        for g, names in zip(self.groups, self.emb_features):
            part = next(parts) if names else None
            if g in self.dense_proj:
                proj = self.dense_proj[g](dense.index_select(1, getattr(self, f"dense_idx_{g}")))  # (B, p)
                part = proj if part is None else torch.cat([part, proj], dim=1)  # (B, d_g)
            out.append(part)
        return out


class RankingModel(nn.Module):
    """sparse arch (TorchRec) -> feature groups -> dense arch -> logits (B, num_tasks)."""

    def __init__(
        self,
        schema: Schema,
        model_cfg: Any,
        dense_proj_dim: int = 16,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.sparse_arch = SparseArch(schema, device=device)
        self.feature_groups = FeatureGroups(schema, dense_proj_dim)
        self.dense_arch = build_dense_arch(model_cfg, self.feature_groups.group_dims, len(schema.labels))

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        embeddings = self.sparse_arch(sparse)
        groups = self.feature_groups(embeddings, dense)
        return self.dense_arch(groups)  # (B, num_tasks)


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
            logits = self.model(batch.dense, batch.sparse)
        else:
            with torch.autocast(self.device_type, dtype=self.autocast_dtype):
                logits = self.model(batch.dense, batch.sparse)
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
