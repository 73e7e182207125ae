"""`FeatureGroups`: the sparse arch's embeddings and the dense float features -> the ordered list of
semantic-group vectors the dense arch takes (paper s3.2, DESIGN s2).

- Each group is the concatenation of its features' embeddings, plus (if the group has dense features) a
  linear projection of its dense features. Features are picked by name, never by position: a sharded
  collection's key order depends on the sharding plan. The pick is one column gather (`regroup`), whose
  column order is computed once per key order.
- Dense float features go through a signed log (sign(x) * log1p(|x|)) before their projection, because
  recsys counts and durations are heavy-tailed and a plain linear layer on them trains badly.
- A group left without any input (e.g. the sequence group with sequence=none) is dropped.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.autograd.function import FunctionCtx
from torchrec.sparse.jagged_tensor import KeyedTensor

from data.schema import Schema


def signed_log(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(torch.abs(x))


class _PermuteColumns(torch.autograd.Function):
    """x[:, index] for a permutation `index`, whose gradient is grad[:, inverse]: a gather both ways.
    (index_select's own backward is a scatter-add into zeros, column by column on CPU.)"""

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(1, index)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inverse,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad.index_select(1, inverse), None, None


@functools.cache
def _regroup_index(
    keys: tuple[str, ...], dims: tuple[int, ...], groups: tuple[tuple[str, ...], ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """(the columns of `groups`' keys, in group order; the inverse permutation, None unless every column is
    taken exactly once; each group's width), made once per key order: a tensor built from a Python list
    every forward is a blocking host-to-device copy on a GPU."""
    starts = dict(zip(keys, (sum(dims[:i]) for i in range(len(dims)))))
    width = dict(zip(keys, dims))
    columns = [c for g in groups for k in g for c in range(starts[k], starts[k] + width[k])]
    index = torch.tensor(columns, device=device)
    is_permutation = sorted(columns) == list(range(sum(dims)))
    inverse = torch.argsort(index) if is_permutation else None
    return index, inverse, [sum(width[k] for k in g) for g in groups]


@torch.fx.wrap  # one node for TorchRec's pipeline tracer: the key bookkeeping is not traceable
def regroup(embeddings: list[KeyedTensor], groups: tuple[tuple[str, ...], ...]) -> list[torch.Tensor]:
    """[(B, w_g)] of each group's keys' columns side by side, as `KeyedTensor.regroup`, by one gather (an
    exact permutation: the same values in both directions)."""
    keys = tuple(k for kt in embeddings for k in kt.keys())
    dims = tuple(d for kt in embeddings for d in kt.length_per_key())
    if len(embeddings) == 1:
        values = embeddings[0].values()  # (B, sum of dims)
    else:
        values = torch.cat([kt.values() for kt in embeddings], dim=1)
    index, inverse, widths = _regroup_index(keys, dims, groups, values.device)
    if inverse is None:
        picked = values.index_select(1, index)
    else:
        picked = _PermuteColumns.apply(values, index, inverse)  # (B, sum of widths)
    return list(picked.split(widths, dim=1))


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
        # select its columns by key, never by position (`regroup`).
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
        self._emb_groups = tuple(tuple(self.emb_features[g]) for g in self.groups if self.emb_features[g])

    def parts(
        self, embeddings: list[KeyedTensor], dense: torch.Tensor, loose: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """{group: (B, w_g)} from the embeddings, the loose features and the dense features (no extras)."""
        # indexed, not iterated: under the pipeline's fx tracing the regrouped list is one proxy
        regrouped = regroup(embeddings, self._emb_groups)  # per group (B, w_g)
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
