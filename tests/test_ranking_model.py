"""RankingModel wiring: semantic groups are assembled from the embeddings by feature name."""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedTensor

from data.schema import Schema
from models.feature_groups import FeatureGroups


def test_feature_groups_pick_embeddings_by_key_not_by_position(two_table_schema: Schema):
    # A sharded EmbeddingBagCollection emits its keys in a plan-dependent order; the groups must not move.
    groups = FeatureGroups(two_table_schema, dense_proj_dim=4)
    dims = {"user_id": 8, "item_id": 8, "tags": 4, "seq_item": 8}
    per_key = {k: torch.randn(3, d) for k, d in dims.items()}
    dense = torch.randn(3, 2)

    def as_keyed(order: list[str]) -> KeyedTensor:
        return KeyedTensor(
            keys=order,
            length_per_key=[dims[k] for k in order],
            values=torch.cat([per_key[k] for k in order], dim=1),
        )

    a = groups(as_keyed(["user_id", "item_id", "tags", "seq_item"]), dense)
    b = groups(as_keyed(["seq_item", "tags", "user_id", "item_id"]), dense)
    assert [t.shape[1] for t in a] == groups.group_dims == [8 + 4, 8 + 4 + 4, 8]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    torch.testing.assert_close(a[1][:, :12], torch.cat([per_key["item_id"], per_key["tags"]], dim=1))
