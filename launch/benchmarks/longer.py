"""`launch/bench.py longer`: the LONGER sequence module's cost vs sequence length against full causal
self-attention over the raw sequence (FLOPs, training samples/s, activation memory with/without
recomputation), and KV-cache serving (candidates/s with and without the cache). Imports torch only."""

from __future__ import annotations

import argparse
import statistics

import torch

from launch.benchmarks.timing import saved_activation_bytes, time_calls, write_json


def cmd_longer(args: argparse.Namespace) -> dict:
    """Per length: LONGER (token merge + hybrid attention) vs full causal self-attention over the raw
    sequence (the same module with merge=1 and every token a query), training step time and activation
    memory with and without recomputation; then KV-cache serving at the longest length."""
    from models.longer import Longer, LongerConfig

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    item_dim, cand_dim, user_dim = args.item_dim, args.item_dim, args.item_dim
    max_len = max(args.lengths)

    def build(full: bool, recompute: bool, length: int) -> Longer:
        cfg = LongerConfig(
            item_dim=item_dim, candidate_dim=cand_dim, user_dim=user_dim, dim=args.dim,
            num_heads=args.heads, num_layers=args.layers, merge=1 if full else args.merge,
            merge_mode=args.merge_mode, recent_queries=length if full else args.recent,
            max_len=length, recompute=(recompute,) * args.layers,
        )  # fmt: skip
        return Longer(cfg).to(device)

    def inputs(batch: int, length: int):
        """Every user with `length` items: jagged items (batch * length, d_item), lengths, cand, user."""
        return (
            torch.randn(batch * length, item_dim, device=device),
            torch.full((batch,), length, device=device),
            torch.randn(batch, cand_dim, device=device),
            torch.randn(batch, user_dim, device=device),
        )

    rows = []
    for length in args.lengths:
        x = inputs(args.batch_size, length)
        for name, full in (("longer", False), ("full_attention", True)):
            row = {"length": length, "model": name}
            for recompute in (False, True):
                model = build(full, recompute, length).train()
                opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)

                def step() -> None:
                    model(*x).square().mean().backward()  # noqa: B023 - called inside this iteration
                    opt.step()  # noqa: B023
                    opt.zero_grad(set_to_none=True)  # noqa: B023

                mem = saved_activation_bytes(lambda: model(*x).square().mean())  # noqa: B023
                if not recompute:
                    sec = statistics.median(time_calls(step, device, args.steps, args.warmup))
                    row["fwd_mflop_per_sample"] = model.flops_per_sample(length) / 1e6
                    row["train_samples_per_s"] = args.batch_size / sec
                row["activation_mib_recompute" if recompute else "activation_mib"] = mem / 2**20
            rows.append(row)
            print(
                f"L={length:5d} {name:15s} {row['fwd_mflop_per_sample']:10.1f} MFLOP/sample "
                f"{row['train_samples_per_s']:9.1f} samples/s  activations {row['activation_mib']:8.1f} MiB "
                f"({row['activation_mib_recompute']:.1f} MiB with recomputation)",
                flush=True,
            )

    model = build(False, False, max_len).eval()
    serving = []
    for per_user in args.candidates:
        users = max(1, args.serving_candidates // per_user)
        items, lengths, _, user = inputs(users, max_len)
        n = users * per_user
        index = torch.arange(users, device=device).repeat_interleave(per_user)
        cand = torch.randn(n, cand_dim, device=device)

        def cached() -> torch.Tensor:
            return model.score_candidates(model.encode_user(items, lengths), index, cand, user)  # noqa: B023

        def uncached() -> torch.Tensor:
            with torch.no_grad():  # every candidate's row carries its user's whole sequence
                per_candidate = items.view(users, max_len, -1)[index].flatten(0, 1)  # noqa: B023
                return model(per_candidate, lengths[index], cand, user[index])  # noqa: B023

        timing = {}
        for mode, fn in (("cached", cached), ("uncached", uncached)):
            timing[mode] = n / statistics.median(time_calls(fn, device, args.steps, args.warmup))
        rates = {f"{k}_candidates_per_s": v for k, v in timing.items()}
        speedup = timing["cached"] / timing["uncached"]
        serving.append({"candidates_per_user": per_user, "users": users, **rates, "speedup": speedup})
        print(
            f"serving L={max_len} {per_user:4d} candidates/user: cached {timing['cached']:9.1f} "
            f"uncached {timing['uncached']:9.1f} candidates/s, speedup {serving[-1]['speedup']:.2f}x",
            flush=True,
        )
    result = {"device": str(device), "threads": torch.get_num_threads(), "config": vars(args).copy(),
              "cost": rows, "serving": serving}  # fmt: skip
    result["config"].pop("func", None)
    write_json(args.json, result)
    return result
