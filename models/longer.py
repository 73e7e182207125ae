"""LONGER long-sequence module (Chai et al., arXiv 2505.04421), pure torch.

Input: the user's behaviour sequence, one embedding per item (the aligned sequence features of an item
concatenated), jagged as TorchRec's EmbeddingCollection hands it over: values (N, d_item), each row
oldest first, + lengths (B,); the candidate item's representation (B, d_cand); optional user-level
features (B, d_user). Output e_s: the global tokens' outputs (B, G, D), fed to RankMixer as the
sequence semantic group (RankMixer paper s3.2).

Design decisions (the abstract names the parts; where it is silent, the full paper as we read it):
1. Global tokens: [candidate, user, CLS_1..CLS_c] projected to D, placed *after* the sequence in causal
   order: they attend to every valid sequence token (target attention for the candidate, anchors that
   pool the long context) and to each other, while sequence tokens never attend to them. So a later item
   never influences an earlier sequence query in any layer, and the sequence side does not depend on the
   candidate at all -- which is what makes the KV cache (7) exact and cheap. e_s = the globals' outputs.
2. Token merge: K adjacent items become one token, L -> ceil(L / K) tokens. Groups are aligned to the
   most recent item (the left end is padded to a multiple of K), so the newest K items are always one
   token. "concat": the K item embeddings concatenated (K d_item) and projected to D. "inner": a
   lightweight InnerTransformer (one pre-LN attention layer of width d_inner over the K items, padding
   masked) whose K outputs are concatenated and projected to D: intra-group order and interaction are
   kept at K x lower cost than attention over the raw sequence. The merge runs on the jagged items, and
   the merged tokens are padded once to S = ceil(max_len / K): padding the raw items to max_len first
   costs K x more memory traffic, which dominated the training step when typical histories are far
   shorter than max_len (the built-in data: mean 25 items, max_len 256).
3. Positions: a learned embedding per merged position counted back from the most recent token, so the
   same recent behaviour gets the same position whatever the history length.
4. Hybrid attention: layer 1 is cross-causal: queries = global tokens + the k most recent merged tokens,
   keys/values = global tokens + the whole merged sequence. Layers 2..N are self-causal over those G + k
   queries only. A sequence query at merged position i sees sequence positions <= i (and itself when it
   is padding, so no attention row is empty); globals see every valid token. Cost: layer 1 is
   O((G + k) (G + L/K) D), the rest O((G + k)^2 D), instead of O(L^2 D) per layer for full
   self-attention over the raw sequence.
5. Pre-LN blocks (attention + GELU FFN, residual), `F.scaled_dot_product_attention` with a boolean mask.
6. Activation recomputation per layer (`recompute`: one flag per layer), `torch.utils.checkpoint`,
   training only. bf16 autocast is applied by the pipeline's wrapper on GPU.
7. KV cache for serving: the sequence path (token merge, positions, the recent queries through every
   layer, and each layer's sequence keys/values) does not depend on the candidate. `encode_user` runs it
   once per user; `score_candidates` runs only the G global queries per candidate against the cached
   keys/values, so cached and uncached outputs are equal up to float rounding.
8. Output scale: e_s = LayerNorm(global outputs) with the gain initialised to `output_gain` (0.1), not 1.
   RankMixer's multi-head token mixing puts a slice of every token into every token and then applies a
   post-LN, so one group at unit RMS beside embedding groups at RMS ~0.2 drowns their slices. The gain
   is learnable (free to grow); gain 1 vs 0.1 against feeding zeros and mean pooling is measured in
   reports/longer.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.choice import Choice


class MergeMode(Choice):
    concat = "concat"  # K items' embeddings side by side, then a linear map to D
    inner = "inner"  # InnerTransformer over the K items


@dataclass
class LongerConfig:
    # widths filled in by the pipeline (models/ranking.py) from the schema and the feature groups
    item_dim: int = 0  # width of one sequence item (its aligned feature embeddings concatenated)
    candidate_dim: int = 0  # width of the candidate item's representation
    user_dim: int = 0  # width of the user-level features (0: no user token)
    dim: int = 64  # D
    num_heads: int = 2
    num_layers: int = 2  # 1 cross-causal + (num_layers - 1) self-causal
    num_cls: int = 2  # learnable CLS global tokens
    merge: int = 8  # K items per merged token (1 = no merge)
    merge_mode: MergeMode = MergeMode.concat
    inner_dim: int = 32  # InnerTransformer width
    recent_queries: int = 8  # k most recent merged tokens that query in every layer
    ffn_mult: int = 2
    # initial gain of the output LayerNorm: e_s enters the RankMixer tokenizer next to embeddings of RMS
    # ~0.2, and at gain 1 its unit-RMS tokens swamp the others after token mixing + post-LN (decision 8)
    output_gain: float = 0.1
    max_len: int = 2048  # longest sequence (positions are learned up to ceil(max_len / merge))
    recompute: list[bool] = field(default_factory=list)  # per layer; [] = none
    # pipeline wiring: the semantic groups whose vectors form the candidate / user global tokens; None =
    # the schema's declared roles (`roles: {candidate: [...], user: [...]}`), the normal way to set them
    candidate_groups: list[str] | None = None
    user_groups: list[str] | None = None
    lr_scale: float = 1.0  # multiplier of the dense lr for the LONGER module's parameters

    def __post_init__(self) -> None:
        self.merge_mode = MergeMode.parse(self.merge_mode, "longer.merge_mode")
        if self.dim % self.num_heads:
            raise ValueError(f"longer: dim={self.dim} not divisible by num_heads={self.num_heads}")
        if self.merge < 1 or self.recent_queries < 1 or self.num_layers < 1:
            raise ValueError("longer: merge, recent_queries and num_layers must be >= 1")
        if self.recompute and len(self.recompute) != self.num_layers:
            raise ValueError(f"longer.recompute: {len(self.recompute)} flags for {self.num_layers} layers")

    @property
    def num_globals(self) -> int:
        return 1 + int(self.user_dim > 0) + self.num_cls

    @property
    def max_tokens(self) -> int:
        return math.ceil(self.max_len / self.merge)


class Attention(nn.Module):
    """Multi-head attention of queries x over keys/values kv with a boolean mask (True = attend)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        return x.view(B, N, self.num_heads, D // self.num_heads).transpose(1, 2)  # (B, h, N, D/h)

    def keys_values(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(kv).chunk(2, dim=-1)  # (B, N, D) each
        return self.split(k), self.split(v)  # (B, h, N, D/h)

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, Q, D = x.shape
        out = F.scaled_dot_product_attention(self.split(self.q(x)), k, v, attn_mask=mask)  # (B, h, Q, D/h)
        return self.out(out.transpose(1, 2).reshape(B, Q, D))  # (B, Q, D)


class Block(nn.Module):
    """Pre-LN: x += Attn(LN(x), LN(kv)); x += FFN(LN(x))."""

    def __init__(self, dim: int, num_heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.attend(self.norm_q(x), k, v, mask)
        return x + self.ffn(self.norm_ffn(x))


class InnerTransformer(nn.Module):
    """One pre-LN attention layer over the K items of each group: (N, K, d_item) -> (N, K * d_inner)."""

    def __init__(self, item_dim: int, inner_dim: int, merge: int) -> None:
        super().__init__()
        self.inp = nn.Linear(item_dim, inner_dim)
        self.pos = nn.Parameter(torch.zeros(merge, inner_dim))  # (K, d_inner)
        self.norm = nn.LayerNorm(inner_dim)
        self.attn = Attention(inner_dim, num_heads=1)

    def forward(self, items: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = self.inp(items) + self.pos  # (N, K, d_inner)
        # padding items are masked as keys; a fully padded group attends to itself (its token is masked)
        keys_ok = valid | ~valid.any(dim=1, keepdim=True)  # (N, K)
        mask = keys_ok[:, None, None, :]  # (N, 1, 1, K)
        h = self.norm(x)
        k, v = self.attn.keys_values(h)
        x = x + self.attn.attend(h, k, v, mask)  # (N, K, d_inner)
        return x.flatten(1)  # (N, K * d_inner)


class SequenceStates(NamedTuple):
    """The candidate-independent half: per layer, the sequence keys/values the globals attend to."""

    keys: list[torch.Tensor]  # per layer (B, h, S_i, D/h): S_0 = S merged tokens, S_i = k recent tokens
    values: list[torch.Tensor]
    valid: list[torch.Tensor]  # per layer (B, S_i) bool
    recent: torch.Tensor  # (B, k, D) outputs of the recent sequence queries after the last layer

    def index_select(self, index: torch.Tensor) -> SequenceStates:
        pick = [[t.index_select(0, index) for t in ts] for ts in (self.keys, self.values, self.valid)]
        return SequenceStates(*pick, self.recent.index_select(0, index))

    def flat(self) -> tuple[torch.Tensor, ...]:
        """keys, values and valid of every layer, then recent: what an exported program passes around."""
        return (*self.keys, *self.values, *self.valid, self.recent)

    @staticmethod
    def from_flat(flat: Sequence[torch.Tensor], num_layers: int) -> SequenceStates:
        L = num_layers
        keys, values, valid = (list(flat[i * L : (i + 1) * L]) for i in range(3))
        return SequenceStates(keys, values, valid, flat[3 * L])


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, Q, S) bool: query at merged position q sees valid keys at positions <= q, and always itself."""
    causal = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)  # (Q, S)
    itself = k_pos.unsqueeze(0) == q_pos.unsqueeze(1)
    return ((causal.unsqueeze(0) & k_valid.unsqueeze(1)) | itself.unsqueeze(0)).unsqueeze(1)


class Longer(nn.Module):
    """Jagged sequence (N, d_item) + lengths (B,) + candidate (+ user) -> global-token outputs e_s
    (B, G, D)."""

    def __init__(self, cfg: LongerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, K = cfg.dim, cfg.merge
        if cfg.merge_mode == "inner":
            self.inner: InnerTransformer | None = InnerTransformer(cfg.item_dim, cfg.inner_dim, K)
            merged_width = K * cfg.inner_dim
        else:
            self.inner = None
            merged_width = K * cfg.item_dim
        self.merge_proj = nn.Linear(merged_width, D)
        self.pos = nn.Parameter(torch.randn(cfg.max_tokens, D) * 0.02)  # index 0 = the most recent token
        self.candidate_proj = nn.Linear(cfg.candidate_dim, D)
        self.user_proj = nn.Linear(cfg.user_dim, D) if cfg.user_dim > 0 else None
        self.cls = nn.Parameter(torch.randn(cfg.num_cls, D) * 0.02)  # (c, D)
        self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.ffn_mult) for _ in range(cfg.num_layers))
        self.norm_out = nn.LayerNorm(D)
        nn.init.constant_(self.norm_out.weight, cfg.output_gain)

    def merge_tokens(self, items: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Jagged items (N, d_item) (rows of `lengths`, oldest first) -> merged tokens with positions
        (B, S, D) left-padded to S = ceil(max_len / K) (the most recent token last), and valid (B, S).

        The merge runs on the jagged items: only the ~N / K groups that hold an item are built and
        projected, and the padding happens once, on the merged tokens (S x fewer rows than padding the
        items). Every shape follows from B, N and the config, so there is no host sync and fx can trace it.
        """
        K, S = self.cfg.merge, self.cfg.max_tokens
        B, N = lengths.shape[0], items.shape[0]
        # on the device, not `if`: a Python check on a tensor would sync the host on every GPU step
        torch._assert_async(
            (lengths <= self.cfg.max_len).all(), f"sequence longer than longer.max_len={self.cfg.max_len}"
        )
        lengths = lengths.long()
        n_tok = torch.div(lengths + K - 1, K, rounding_mode="floor")  # (B,) merged tokens per row
        tok_off = torch.cumsum(n_tok, 0) - n_tok  # (B,) first group of each row
        rows = torch.repeat_interleave(torch.arange(B, device=items.device), lengths, output_size=N)  # (N,)
        pos = torch.arange(N, device=items.device) - (torch.cumsum(lengths, 0) - lengths)[rows]  # in-row
        # groups end at the most recent item: a row is left-padded to n_tok * K, its oldest group partial
        slot = tok_off[rows] * K + n_tok[rows] * K - lengths[rows] + pos  # (N,) flat (group, slot)
        groups_cap = N // K + B + 1  # >= sum(n_tok) + 1; the spare groups stay empty and are never read
        groups = items.new_zeros(groups_cap * K, items.shape[1]).index_copy(0, slot, items)
        groups = groups.view(groups_cap, K, -1)  # (M, K, d_item)
        if self.inner is not None:
            item_valid = torch.zeros(groups_cap * K, dtype=torch.bool, device=items.device)
            item_valid = item_valid.index_fill(0, slot, True).view(groups_cap, K)  # (M, K)
            flat = self.inner(groups, item_valid)  # (M, K d_inner)
        else:
            flat = groups.flatten(1)  # (M, K d_item)
        merged = self.merge_proj(flat)  # (M, D)
        # pad once: grid cell (b, s) holds group tok_off[b] + s - (S - n_tok[b]) when that is >= 0
        s = torch.arange(S, device=items.device)
        first = S - n_tok  # (B,) first valid merged position of each row
        valid = s.unsqueeze(0) >= first.unsqueeze(1)  # (B, S)
        index = torch.where(valid, tok_off.unsqueeze(1) + s.unsqueeze(0) - first.unsqueeze(1), 0)
        tokens = merged.index_select(0, index.flatten()).view(B, S, -1) * valid.unsqueeze(-1)
        return tokens + self.pos[:S].flip(0), valid  # (B, S, D): oldest first; (B, S)

    def globals_of(self, candidate: torch.Tensor, user: torch.Tensor | None) -> torch.Tensor:
        parts = [self.candidate_proj(candidate).unsqueeze(1)]  # (B, 1, D)
        if self.user_proj is not None:
            if user is None:
                raise ValueError("longer: this module has a user token; pass the user features")
            parts.append(self.user_proj(user).unsqueeze(1))
        parts.append(self.cls.unsqueeze(0).expand(candidate.shape[0], -1, -1))
        return torch.cat(parts, dim=1)  # (B, G, D)

    def _block(self, i: int, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
        block = self.blocks[i]
        if self.training and self.cfg.recompute and self.cfg.recompute[i]:
            return checkpoint(block, x, k, v, mask, use_reentrant=False)  # recomputed in backward
        return block(x, k, v, mask)

    def sequence_states(self, items: torch.Tensor, lengths: torch.Tensor) -> SequenceStates:
        """The sequence path through every layer (candidate-independent)."""
        tokens, valid = self.merge_tokens(items, lengths)  # (B, S, D), (B, S)
        S = tokens.shape[1]
        k = min(self.cfg.recent_queries, S)
        pos = torch.arange(S, device=tokens.device)
        keys, values, valids = [], [], []
        kv_in, kv_valid, kv_pos = tokens, valid, pos  # layer 1: the whole merged sequence
        x, q_pos = tokens[:, S - k :], pos[S - k :]  # (B, k, D): the recent queries
        for i, block in enumerate(self.blocks):
            if i > 0:  # self-causal over the recent queries
                kv_in, kv_valid, kv_pos = x, valid[:, S - k :], q_pos
            key, value = block.attn.keys_values(block.norm_kv(kv_in))
            keys.append(key), values.append(value), valids.append(kv_valid)
            x = self._block(i, x, key, value, causal_mask(q_pos, kv_pos, kv_valid))
        return SequenceStates(keys, values, valids, x)

    def global_outputs(self, globs: torch.Tensor, seq: SequenceStates) -> torch.Tensor:
        """The G global queries through every layer, attending to each other and to the sequence keys."""
        G = globs.shape[1]
        x = globs  # (B, G, D)
        for i, block in enumerate(self.blocks):
            gk, gv = block.attn.keys_values(block.norm_kv(x))  # (B, h, G, D/h)
            k = torch.cat([gk, seq.keys[i]], dim=2)  # (B, h, G + S_i, D/h)
            v = torch.cat([gv, seq.values[i]], dim=2)
            keys_valid = torch.cat([seq.valid[i].new_ones(seq.valid[i].shape[0], G), seq.valid[i]], dim=1)
            x = self._block(i, x, k, v, keys_valid[:, None, None, :])  # (B, G, D)
        return self.norm_out(x)  # (B, G, D): e_s

    def forward(
        self,
        items: torch.Tensor,
        lengths: torch.Tensor,
        candidate: torch.Tensor,
        user: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Jagged items (N, d_item) + lengths (B,) + candidate (B, d_cand) (+ user (B, d_user)) -> e_s."""
        return self.global_outputs(self.globals_of(candidate, user), self.sequence_states(items, lengths))

    # ---- KV-cache serving ------------------------------------------------------------------------

    @torch.no_grad()
    def encode_user(self, items: torch.Tensor, lengths: torch.Tensor) -> SequenceStates:
        """Once per user: jagged items (N, d_item) + lengths (U,) -> the cached keys/values of every layer."""
        return self.sequence_states(items, lengths)

    @torch.no_grad()
    def score_candidates(
        self,
        cache: SequenceStates,
        user_index: torch.Tensor,
        candidate: torch.Tensor,
        user: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """e_s (N, G, D) for N candidates; candidate n belongs to cached user `user_index[n]` (N,)."""
        globs = self.globals_of(candidate, None if user is None else user.index_select(0, user_index))
        return self.global_outputs(globs, cache.index_select(user_index))

    def flops_per_sample(self, seq_len: int) -> float:
        """Forward matmul FLOPs for one sample with `seq_len` items (multiply-add = 2), no cache."""
        c = self.cfg
        D, K, G = c.dim, c.merge, c.num_globals
        S = math.ceil(seq_len / K)
        k = min(c.recent_queries, S)
        per_query = 2 * D * D * 2 + 2 * 2 * D * c.ffn_mult * D  # q + out projections, FFN
        kv = 2 * D * 2 * D  # key + value projections per key token
        merge = 2 * S * K * (c.inner_dim if self.inner is not None else c.item_dim) * D
        if self.inner is not None:
            d = c.inner_dim
            merge += S * K * (2 * c.item_dim * d + 4 * 2 * d * d) + S * 2 * 2 * K * K * d
        total = merge + 2 * D * (c.candidate_dim + c.user_dim)
        for i in range(c.num_layers):
            keys = S if i == 0 else k
            total += keys * kv + k * per_query + 2 * 2 * k * keys * D  # sequence queries
            total += G * (kv + per_query) + 2 * 2 * G * (G + keys) * D  # global queries
        return float(total)
