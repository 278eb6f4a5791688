"""DeepSeek-V4's fine-grained MoE (spec section 5; reference `Gate`, `Expert`, `MoE`).

- `Router`: scores s = sqrt(softplus(x W_g^T)) in fp32. Scored layers pick top-k of s + b, where the per-expert
  bias b only steers *selection* (aux-loss-free balancing, `noaux_tc`); hash layers take the experts from a
  frozen token-id table `tid2eid` instead. Either way the gate weights are the unbiased s at the chosen experts,
  normalised to sum 1, times `routed_scaling_factor`.
- `GroupedExperts`: SwiGLU experts in fp32 with V4's clamp: gate <= limit, -limit <= up <= limit.
- `MoE`: routed experts plus the shared expert(s).
- `update_expert_bias`: the bias rule after each step: b_i += gamma * sign(mean load - load_i).
- `sequence_balance_loss`: V3's small sequence-wise balance loss, kept in V4.

Experts are stored per layer as 3-D tensors [E, out, in]; with expert parallelism each rank holds E / ep of them
and `MoE._run_experts` sends every (token, expert) row to its expert's rank and back with all-to-alls.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dsv4.parallel.layers import LayerContext, divide, replicated_linear
from dsv4.parallel.mappings import all_to_all

from .config import ModelConfig


def sqrt_softplus(logits: torch.Tensor) -> torch.Tensor:
    """V4's router activation, replacing V3's sigmoid."""
    return F.softplus(logits.float()).sqrt()


def make_tid2eid(vocab_size: int, n_experts: int, top_k: int, seed: int) -> torch.Tensor:
    """The frozen token -> experts table of a hash layer: k distinct experts per token, expert loads balanced.

    DeepSeek's hash function is not published (spec: NOT FOUND). Ours deals a stream of seeded random
    permutations of the E experts to the tokens, k at a time: every permutation holds each expert once, so loads
    differ by at most 1; a token whose k experts straddle two permutations gets the second one's experts it does
    not hold yet first, so its k experts are distinct (k <= E); and the random permutations make the expert sets
    of different tokens diverse.
    """
    g = torch.Generator().manual_seed(seed)
    needed = vocab_size * top_k
    stream, dealt = [], 0
    while dealt < needed:
        perm = torch.randperm(n_experts, generator=g)
        held = dealt % top_k  # experts the token being filled already holds (the end of the last permutation)
        if held:
            clash = torch.isin(perm, stream[-1][-held:])
            perm = torch.cat([perm[~clash], perm[clash]])
        stream.append(perm)
        dealt += n_experts
    return torch.cat(stream)[:needed].view(vocab_size, top_k).clone()


class Router(nn.Module):
    """Top-k expert selection and gate weights for one MoE layer (hash-routed or scored)."""

    def __init__(self, cfg: ModelConfig, ctx: LayerContext, layer: int):
        super().__init__()
        self.top_k = cfg.n_activated_experts
        self.n_experts = cfg.n_routed_experts
        self.scaling = cfg.routed_scaling_factor
        self.is_hash = layer < cfg.num_hash_layers
        self.weight = replicated_linear(ctx, cfg.hidden_size, cfg.n_routed_experts, dtype=torch.float32).weight
        if self.is_hash:
            self.register_buffer("tid2eid", make_tid2eid(cfg.vocab_size, cfg.n_routed_experts,
                                                         cfg.n_activated_experts, cfg.hash_seed + layer))
        else:
            # Selection-only bias of aux-loss-free balancing, and the token counts its update rule reads.
            self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
            self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts, dtype=torch.float32),
                                 persistent=False)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None):
        """x [N, d], token_ids [N] -> (scores [N, E], weights [N, k], indices [N, k])."""
        scores = sqrt_softplus(F.linear(x.float(), self.weight))  # [N, E]
        if self.is_hash:
            if token_ids is None:
                raise ValueError("hash-routed MoE layers need the token ids")
            indices = self.tid2eid[token_ids]
        else:
            indices = torch.topk(scores.detach() + self.bias, self.top_k, dim=-1).indices
            if self.training:
                self.tokens_per_expert += torch.bincount(indices.flatten(), minlength=self.n_experts).float()
        weights = scores.gather(1, indices)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * self.scaling
        return scores, weights, indices


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(gate, limit)) * clamp(up, -limit, limit) (V4's SwiGLU clamp; limit 0 disables it)."""
    if limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


