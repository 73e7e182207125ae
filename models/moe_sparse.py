"""Sparse-MoE sparse inference (models/moe.py decision 7): the per-token experts computed only on the
active (slot, sample) pairs, as one padded gathered baddbmm per capacity class.

`sparse_ffn` is the eager kernel; `rankmixer::sparse_moe_ffn` wraps it as a torch.library custom op, so a
`torch.export`ed model (pipeline/export.py) calls it as one opaque op. Importing this module registers it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sparse_ffn(
    x: torch.Tensor,
    gates: torch.Tensor,
    active: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    num_buckets: int,
) -> tuple[torch.Tensor, int, int]:
    """Eq. 10 over the active (slot, sample) pairs only (decision 7): x (T, B, D), gates / active
    (T, B, N_e), expert weights w1 (T, N_e, D, H), b1 (T, N_e, 1, H), w2 (T, N_e, H, D), b2 (T, N_e, 1, D)
    -> (out (T, B, D), active pairs, computed rows incl. padding)."""
    T, E, D, H = w1.shape
    batch = x.shape[1]
    slot_active = active.permute(0, 2, 1).reshape(T * E, batch)  # (T*N_e, B), slot = t * N_e + j
    slot_gates = gates.permute(0, 2, 1).reshape(T * E, batch)  # (T*N_e, B)
    slot_ids, sample_ids = slot_active.nonzero(as_tuple=True)  # (N,) each, sorted by slot
    pair_gates = slot_gates[slot_ids, sample_ids].to(x.dtype)  # (N,)
    # x and the output are addressed as (T*B + 1, D) rows; the extra zero row is the padding target
    pair_rows = torch.div(slot_ids, E, rounding_mode="floor") * batch + sample_ids  # (N,)
    pad_row = T * batch
    x_rows = torch.cat([x.reshape(T * batch, D), x.new_zeros(1, D)])  # (T*B + 1, D)
    out_rows = x.new_zeros(T * batch + 1, D)  # (T*B + 1, D)
    counts = slot_active.sum(dim=1)  # (T*N_e,) active samples per slot
    num_pairs = int(slot_ids.numel())
    sparse_rows = 0
    if num_pairs == 0:
        return out_rows[:pad_row].view(T, batch, D), 0, 0
    starts = torch.cumsum(counts, 0) - counts  # (T*N_e,)
    pos_in_slot = torch.arange(num_pairs, device=x.device) - starts[slot_ids]  # (N,)
    # capacity classes: counts rounded up to a multiple of ceil(max_count / num_buckets)
    granule = max(1, math.ceil(int(counts.max()) / num_buckets))
    capacity = torch.div(counts + granule - 1, granule, rounding_mode="floor") * granule  # (T*N_e,)
    w1, b1 = w1.view(T * E, D, H), b1.view(T * E, 1, H)
    w2, b2 = w2.view(T * E, H, D), b2.view(T * E, 1, D)
    slot_rank = torch.full((T * E,), -1, dtype=torch.long, device=x.device)  # slot -> index in its class
    for cap in torch.unique(capacity[capacity > 0]).tolist():  # <= num_buckets capacity classes
        class_slots = (capacity == cap).nonzero().squeeze(1)  # (n,)
        slot_rank[class_slots] = torch.arange(class_slots.numel(), device=x.device)
        in_class = (capacity == cap)[slot_ids]  # (N,) pairs whose slot is in this class
        rank, pos = slot_rank[slot_ids[in_class]], pos_in_slot[in_class]
        row_index = torch.full((class_slots.numel(), cap), pad_row, dtype=torch.long, device=x.device)
        row_index[rank, pos] = pair_rows[in_class]  # (n, cap): row of x each computed row reads
        row_gates = x.new_zeros(class_slots.numel(), cap)
        row_gates[rank, pos] = pair_gates[in_class]  # (n, cap): 0 on padding rows
        xb = x_rows.index_select(0, row_index.view(-1)).view(class_slots.numel(), cap, D)  # (n, cap, D)
        if class_slots.numel() == T * E:  # one class holds every slot: use the weights in place
            cw1, cb1, cw2, cb2 = w1, b1, w2, b2
        else:  # gather the class's slots: each active slot's weights are copied once per forward
            cw1, cb1, cw2, cb2 = w1[class_slots], b1[class_slots], w2[class_slots], b2[class_slots]
        h = F.gelu(torch.baddbmm(cb1, xb, cw1))  # (n, cap, D) @ (n, D, k_e D) -> (n, cap, k_e D)
        y = torch.baddbmm(cb2, h, cw2)  # (n, cap, k_e D) @ (n, k_e D, D) -> (n, cap, D)
        weighted = (y * row_gates.unsqueeze(-1)).to(out_rows.dtype)  # (n, cap, D)
        out_rows.index_add_(0, row_index.view(-1), weighted.view(-1, D))
        sparse_rows += class_slots.numel() * cap
    return out_rows[:pad_row].view(T, batch, D), num_pairs, sparse_rows  # (T, B, D)


# torch.export cannot trace the sparse dispatch (its capacity classes come from the data: nonzero, unique,
# a Python loop over classes), so an exported model calls it as this one opaque op, whose output shape is
# x's. Importing this module registers it; pipeline/predictor.py does so before loading a program.
@torch.library.custom_op("rankmixer::sparse_moe_ffn", mutates_args=())
def sparse_moe_ffn(
    x: torch.Tensor,
    gates: torch.Tensor,
    active: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    num_buckets: int,
) -> torch.Tensor:
    return sparse_ffn(x, gates, active, w1, b1, w2, b2, num_buckets)[0]


@sparse_moe_ffn.register_fake
def _(x, gates, active, w1, b1, w2, b2, num_buckets):  # noqa: ANN001, ANN202 (torch's fake-impl contract)
    return torch.empty_like(x)
