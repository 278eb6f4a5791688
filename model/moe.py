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
and `MoE._run_experts` sends every (token, expert) row to its expert's rank and back with all-to-alls. With
expert-tensor parallelism (etp) each expert's intermediate dimension is further split over the etp group: the rows
that reached an expert's rank are gathered over that group, and the partial outputs reduce-scattered back.

Tensor parallelism: the layer works on this rank's own tokens: its part of the sequence under sequence
parallelism, and without it the same part cut from the replicated input (joined again at the end). So the router
(replicated) runs once per token, sequence statistics (balance loss, expert loads) are summed over the group, and
the shared expert is split over the tensor-parallel group like a megatron MLP (all-gather in, reduce-scatter out).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dsv4.parallel.fp8 import fp8_linear
from dsv4.parallel.layers import ColumnLinear, LayerContext, RowLinear, divide, replicated_linear, sum_grads_over_tp
from dsv4.parallel.mappings import (all_to_all, gather_rows, join_sequence, reduce_scatter_rows, split_sequence,
                                    sum_values_over)

from .config import ModelConfig
from .quant import fp4_e2m1_qdq, straight_through
from .recompute import replaying


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
            if self.training and not replaying():  # a recomputed block's replay must not count twice
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

    With expert parallelism over `ctx.ep_group` this rank holds experts [r E/ep, (r+1) E/ep); with expert-tensor
    parallelism over `ctx.etp_group` it holds rows (w1, w3) or columns (w2) [j I/etp, (j+1) I/etp) of their
    intermediate dimension, and its outputs are partial sums over the etp group. Weights are drawn as the full
    [E, ...] tensors and sliced, so a model is the same for every layout.
    """

    def __init__(self, cfg: ModelConfig, ctx: LayerContext):
        super().__init__()
        d, inter, std = cfg.hidden_size, cfg.moe_intermediate_size, cfg.init_std
        self.limit = cfg.swiglu_limit
        self.fp8 = ctx.fp8_for("experts")
        self.fp4_block = cfg.quant_fp4_block if cfg.quant_sim_experts else 0
        self.n_local = divide(cfg.n_routed_experts, ctx.ep_size, "model.n_routed_experts / expert parallel size")
        mine = slice(ctx.ep_rank * self.n_local, (ctx.ep_rank + 1) * self.n_local)
        part = divide(inter, ctx.etp_size, "model.moe_intermediate_size / expert tensor parallel size")
        cut = slice(ctx.etp_rank * part, (ctx.etp_rank + 1) * part)
        self.w1 = nn.Parameter((torch.randn(cfg.n_routed_experts, inter, d) * std)[mine, cut].clone())  # gate
        self.w3 = nn.Parameter((torch.randn(cfg.n_routed_experts, inter, d) * std)[mine, cut].clone())  # up
        self.w2 = nn.Parameter((torch.randn(cfg.n_routed_experts, d, inter) * std)[mine, :, cut].clone())  # down
        for p, dim in ((self.w1, 1), (self.w3, 1), (self.w2, 2)):
            p.allreduce = False  # megatron's marker: reduced over the expert-data-parallel group only
            # Split over etp (even of size 1, as megatron marks its expert weights): never a tensor-parallel
            # duplicate, so every rank counts its experts in the gradient norm.
            p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, 1

    def forward(self, rows: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """rows [R, d] (one per token and chosen expert), expert [R] local expert ids -> expert outputs [R, d] fp32."""
        order = torch.argsort(expert, stable=True)
        counts = torch.bincount(expert, minlength=self.n_local).tolist()
        outs = []
        for e, x in enumerate(rows[order].float().split(counts)):  # contiguous rows per expert
            h = swiglu(self._mm(x, self.w1[e]), self._mm(x, self.w3[e]), self.limit)
            outs.append(self._mm(h, self.w2[e]))
        return torch.cat(outs)[torch.argsort(order)]

    def _mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x w^T in fp32, or with FP8 GEMMs (precision.fp8_modules has experts); with model.quant_sim_experts the
        weight is FP4-rounded first (straight-through: its gradient reaches the master weight unchanged)."""
        w = w.float()
        if self.fp4_block:
            w = straight_through(w, lambda t: fp4_e2m1_qdq(t, self.fp4_block))
        return x @ w.t() if self.fp8 is None else fp8_linear(x, w, self.fp8)