class GroupedExperts(nn.Module):
    """The routed SwiGLU experts this rank holds: y = w2 (swiglu(w1 x, w3 x)), in fp32 as in the reference.

    With expert parallelism over `ctx.ep_group` this rank holds experts [r E/ep, (r+1) E/ep). Weights are drawn as
    the full [E, ...] tensors and sliced, so a model is the same for every expert-parallel size.
    """

    def __init__(self, cfg: ModelConfig, ctx: LayerContext):
        super().__init__()
        d, inter, std = cfg.hidden_size, cfg.moe_intermediate_size, cfg.init_std
        self.limit = cfg.swiglu_limit
        self.n_local = divide(cfg.n_routed_experts, ctx.ep_size, "model.n_routed_experts / expert parallel size")
        mine = slice(ctx.ep_rank * self.n_local, (ctx.ep_rank + 1) * self.n_local)
        self.w1 = nn.Parameter((torch.randn(cfg.n_routed_experts, inter, d) * std)[mine].clone())  # gate
        self.w3 = nn.Parameter((torch.randn(cfg.n_routed_experts, inter, d) * std)[mine].clone())  # up
        self.w2 = nn.Parameter((torch.randn(cfg.n_routed_experts, d, inter) * std)[mine].clone())  # down
        for p in (self.w1, self.w3, self.w2):
            p.allreduce = False  # megatron's marker: reduced over the expert-data-parallel group only

    def forward(self, rows: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """rows [R, d] (one per token and chosen expert), expert [R] local expert ids -> expert outputs [R, d] fp32."""
        order = torch.argsort(expert, stable=True)
        counts = torch.bincount(expert, minlength=self.n_local).tolist()
        outs = []
        for e, x in enumerate(rows[order].float().split(counts)):  # contiguous rows per expert
            h = swiglu(x @ self.w1[e].float().t(), x @ self.w3[e].float().t(), self.limit)
            outs.append(h @ self.w2[e].float().t())
        return torch.cat(outs)[torch.argsort(order)]


class SharedExpert(nn.Module):
    """The always-active expert(s), width n_shared * moe_intermediate_size.

    `transformers` clamps the shared expert like the routed ones; DeepSeek's inference code builds it without
    `swiglu_limit`. We follow transformers, the parity target.
    """

    def __init__(self, cfg: ModelConfig, ctx: LayerContext):
        super().__init__()
        inter = cfg.n_shared_experts * cfg.moe_intermediate_size
        self.limit = cfg.swiglu_limit
        self.w1 = replicated_linear(ctx, cfg.hidden_size, inter)
        self.w3 = replicated_linear(ctx, cfg.hidden_size, inter)
        self.w2 = replicated_linear(ctx, inter, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x), self.limit))


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, n_experts: int, top_k: int,
                          batch: int) -> torch.Tensor:
    """V3's sequence-wise balance loss, sum_i f_i P_i averaged over sequences (alpha applied by the caller).

    Per sequence of T tokens: f_i = E / (k T) * #tokens routed to expert i; P_i = mean over tokens of the
    normalised score s_i / sum_j s_j. scores [N, E] and indices [N, k] with N = T * batch, token-major by sequence
    position (rows of sequence b are b, b + batch, ... in the [s, b] layout).
    """
    n = scores.shape[0]
    seq = n // batch
    probs = (scores / scores.sum(-1, keepdim=True)).view(seq, batch, n_experts)
    chosen = torch.zeros_like(scores).scatter_(1, indices, 1.0)  # [N, E]
    sequence = torch.arange(n, device=scores.device) % batch
    counts = torch.zeros(batch, n_experts, device=scores.device).index_add_(0, sequence, chosen)
    f = counts * n_experts / (top_k * seq)  # [batch, E]
    p = probs.mean(0)  # [batch, E]
    return (f * p).sum(-1).mean()


class MoE(nn.Module):
    """Routed experts + shared expert for block `layer`."""

    def __init__(self, cfg: ModelConfig, ctx: LayerContext, layer: int):
        super().__init__()
        self.ep_group, self.ep_size = ctx.ep_group, ctx.ep_size
        self.gate = Router(cfg, ctx, layer)
        self.experts = GroupedExperts(cfg, ctx)
        self.shared_experts = SharedExpert(cfg, ctx) if cfg.n_shared_experts > 0 else None
        self.seq_aux_loss_coef = cfg.seq_aux_loss_coef

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor, aux: dict | None = None) -> torch.Tensor:
        """x [s, b, d], token_ids [s, b] -> [s, b, d]; adds the sequence balance loss to aux['balance']."""
        s, b, d = x.shape
        flat = x.reshape(-1, d)
        scores, weights, indices = self.gate(flat, token_ids.reshape(-1))
        k = indices.shape[1]
        rows = flat.repeat_interleave(k, dim=0)  # [N k, d]: token t's copy for its j-th expert at t k + j
        expert_out = self._run_experts(rows, indices.flatten())  # [N k, d]
        out = (expert_out.view(-1, k, d) * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        if self.training and aux is not None and not self.gate.is_hash and self.seq_aux_loss_coef > 0:
            aux.setdefault("balance", []).append(self.seq_aux_loss_coef * sequence_balance_loss(
                scores, indices, self.gate.n_experts, self.gate.top_k, b))
        return out.view(s, b, d)


    def _run_experts(self, rows: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """Each row through its expert. With expert parallelism the rows travel to the rank holding their expert
        and back (all-to-all over the expert-parallel group, differentiable both ways)."""
        if self.ep_size == 1:
            return self.experts(rows, expert)
        n_local = self.experts.n_local
        dest = expert // n_local  # owning rank of each row
        order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=self.ep_size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.ep_group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        recv_expert = all_to_all(expert[order] % n_local, recv, send, self.ep_group)  # local ids at the owner
        done = self.experts(all_to_all(rows[order], recv, send, self.ep_group), recv_expert)
        return all_to_all(done, send, recv, self.ep_group)[torch.argsort(order)]


@torch.no_grad()
def update_expert_bias(model: nn.Module, rate: float, group: dist.ProcessGroup | None = None) -> None:
    """Aux-loss-free balancing (spec section 5): after each optimizer step, for every scored router,
    b_i += rate * sign(mean_j load_j - load_i) and the counts restart. `group`: the data-parallel group whose
    counts are summed first, so every replica applies the same update."""
    for router in (m for m in model.modules() if isinstance(m, Router) and not m.is_hash):
        load = router.tokens_per_expert
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(load, group=group)
        router.bias += rate * torch.sign(load.mean() - load)
        load.zero_()
