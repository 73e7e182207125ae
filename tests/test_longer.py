"""LONGER sequence module (models/longer.py): causality, padding, token merge, KV cache, recomputation."""

from __future__ import annotations

import pytest
import torch

from models.longer import Longer, LongerConfig

D_ITEM, D_CAND, D_USER = 12, 10, 6


def make(merge_mode: str = "concat", **kw) -> Longer:
    torch.manual_seed(0)
    fields = dict(item_dim=D_ITEM, candidate_dim=D_CAND, user_dim=D_USER, dim=16, num_heads=2, num_layers=3,
                  merge=4, merge_mode=merge_mode, inner_dim=8, recent_queries=3, max_len=64)  # fmt: skip
    return Longer(LongerConfig(**{**fields, **kw})).eval()


def inputs(batch: int = 4, length: int = 22, seed: int = 1):
    """Jagged items (N, D_ITEM) with rows of lengths [length, 13, 1, 7][:batch], candidates, users."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([length, 13, 1, 7][:batch])
    items = torch.randn(int(lengths.sum()), D_ITEM, generator=gen)
    cand = torch.randn(batch, D_CAND, generator=gen)
    user = torch.randn(batch, D_USER, generator=gen)
    return items, lengths, cand, user


def rows(items: torch.Tensor, lengths: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The jagged items of rows `index`, in that order."""
    per_row = items.split(lengths.tolist())
    return torch.cat([per_row[i] for i in index.tolist()])


@pytest.mark.parametrize("mode", ["concat", "inner"])
def test_token_merge_groups_k_items_aligned_to_the_most_recent(mode: str):
    model = make(mode)
    items, lengths, _, _ = inputs(length=22)  # 22 items -> 6 tokens of 4, the oldest one partial
    tokens, valid = model.merge_tokens(items, lengths)
    assert tokens.shape == (4, 16, 16) and valid.shape == (4, 16)  # padded once to max_len / K = 16
    assert valid.sum(1).tolist() == [6, 4, 1, 2]  # ceil(length / 4)
    assert valid[:, -1].all() and not valid[2, :-1].any()  # left-padded: the most recent token last
    if mode == "concat":  # the newest token == the projection of the last 4 items, most recent last
        newest = model.merge_proj(items[18:22].flatten()) + model.pos[0]
        torch.testing.assert_close(tokens[0, -1], newest)
    out = model(*inputs())
    assert out.shape == (4, model.cfg.num_globals, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["concat", "inner"])
def test_a_later_item_never_influences_an_earlier_query(mode: str):
    model = make(mode, recent_queries=6)
    items, lengths, _, _ = inputs(batch=1, length=24)
    model.cfg.max_len = 24  # S = 6 merged tokens, all of them recent queries
    before = model.sequence_states(items, lengths).recent  # (1, 6, D): merged positions 0..5
    changed = items.clone()
    changed[13] += 5.0  # item 13 lies in merged token 3 (items 12..15)
    after = model.sequence_states(changed, lengths).recent
    torch.testing.assert_close(after[0, :3], before[0, :3])  # earlier queries: untouched in every layer
    assert (after[0, 3:] - before[0, 3:]).abs().amax() > 1e-3  # it and later ones see it


@pytest.mark.parametrize("mode", ["concat", "inner"])
def test_padding_does_not_change_the_outputs(mode: str):
    model = make(mode)
    items, lengths, cand, user = inputs(length=22)
    out = model(items, lengths, cand, user)
    # more padding: the same weights with max_len 128 (positions count back from the newest token)
    wider = make(mode, max_len=128)
    state = model.state_dict()
    state["pos"] = torch.cat([state["pos"], wider.pos.detach()[16:]])
    wider.load_state_dict(state)
    torch.testing.assert_close(wider(items, lengths, cand, user), out)
    # each row alone: what else is in the batch (and how long it is) pads nothing into this row
    for b in range(4):
        i = torch.tensor([b])
        alone = model(rows(items, lengths, i), lengths[i], cand[i], user[i])
        torch.testing.assert_close(alone[0], out[b])


@pytest.mark.parametrize("mode", ["concat", "inner"])
def test_kv_cache_scores_equal_uncached_scores_for_many_candidates(mode: str):
    model = make(mode)
    items, lengths, _, user = inputs(batch=3, length=22)
    n = 40
    user_index = torch.arange(n) % 3
    cand = torch.randn(n, D_CAND)
    cache = model.encode_user(items, lengths)  # once per user
    cached = model.score_candidates(cache, user_index, cand, user)
    with torch.no_grad():
        full = model(rows(items, lengths, user_index), lengths[user_index], cand, user[user_index])
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_recomputation_gives_the_same_gradients():
    items, lengths, cand, user = inputs()
    grads = []
    for recompute in ((), (True, False, True)):
        model = make(recompute=recompute).train()
        model(items, lengths, cand, user).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_bad_config_and_too_long_sequences_are_rejected():
    with pytest.raises(ValueError, match="merge_mode"):
        make(merge_mode="pool")
    with pytest.raises(ValueError, match="recompute"):
        make(recompute=(True,))
    model = make(max_len=16)
    with pytest.raises(RuntimeError, match="max_len=16"):
        model(*inputs(length=22))


def test_bench_longer_reports_cost_memory_and_serving(tmp_path):
    from launch.bench import main

    out = tmp_path / "longer.json"
    args = "longer --lengths 64,128 --batch-size 4 --candidates 1,8 --serving-candidates 8 --steps 1"
    main([*args.split(), "--threads", "1", "--merge", "4", "--recent", "4", "--json", str(out)])
    import json

    result = json.loads(out.read_text())
    by = {(r["length"], r["model"]): r for r in result["cost"]}
    for length in (64, 128):
        longer, full = by[(length, "longer")], by[(length, "full_attention")]
        assert longer["fwd_mflop_per_sample"] < full["fwd_mflop_per_sample"] / 2
        for row in (longer, full):
            assert row["activation_mib_recompute"] < row["activation_mib"]
    assert [s["candidates_per_user"] for s in result["serving"]] == [1, 8]
