"""Sparse-MoE per-token FFN for RankMixer (Zhu et al., CIKM'25, section 3.4, eq. 10-11), pure torch.

Token t has N_e experts e_{t,j}: D -> k_e D -> D GELU MLPs, mixed by non-negative gates G:
v_t = sum_j G_{t,j} e_{t,j}(s_t) (eq. 10). Drop-in for `PerTokenFFN`: (T, B, D) -> (T, B, D).

Design choices:
1. Stacked expert weights (T, N_e, D, k_e D) and (T, N_e, k_e D, D), viewed as T * N_e "slots". Training
   computes every slot for every sample (dense training) in ONE baddbmm per layer over (T * N_e) batches.
2. Routers are per-token linears D -> N_e, stacked (T, D, N_e): one baddbmm per router for all tokens.
   `router_*` is h_infer (the only router used at inference, in every mode); `train_router_*` is h_train
   (relu_dtsi only).
3. relu_dtsi (paper): G = ReLU(h(s)) for both routers; L_reg (eq. 11) = sum over tokens and experts of
   G_infer, averaged over the samples of the batch (eq. 11 per sample), so lambda is in loss units per unit
   of gate mass and does not depend on the batch size. aux_loss() = lambda * L_reg; it reaches h_infer only.
4. How h_infer gets the task gradient (the paper leaves it open; `dtsi_mix`):
   - "convex" (default): v = sum_j (G_train_j + G_infer_j) / 2 e_j. Both routers are in the forward with
     exact gradients, so h_infer gets the true task gradient at its own gates (public code that feeds it
     only the L1 gradient collapses it to zero) and h_train, which L_reg never touches, keeps the experts
     that h_infer switches off trained (dense training). Serving uses h_infer alone, v = sum_j G_infer_j
     e_j. The train/serve gap this leaves, and how ReLU routing compares with top-k softmax routing, are
     measured in reports/moe.md (figure 3 grid).
   - "infer_value": v = sum_j G_infer_j e_j + ST(sum_j G_train_j e_j), ST(z) = z - z.detach(): the forward
     value is exactly the serving computation (no gap), but an expert's gradient is weighted by
     G_infer + G_train while its output only counts through G_infer -- a biased gradient; nothing bounds
     h_train's scale, and at the paper's lr 0.01 the training loss rises (valid AUC 0.70 vs 0.72 for convex
     at step 400, reports/moe.md). Kept for comparison.
   - "train_value": v = sum_j (G_train_j + ST(G_infer_j)) e_j: forward = the dense router; h_infer gets
     h_train's task gradient, but nothing fits h_infer's gate magnitudes, so serving sees another scale.
5. Steering the active ratio toward `active_ratio`, two controllers, both per training step, both on
   statistics averaged over ranks (one all_reduce of the (T, N_e) slot frequencies per block: TorchRec's
   DDP does not broadcast buffers, and ranks must not drift apart), both in persistent buffers
   (checkpointed), neither updated in eval:
   - adaptive lambda (ReMoE, the paper's L_reg): lambda *= exp(lambda_lr * sign(active - target)). L1 can
     only push gates *down*.
   - activation bias (why: measured): on real data the task gradient itself switches ReLU gates off in the
     first ~200 steps (randomly initialised experts add noise, and under RMSProp every router step is
     full size), so the ratio falls under the target and lambda has nothing to steer. A bias c (T, 1, N_e)
     added to h_infer's logits moves each slot toward the target in both directions,
     c += bias_lr * sign(target - slot frequency) (as in DeepSeek-V3's auxiliary-loss-free balancing);
     being per slot, it also revives dead experts. It is not a parameter: no gradient, no optimizer.
   Router parameters also get a smaller lr (`moe.router_lr_scale` of the arch's config, through the dense
   arch's `lr_scales()`).
6. Baselines behind the same switch: "topk" (softmax over the k largest logits, k = round(N_e * ratio)
   unless top_k is set; unselected experts get gate 0, all experts still computed in training) and
   "topk_balanced" (+ Switch load-balancing loss N_e * sum_j f_j P_j per token, averaged over tokens).
7. Sparse inference (eval + sparse_inference=True) computes only active (slot, sample) pairs: pairs are
   grouped by slot (nonzero on the slot-major mask is already slot-sorted), slots are binned by their
   active-row count into at most `num_buckets` capacity classes, and each class is one padded gathered
   baddbmm per layer (+ index_add_ of gated outputs). The Python loop is over capacity classes, never over
   tokens or experts: CPU torch has no fast grouped GEMM (F.grouped_mm on CPU is a slow fallback, about 20x
   a bmm, and FlopCounterMode does not count it). Padding waste per active slot < max_count / num_buckets.
8. The training forward is fx-traceable: Python branches only on module flags (self.training, the router
   kind), never on tensor values; stats are written to buffers with copy_, not read with .item().
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.choice import Choice
from models.collectives import mean_over_ranks
from models.moe_sparse import sparse_ffn


class Router(Choice):
    relu_dtsi = "relu_dtsi"  # the paper: ReLU gates, dense-train / sparse-infer routers (DTSI)
    topk = "topk"  # baseline: softmax over the k largest logits
    topk_balanced = "topk_balanced"  # baseline: topk + Switch load-balancing loss


class DTSIMix(Choice):
    """How h_infer gets the task gradient under relu_dtsi (design choice 4)."""

    convex = "convex"
    infer_value = "infer_value"
    train_value = "train_value"


ROUTERS = tuple(Router)
DTSI_MIXES = tuple(DTSIMix)
# SparseMoEFFN's router parameters: h_infer (router_*) and h_train (train_router_*, relu_dtsi only)
ROUTER_PARAMS = ("router_w", "router_b", "train_router_w", "train_router_b")
ACTIVE_RATIO = "moe/active_ratio"  # the metric key of the measured fraction of active experts


@dataclass
class MoEConfig:
    """The Sparse-MoE FFN of a dense arch (`model.dense.moe.*`, used with `model.dense.ffn=smoe`): per token
    `num_experts` experts, each D -> expert_mult * D -> D."""

    num_experts: int = 4
    expert_mult: float = 1.0  # k_e; k_e * D must be an integer
    router: Router = Router.relu_dtsi
    top_k: int = 0  # top-k baselines; 0 means round(num_experts * active_ratio)
    active_ratio: float = 0.5  # target fraction of active experts (figure 3: 1, 1/2, 1/4, 1/8)
    lambda_init: float = 1e-3  # initial L_reg coefficient (adapted every training step)
    lambda_lr: float = 0.1  # lambda *= exp(lr * sign(active - target)) per training step
    bias_lr: float = 0.05  # h_infer's per-slot bias += lr * sign(target - slot frequency) per step
    balance_coef: float = 0.01  # Switch load-balancing loss weight (topk_balanced)
    dtsi_mix: DTSIMix = DTSIMix.convex  # how h_infer gets the task gradient (design choice 4)
    # lr multiplier of the routers (DenseArch.lr_scales). ReLU gates die under full-size RMSProp steps at
    # lr 0.01 (reports/moe.md): routers step 10x smaller by default.
    router_lr_scale: float = 0.1

    def __post_init__(self) -> None:
        self.router = Router.parse(self.router, "moe.router")
        self.dtsi_mix = DTSIMix.parse(self.dtsi_mix, "moe.dtsi_mix")
        if not 0.0 < self.active_ratio <= 1.0:
            raise ValueError(f"moe.active_ratio must be in (0, 1], got {self.active_ratio}")
        if not 1 <= self.k <= self.num_experts:
            raise ValueError(f"moe top-k {self.k} not in [1, {self.num_experts}]")

    def expert_hidden(self, dim: int) -> int:
        return round(self.expert_mult * dim)

    @property
    def k(self) -> int:
        """k of the top-k routers."""
        return top_k_for(self.num_experts, self.active_ratio, self.top_k)

    @property
    def expected_active_ratio(self) -> float:
        """Fraction of experts active per (token, sample) at the target: k / N_e for top-k routers."""
        return self.active_ratio if self.router == Router.relu_dtsi else self.k / self.num_experts


def _straight_through(z: torch.Tensor) -> torch.Tensor:
    """Zero in value, identity in gradient."""
    return z - z.detach()


def top_k_for(num_experts: int, active_ratio: float, top_k: int = 0) -> int:
    """k of the top-k baselines: `top_k` if set, else round(N_e * ratio), at least 1."""
    return top_k or max(1, round(num_experts * active_ratio))


class SparseMoEFFN(nn.Module):
    """Eq. 10-11: per token N_e GELU experts D -> k_e D -> D mixed by router gates. (T, B, D) -> (T, B, D)."""

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        num_experts: int,
        expert_hidden: int,
        router: str = "relu_dtsi",
        active_ratio: float = 0.5,
        top_k: int = 0,
        lambda_init: float = 1e-3,
        lambda_lr: float = 0.1,
        bias_lr: float = 0.05,
        balance_coef: float = 0.01,
        dtsi_mix: str = "convex",
        dropout: float = 0.0,
        num_layers: int = 1,
        num_buckets: int = 8,
    ) -> None:
        super().__init__()
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
        if dtsi_mix not in DTSI_MIXES:
            raise ValueError(f"dtsi_mix must be one of {DTSI_MIXES}, got {dtsi_mix!r}")
        if not 0.0 < active_ratio <= 1.0:
            raise ValueError(f"active_ratio must be in (0, 1], got {active_ratio}")
        T, E, H = num_tokens, num_experts, expert_hidden
        self.num_tokens, self.dim, self.num_experts, self.expert_hidden = T, dim, E, H
        self.router_kind = router
        self.dtsi_mix = dtsi_mix
        self.active_ratio = active_ratio
        self.top_k = top_k_for(E, active_ratio, top_k)
        if not 1 <= self.top_k <= E:
            raise ValueError(f"top_k={self.top_k} must be in [1, {E}]")
        self.lambda_lr = lambda_lr
        self.bias_lr = bias_lr
        self.balance_coef = balance_coef
        self.num_buckets = num_buckets
        self.sparse_inference = True  # eval-mode switch: skip inactive experts (False = dense reference)
        self.inference_top_k: int | None = None  # benchmark override: force exactly k active experts

        self.w1 = nn.Parameter(torch.empty(T, E, dim, H))  # (T, N_e, D, k_e D)
        self.b1 = nn.Parameter(torch.zeros(T, E, 1, H))  # (T, N_e, 1, k_e D)
        self.w2 = nn.Parameter(torch.empty(T, E, H, dim))  # (T, N_e, k_e D, D)
        self.b2 = nn.Parameter(torch.zeros(T, E, 1, dim))  # (T, N_e, 1, D)
        nn.init.normal_(self.w1, std=1.0 / math.sqrt(dim))
        nn.init.normal_(self.w2, std=1.0 / math.sqrt(H) / math.sqrt(2 * num_layers))
        # ReLU gates of N(0, s^2) logits have E[G^2] = s^2 / 2: s^2 = 2 / N_e keeps sum_j G_j^2 ~ 1, so v has
        # the scale of one expert output. Top-k softmax gates sum to 1 whatever the scale.
        router_std = math.sqrt(2.0 / E) / math.sqrt(dim)
        self.router_w = nn.Parameter(torch.randn(T, dim, E) * router_std)  # (T, D, N_e): h_infer
        self.router_b = nn.Parameter(torch.zeros(T, 1, E))  # (T, 1, N_e)
        if router == "relu_dtsi":
            self.train_router_w = nn.Parameter(torch.randn(T, dim, E) * router_std)  # (T, D, N_e): h_train
            self.train_router_b = nn.Parameter(torch.zeros(T, 1, E))  # (T, 1, N_e)
        self.dropout = nn.Dropout(dropout)

        self.register_buffer("lambda_", torch.tensor(float(lambda_init)))  # persistent: checkpointed
        self.register_buffer("gate_bias", torch.zeros(T, 1, E))  # (T, 1, N_e) h_infer's controller bias
        self.register_buffer("last_active_ratio", torch.zeros(()), persistent=False)
        self.register_buffer("last_slot_active_freq", torch.zeros(T, E), persistent=False)  # (T, N_e)
        self.register_buffer("last_gate_mean", torch.zeros(2), persistent=False)  # h_infer, h_train
        self._aux_loss: torch.Tensor | None = None
        self.last_sparse_rows = 0  # rows (slot, sample) computed by the last sparse forward, padding included
        self.last_active_pairs = 0  # active (slot, sample) pairs of the last sparse forward

    # ---- routing ---------------------------------------------------------------------------------

    def router_logits(self, x: torch.Tensor, train_router: bool = False) -> torch.Tensor:
        if train_router:
            return torch.baddbmm(self.train_router_b, x, self.train_router_w)  # (T, B, N_e)
        bias = self.router_b + self.gate_bias  # (T, 1, N_e): learnt + controller (0 for top-k)
        return torch.baddbmm(bias, x, self.router_w)  # (T, B, D) @ (T, D, N_e) -> (T, B, N_e)

    def _top_k_gates(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        top_logits, top_idx = logits.topk(k, dim=-1)  # (T, B, k)
        gates = torch.zeros_like(logits).scatter(-1, top_idx, torch.softmax(top_logits, dim=-1))
        active = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, top_idx, True)
        return gates, active  # (T, B, N_e) each

    def inference_gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gates of h_infer and the mask of experts to compute, both (T, B, N_e)."""
        logits = self.router_logits(x)  # (T, B, N_e)
        if self.inference_top_k is not None:  # benchmark: exactly k active, ReLU gate values
            _, active = self._top_k_gates(logits, self.inference_top_k)
            return F.relu(logits) * active, active
        if self.router_kind == "relu_dtsi":
            gates = F.relu(logits)
            return gates, gates > 0
        return self._top_k_gates(logits, self.top_k)

    # ---- forward ---------------------------------------------------------------------------------

    def all_experts(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every sample: (T, B, D) -> (T, N_e, B, D), one baddbmm per layer."""
        T, E, H, D = self.num_tokens, self.num_experts, self.expert_hidden, self.dim
        batch = x.shape[1]
        x_slots = x.unsqueeze(1).expand(-1, E, -1, -1).reshape(T * E, batch, D)  # (T*N_e, B, D)
        h = torch.baddbmm(self.b1.view(T * E, 1, H), x_slots, self.w1.view(T * E, D, H))  # (T*N_e, B, k_eD)
        h = self.dropout(F.gelu(h))
        y = torch.baddbmm(self.b2.view(T * E, 1, D), h, self.w2.view(T * E, H, D))  # (T*N_e, B, D)
        return self.dropout(y).view(T, E, batch, D)  # (T, N_e, B, D)

    @staticmethod
    def mix(gates: torch.Tensor, expert_out: torch.Tensor) -> torch.Tensor:
        """v_t = sum_j G_{t,j} e_{t,j}: (T, B, N_e) x (T, N_e, B, D) -> (T, B, D)."""
        return torch.einsum("tbe,tebd->tbd", gates, expert_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            gates, active = self.inference_gates(x)  # (T, B, N_e)
            self._record_activity(active)
            if self.sparse_inference:
                return self.sparse_forward(x, gates, active)
            return self.mix(gates, self.all_experts(x))  # dense reference with the same gates
        if self.router_kind == "relu_dtsi":
            return self._train_relu_dtsi(x)
        return self._train_top_k(x)

    def _train_relu_dtsi(self, x: torch.Tensor) -> torch.Tensor:
        gates_infer = F.relu(self.router_logits(x))  # (T, B, N_e): h_infer
        gates_train = F.relu(self.router_logits(x, train_router=True))  # (T, B, N_e): h_train
        expert_out = self.all_experts(x)  # (T, N_e, B, D): dense training
        if self.dtsi_mix == "infer_value":
            v = self.mix(gates_infer, expert_out) + _straight_through(self.mix(gates_train, expert_out))
        elif self.dtsi_mix == "train_value":
            v = self.mix(gates_train + _straight_through(gates_infer), expert_out)
        else:  # convex
            v = self.mix(0.5 * (gates_train + gates_infer), expert_out)
        batch = x.shape[1]
        l_reg = gates_infer.sum() / batch  # eq. 11 per sample: sum over tokens and experts, mean over B
        self._aux_loss = self.lambda_.clone() * l_reg  # clone: lambda_ is updated in place below
        self._record_activity(gates_infer > 0)
        with torch.no_grad():
            self.last_gate_mean.copy_(torch.stack([gates_infer.mean(), gates_train.mean()]))
            slot_freq = mean_over_ranks(self.last_slot_active_freq)  # (T, N_e), global batch
            # adaptive lambda (ReMoE): multiplicative step toward the target ratio
            step = torch.exp(self.lambda_lr * torch.sign(slot_freq.mean() - self.active_ratio))
            self.lambda_.mul_(step).clamp_(1e-12, 1e6)
            # activation bias: each slot's frequency steps toward the target, in both directions
            self.gate_bias.add_(self.bias_lr * torch.sign(self.active_ratio - slot_freq).unsqueeze(1))
        return v  # (T, B, D)

    def _train_top_k(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router_logits(x)  # (T, B, N_e)
        gates, active = self._top_k_gates(logits, self.top_k)  # (T, B, N_e)
        self._record_activity(active)
        if self.router_kind == "topk_balanced":
            routed_frac = active.to(logits.dtype).mean(dim=1) / self.top_k  # (T, N_e): f_j, sums to 1
            mean_prob = torch.softmax(logits, dim=-1).mean(dim=1)  # (T, N_e): P_j
            balance = self.num_experts * (routed_frac * mean_prob).sum(-1).mean()  # 1 when uniform
            self._aux_loss = self.balance_coef * balance
        return self.mix(gates, self.all_experts(x))  # (T, B, D)

    def _record_activity(self, active: torch.Tensor) -> torch.Tensor:
        """Writes the activity stats of this forward to buffers; returns the active ratio (0-dim tensor)."""
        with torch.no_grad():
            slot_freq = active.float().mean(dim=1)  # (T, N_e): fraction of samples using each slot
            ratio = slot_freq.mean()
            self.last_slot_active_freq.copy_(slot_freq)
            self.last_active_ratio.copy_(ratio)
        return ratio

    # ---- sparse inference ------------------------------------------------------------------------

    def sparse_forward(self, x: torch.Tensor, gates: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Eq. 10 over the active (slot, sample) pairs only. x (T, B, D), gates/active (T, B, N_e)."""
        if torch.compiler.is_exporting():  # one opaque op in the exported graph (see sparse_moe_ffn)
            return torch.ops.rankmixer.sparse_moe_ffn(
                x, gates, active, self.w1, self.b1, self.w2, self.b2, self.num_buckets
            )
        out, self.last_active_pairs, self.last_sparse_rows = sparse_ffn(
            x, gates, active, self.w1, self.b1, self.w2, self.b2, self.num_buckets
        )
        return out

    # ---- for the pipeline ------------------------------------------------------------------------

    def aux_loss(self) -> torch.Tensor | None:
        """relu_dtsi: lambda * L_reg of the last training forward (reaches h_infer only); topk_balanced:
        balance_coef * Switch balance loss; topk: None."""
        return self._aux_loss

    def stats(self) -> dict[str, float]:
        """Activity of the last forward (train or eval). Slot = (token, expert)."""
        freq = self.last_slot_active_freq  # (T, N_e)
        token_ratio = freq.mean(dim=1)  # (T,)
        stats = {
            "active_ratio": self.last_active_ratio.item(),
            "expert_freq_min": freq.min().item(),
            "expert_freq_max": freq.max().item(),
            "dead_expert_frac": (freq == 0).float().mean().item(),  # slots no sample used
            "token_active_min": token_ratio.min().item(),
            "token_active_max": token_ratio.max().item(),
        }
        if self.router_kind == "relu_dtsi":
            stats["lambda"] = self.lambda_.item()
            infer_gate, train_gate = self.last_gate_mean.tolist()  # of the last training forward
            stats["infer_gate_mean"], stats["train_gate_mean"] = infer_gate, train_gate
            stats["gate_bias_mean"] = self.gate_bias.mean().item()  # the activation-bias controller
        return stats


# ---- the FFNs of an arch's blocks, seen as one: what a dense arch's DenseArch hooks report ------------


def moe_aux_loss(ffns: list[SparseMoEFFN]) -> torch.Tensor | None:
    """Sum over blocks of the auxiliary losses of the last training forward (lambda * L_reg or the balance
    loss); None when there is none (plain top-k)."""
    losses = [loss for loss in (ffn.aux_loss() for ffn in ffns) if loss is not None]
    return torch.stack(losses).sum() if losses else None


def moe_stats(ffns: list[SparseMoEFFN]) -> dict[str, float]:
    """Per block stats ("moe/block{i}/{name}") of the last forward, plus their block mean (ACTIVE_RATIO)."""
    stats: dict[str, float] = {}
    per_block = [ffn.stats() for ffn in ffns]
    for i, block_stats in enumerate(per_block):
        stats.update({f"moe/block{i}/{k}": v for k, v in block_stats.items()})
    if per_block:
        stats[ACTIVE_RATIO] = sum(s["active_ratio"] for s in per_block) / len(per_block)
    return stats


def moe_stats_summary(stats: dict[str, float]) -> str:
    """The log line of `moe_stats`: active ratio and every block's lambda."""
    if ACTIVE_RATIO not in stats:
        return ""
    lambdas = " ".join(f"{k[4:]} {v:.3g}" for k, v in stats.items() if k.endswith("/lambda"))
    return f"moe: active ratio {stats[ACTIVE_RATIO]:.3f}" + (f", {lambdas}" if lambdas else "")


def moe_eval_stats(ffns: list[SparseMoEFFN]) -> dict[str, float]:
    """The measured fraction of active experts of the last (eval) forward, block mean."""
    if not ffns:
        return {}
    return {ACTIVE_RATIO: sum(ffn.last_active_ratio.item() for ffn in ffns) / len(ffns)}


def router_lr_scales(module: nn.Module, scale: float) -> dict[str, float]:
    """{name: scale} of the router parameters (ROUTER_PARAMS) of every SparseMoEFFN inside `module`."""
    return {name: scale for name, _ in module.named_parameters() if name.rsplit(".", 1)[-1] in ROUTER_PARAMS}


def set_sparse_inference(ffns: list[SparseMoEFFN], sparse: bool) -> None:
    """Eval-mode forwards skip inactive experts (True, serving) or compute all of them with the same gates
    (False, the dense reference)."""
    for ffn in ffns:
        ffn.sparse_inference = sparse