class SharedExpert(nn.Module):
    """The always-active expert(s), width n_shared * moe_intermediate_size.

    `transformers` clamps the shared expert like the routed ones; DeepSeek's inference code builds it without
    `swiglu_limit`. We follow transformers, the parity target.

    Split over the tensor-parallel group like a megatron MLP: w1, w3 column-parallel, w2 row-parallel. Its input
    is this rank's part of the sequence (`ctx` has sequence parallelism on): gathered in, reduce-scattered out.
    """

    def __init__(self, cfg: ModelConfig, ctx: LayerContext):
        super().__init__()
        inter = cfg.n_shared_experts * cfg.moe_intermediate_size
        self.limit = cfg.swiglu_limit
        self.w1 = ColumnLinear(ctx, cfg.hidden_size, inter, fp8_module="experts")
        self.w3 = ColumnLinear(ctx, cfg.hidden_size, inter, fp8_module="experts")
        self.w2 = RowLinear(ctx, inter, cfg.hidden_size, fp8_module="experts")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [s / tp, b, d] -> [s / tp, b, d]."""
        return self.w2(swiglu(self.w1(x), self.w3(x), self.limit))


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, n_experts: int, top_k: int,
                          batch: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """V3's sequence-wise balance loss, sum_i f_i P_i averaged over sequences (alpha applied by the caller).

    Per sequence of T tokens: f_i = E / (k T) * #tokens routed to expert i; P_i = mean over tokens of the
    normalised score s_i / sum_j s_j. scores [N, E] and indices [N, k] with N = T * batch, token-major by sequence
    position (rows of sequence b are b, b + batch, ... in the [s, b] layout). With `group` (sequence parallelism)
    the rows are this rank's part of every sequence and the per-sequence sums are summed over the group.
    """
    n = scores.shape[0]
    seq = n // batch
    probs = (scores / scores.sum(-1, keepdim=True)).view(seq, batch, n_experts)
    chosen = torch.zeros_like(scores).scatter_(1, indices, 1.0)  # [N, E]
    sequence = torch.arange(n, device=scores.device) % batch
    counts = torch.zeros(batch, n_experts, device=scores.device).index_add_(0, sequence, chosen)
    prob_sums = probs.sum(0)  # [batch, E]
    if group is not None and dist.get_world_size(group) > 1:
        counts = sum_values_over(counts, group)
        prob_sums = sum_values_over(prob_sums, group)
        seq *= dist.get_world_size(group)
    f = counts * n_experts / (top_k * seq)  # [batch, E]
    p = prob_sums / seq  # [batch, E]
    return (f * p).sum(-1).mean()


class MoE(nn.Module):
    """Routed experts + shared expert for block `layer`."""

    def __init__(self, cfg: ModelConfig, ctx: LayerContext, layer: int):
        super().__init__()
        self.ctx = ctx
        self.gate = Router(cfg, ctx, layer)
        sum_grads_over_tp(ctx, self.gate)  # each tensor-parallel rank routes its own tokens
        self.experts = GroupedExperts(cfg, ctx)
        # The shared expert always sees this rank's part of the sequence (see the module docstring).
        local_tokens = replace(ctx, mp_config=replace(ctx.mp_config, sequence_parallel=ctx.tp_size > 1))
        self.shared_experts = SharedExpert(cfg, local_tokens) if cfg.n_shared_experts > 0 else None
        self.seq_aux_loss_coef = cfg.seq_aux_loss_coef

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor, aux: dict | None = None) -> torch.Tensor:
        """x [s, b, d] (under sequence parallelism [s / tp, b, d]), token_ids [s, b] (whole sequence) -> like x.
        Adds the sequence balance loss to aux['balance']."""
        tp_group, tp = self.ctx.tp_group, self.ctx.tp_size
        if tp > 1:
            token_ids = token_ids.chunk(tp, dim=0)[self.ctx.tp_rank]
            if not self.ctx.sequence_parallel:
                return join_sequence(self._local(split_sequence(x, tp_group), token_ids, aux), tp_group)
        return self._local(x, token_ids, aux)

    def _local(self, x: torch.Tensor, token_ids: torch.Tensor, aux: dict | None) -> torch.Tensor:
        """The layer on this rank's tokens: x [s', b, d], token_ids [s', b]."""
        s, b, d = x.shape
        flat = x.reshape(-1, d)
        scores, weights, indices = self.gate(flat, token_ids.reshape(-1))
        k = indices.shape[1]
        rows = flat.repeat_interleave(k, dim=0)  # [N k, d]: token t's copy for its j-th expert at t k + j
        expert_out = self._run_experts(rows, indices.flatten())  # [N k, d]
        out = (expert_out.view(-1, k, d) * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x).reshape(-1, d)
        if self.training and aux is not None and not self.gate.is_hash and self.seq_aux_loss_coef > 0:
            aux.setdefault("balance", []).append(self.seq_aux_loss_coef * sequence_balance_loss(
                scores, indices, self.gate.n_experts, self.gate.top_k, b, self.ctx.tp_group))
        return out.view(s, b, d)

    def _run_experts(self, rows: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """Each row through its expert. With expert parallelism the rows travel to the rank holding their expert
        and back (all-to-all over the expert-parallel group, differentiable both ways)."""
        if self.ctx.ep_size == 1:
            return self._expert_shards(rows, expert)
        n_local = self.experts.n_local
        dest = expert // n_local  # owning rank of each row
        order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=self.ctx.ep_size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.ctx.ep_group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        recv_expert = all_to_all(expert[order] % n_local, recv, send, self.ctx.ep_group)  # local ids at the owner
        done = self._expert_shards(all_to_all(rows[order], recv, send, self.ctx.ep_group), recv_expert)
        return all_to_all(done, send, recv, self.ctx.ep_group)[torch.argsort(order)]

    def _expert_shards(self, rows: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """Rows of this rank's experts through them. With expert-tensor parallelism every rank of the etp group
        holds a slice of the same experts: the group's rows are gathered, each rank computes its partial outputs,
        and each gets its own rows' sums back."""
        if self.ctx.etp_size == 1:
            return self.experts(rows, expert)
        count = torch.tensor([rows.shape[0]], device=rows.device)
        counts = [torch.zeros_like(count) for _ in range(self.ctx.etp_size)]
        dist.all_gather(counts, count, group=self.ctx.etp_group)
        counts = [int(c) for c in counts]
        partial = self.experts(gather_rows(rows, counts, self.ctx.etp_group),
                               gather_rows(expert, counts, self.ctx.etp_group))
        return reduce_scatter_rows(partial, counts, self.ctx.etp_group)


@torch.no_grad()
def update_expert_bias(model: nn.Module, rate: float, group: dist.ProcessGroup | None = None) -> None:
    """Aux-loss-free balancing (spec section 5): after each optimizer step, for every scored router,
    b_i += rate * sign(mean_j load_j - load_i) and the counts restart. `group`: every rank of the pipeline stage
    that counted different tokens (tensor x data parallel), whose counts are summed first, so every replica applies
    the same update from the load of the whole global batch."""
    for router in (m for m in model.modules() if isinstance(m, Router) and not m.is_hash):
        load = router.tokens_per_expert
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(load, group=group)
        router.bias += rate * torch.sign(load.mean() - load)
        load.zero_()
