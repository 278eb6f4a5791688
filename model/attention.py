"""DeepSeek-V4 attention, shared by the three layer kinds (spec section 4; reference `Attention`).

All layers: low-rank query (wq_a -> q_norm -> wq_b) with a weightless per-head RMS norm; one shared head used as
both K and V (MQA, K = V); interleaved RoPE on the last rope dims of q and K; a learnable per-head sink logit in the
softmax denominator; inverse RoPE on the output; grouped low-rank output projection (wo_a per group, then wo_b).
Every query sees the raw tokens of its sliding window (n_win, itself included). On top of that:
- SWA-only layers: nothing else;
- HCA layers: every visible compressed entry (m' = hca_ratio);
- CSA layers: the top-k compressed entries (m = csa_ratio) chosen by the lightning indexer; in the `dense` and
  `indexer_warmup` phases every visible entry instead.
In the `indexer_warmup` and `sparse` phases a CSA layer also returns the indexer's KL loss to the main attention.

How it is computed: query block by query block (`QUERY_BLOCK` queries), never over the whole [s, s] score matrix.
A block's window keys are the band kv[t0 - n_win + 1 : t1] under one band mask shared by every block; its
compressed keys are the entries visible to the block (HCA, dense CSA) or, in the sparse phase, each query's own
top-k entries gathered once per block for all heads (the K=V head is shared). One softmax runs over
[window ; compressed ; sink] per block, and the backward recomputes each block's probabilities from the saved
log-normaliser (`_BlockedSinkAttention`, the flash-attention scheme), so the memory held for the backward is the
queries, keys and outputs, linear in s. The lightning indexer's scores are inherently [s, T] (T = s / m) of work,
but they are made and reduced to top-k picks block by block too; the sparse phase's KL loss uses the picks only
([b, s, k]); the warm-up's KL loss is over every visible entry, so it holds [b, s, T] teacher and scores (and no
more). Sparse GPU kernels (FlashMLA-style) are a later, GPU-only path.

Tensor parallelism: query heads, sinks and output groups are split over the tensor-parallel group; the single
K=V head, the low-rank query projection and the compressors are replicated: each rank computes them whole (they
are small) and contributes the partial gradient of its own heads, summed over the group once per step. The layer
is one tensor-parallel region: x enters replicated (or, under sequence parallelism, all-gathered along the
sequence, since every query needs the whole window and the compressors pool across the sequence) and leaves
through the row-parallel `wo_b` (all-reduce, or reduce-scatter under sequence parallelism).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from dsv4.parallel.layers import (ColumnLinear, LayerContext, RowLinear, divide, replicated_linear,
                                  sharded_parameter, sum_grads_over_tp)
from dsv4.parallel.mappings import enter_tp_region, sum_values_over

from .compressor import (QUERY_BLOCK, Compressor, LightningIndexer, add_shared_keys_grad_, block_index_scores,
                         block_products, block_weighted_sum, compressed_visibility, gather_entries, index_scores,
                         per_query_keys_grad, query_blocks, same_document_entries, select_topk, topk_entries)
from .config import ModelConfig
from .norm import RMSNorm, rms_normalize
from .quant import simulate_kv_fp8
from .rope import RotaryEmbedding, apply_rope


def sliding_window_mask(seq_len: int, window: int, device=None) -> torch.Tensor:
    """[s, s] bool: query t sees key j iff t - window < j <= t."""
    t = torch.arange(seq_len, device=device).unsqueeze(1)
    j = torch.arange(seq_len, device=device).unsqueeze(0)
    return (j <= t) & (j > t - window)


@functools.lru_cache(maxsize=16)
def _band_mask(block: int, window: int, device: torch.device) -> torch.Tensor:
    """[block, block + window - 1] bool, the window of a full query block [t0, t0 + block): row r (query t0 + r)
    sees column c (key t0 - window + 1 + c) iff r <= c <= r + window - 1. The same for every block: built once."""
    return sliding_window_mask(block + window - 1, window, device)[window - 1:]


def sink_attention(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, sinks: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with a per-head sink logit in the denominator only (reference `sparse_attn`), dense over
    its keys: the plain statement of what `_BlockedSinkAttention` computes block by block, used where the
    probabilities themselves are wanted (`Attention._indexer_recall`).

    o_h = sum_k e^{s_k} v_k / (sum_k e^{s_k} + e^{sink_h}): the sink has no value vector, so a head's total
    attention mass can be below 1. q [b, h, s, D]; kv [b, K, D] (one head, K = V); mask [b or 1, s, K] bool;
    sinks [h]. Returns the output [b, h, s, D] and the probabilities [b, h, s, K].
    """
    logits = torch.einsum("bhsd,bkd->bhsk", q.float(), kv.float()) * scale
    logits = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
    sink = sinks.float().view(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
    lse = torch.logsumexp(torch.cat([logits, sink], dim=-1), dim=-1, keepdim=True)
    probs = torch.exp(logits - lse)
    out = torch.einsum("bhsk,bkd->bhsd", probs, kv.float())
    return out.to(q.dtype), probs


def indexer_kl_loss(probs: torch.Tensor, index_scores: torch.Tensor, candidates: torch.Tensor,
                    tp_group: dist.ProcessGroup) -> torch.Tensor:
    """KL(p || softmax(I)) of the lightning indexer to the main attention (DSA recipe, spec sections 7 and 10).

    The teacher p[t, :] is the main attention's probability on the candidate entries, summed over heads and
    L1-normalised over `candidates`; it is detached. The K candidate slots of a query are every compressed entry
    in warm-up, or its top-k picks in the sparse phase. probs [b, h_local, s, K] (per head, or [b, 1, s, K] already
    summed over this rank's heads); index_scores [b, s, K] at the same slots; candidates [b, s, K] marks the slots
    that hold a candidate. Averaged over the queries that have at least one candidate.
    """
    teacher = probs.detach().sum(dim=1)  # [b, s, K]
    if dist.get_world_size(tp_group) > 1:
        dist.all_reduce(teacher, group=tp_group)
    teacher = teacher.masked_fill(~candidates, 0.0)
    mass = teacher.sum(-1, keepdim=True)
    valid = candidates.any(-1) & (mass.squeeze(-1) > 0)
    teacher = teacher / mass.clamp_min(torch.finfo(teacher.dtype).tiny)
    log_q = torch.log_softmax(index_scores.masked_fill(~candidates, float("-inf")), dim=-1)
    terms = torch.where(teacher > 0, teacher * (torch.log(teacher.clamp_min(1e-30)) - log_q), 0.0)
    kl = terms.sum(-1)  # [b, s]
    if not valid.any():
        return kl.sum() * 0.0
    return kl[valid].mean()


class KeyPattern:
    """Which keys the queries of each block see; index tensors only, no gradients.

    Window: block [t0, t1) reads the raw K=V rows [max(0, t0 - n_win + 1), t1) under the shared band mask (and the
    document mask). Compressed entries: the first n = min(T, t1 // m) entries under the causal visibility of
    `compressed_visibility` (and `same_document_entries`), or, once the sparse phase's selection has set `picks`,
    each query's k picked entries (flat rows of the [b * T] entries) with their validity.
    docs [b, s] (packed documents) or None.
    """

    def __init__(self, seq_len: int, window: int, block: int, device: torch.device,
                 docs: torch.Tensor | None = None, ratio: int = 0, n_entries: int = 0):
        self.seq_len, self.window, self.block, self.docs = seq_len, window, block, docs
        self.ratio, self.n_entries = ratio, n_entries
        # Document of each entry = document of its block's last token (the compressor pools only that one).
        self.entry_docs = None if docs is None or n_entries == 0 else docs[:, ratio - 1: n_entries * ratio: ratio]
        self.band = _band_mask(block, window, device)
        self._band_masks: dict = {}  # dtype -> the full band's (bias, keep), see parts()
        self._gathered: dict = {}  # dtype -> the buffer the picked entries are gathered into, see parts()
        self.picks: torch.Tensor | None = None  # [b, s, k] flat entry rows, set by Attention._select
        self.valid: torch.Tensor | None = None  # [b, s, k]: the slot holds a visible entry

    def blocks(self) -> list[tuple[int, int]]:
        return query_blocks(self.seq_len, self.block)

    @property
    def n_slots(self) -> int:
        """Compressed slots per query: the k picks, or every entry."""
        return self.n_entries if self.picks is None else self.picks.shape[-1]

    def window_keys(self, t0: int, t1: int) -> tuple[int, torch.Tensor]:
        """First raw key lo of block [t0, t1) and which of the keys lo .. t1-1 each query sees, [1 or b, C, t1-lo]."""
        start = t0 - self.window + 1  # first band column's key for a full band
        lo = max(0, start)
        seen = self.band[: t1 - t0, lo - start: self.window - 1 + t1 - t0].unsqueeze(0)
        if self.docs is not None:
            seen = seen & (self.docs[:, t0:t1, None] == self.docs[:, None, lo:t1])
        return lo, seen

    def visible_entries(self, t0: int, t1: int) -> tuple[int, torch.Tensor]:
        """n = min(T, t1 // m) entries complete before the block's last query, and which of them each query sees,
        [1 or b, C, n] (entry i is seen by query t iff i < (t + 1) // m)."""
        n = min(self.n_entries, t1 // self.ratio)
        t = torch.arange(t0, t1, device=self.band.device)
        seen = (torch.arange(n, device=t.device) < ((t + 1) // self.ratio).unsqueeze(1)).unsqueeze(0)
        if self.docs is not None:
            seen = seen & (self.docs[:, t0:t1, None] == self.entry_docs[:, None, :n])
        return n, seen

    def parts(self, t0: int, t1: int, kv: torch.Tensor, comp: torch.Tensor | None) -> list:
        """[(keys, bias, keep)] of block [t0, t1): the window keys kv[:, lo:t1] [b, L, D], then (if any) the
        compressed keys: the visible prefix comp[:, :n] [b, n, D] or the gathered picks [b, C, k, D]. Which keys
        each query sees is given twice, [1 or b, C, 1, n_i] in kv's dtype: bias (0 seen, -inf hidden, to add to
        logits) and keep (1 seen, 0 hidden, to multiply probabilities with)."""
        lo, seen = self.window_keys(t0, t1)
        full_band = self.docs is None and t1 - t0 == self.block and lo == t0 - self.window + 1
        if full_band:  # the same for every full block: made once per dtype
            if kv.dtype not in self._band_masks:
                self._band_masks[kv.dtype] = _bias_and_keep(seen, kv.dtype)
            parts = [(kv[:, lo:t1], *self._band_masks[kv.dtype])]
        else:
            parts = [(kv[:, lo:t1], *_bias_and_keep(seen, kv.dtype))]
        if comp is None:
            return parts
        if self.picks is not None:
            if comp.dtype not in self._gathered:  # one buffer for every block's gathered entries
                self._gathered[comp.dtype] = comp.new_empty(comp.shape[0] * self.block * self.n_slots * comp.shape[-1])
            keys = gather_entries(comp, self.picks[:, t0:t1], self._gathered[comp.dtype])
            parts.append((keys, *_bias_and_keep(self.valid[:, t0:t1], comp.dtype)))
        else:
            n, seen = self.visible_entries(t0, t1)
            if n > 0:
                parts.append((comp[:, :n], *_bias_and_keep(seen, comp.dtype)))
        return parts


def _bias_and_keep(seen: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """seen [1 or b, C, n] bool -> bias (0 / -inf) and keep (1 / 0), [1 or b, C, 1, n] in `dtype`. Adding and
    multiplying by these is an order of magnitude faster on CPU than masked_fill with a broadcast mask."""
    keep = seen.unsqueeze(2).to(dtype)
    return torch.zeros_like(keep).masked_fill_(keep == 0, float("-inf")), keep


LOGIT_FLOOR = -80.0
"""Logits are clamped at (row max + LOGIT_FLOOR) before the exp: a key that far below the best one keeps a probability
of e^-80 ~ 2e-35 (nothing next to the best key's 1) instead of a denormal or 0, and hidden keys (-inf) go through
the exp's fast path too before they are multiplied by 0: exp of -inf, or of anything that underflows, takes the
slow path of the vectorised exp, several times (for denormal results ~70 times) slower on CPU."""


def _sink_softmax_(logits: list[torch.Tensor], masks: list[tuple[torch.Tensor, torch.Tensor]],
                   sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over several key parts and the sink, left unnormalised, in place: logits [b, C, h, n_i] of each
    part with its (bias, keep) masks -> e^(logit - top) (0 where hidden). The sink logit sinks [h] joins the
    denominator only. Returns top and the denominator total, [b, C, h] each: probabilities = e / total,
    log-normaliser = top + log(total)."""
    top = sinks.expand(logits[0].shape[:-1])
    for part, (bias, _) in zip(logits, masks):
        top = torch.maximum(top, part.add_(bias).amax(-1))  # finite: every query sees itself
    total = torch.exp(sinks - top)
    for part, (_, keep) in zip(logits, masks):
        total += part.sub_(top.unsqueeze(-1)).clamp_min_(LOGIT_FLOOR).exp_().mul_(keep).sum(-1)
    return top, total


class _BlockedSinkAttention(torch.autograd.Function):
    """Sink attention of every query over the keys its `KeyPattern` gives, query block by query block.

    Forward: per block, the logits of each key part, one softmax with the sink, the output; kept for the backward:
    the queries, the keys, the outputs and the log-normaliser lse [b, s, h]. Backward: per block, the
    probabilities p = exp(logits - lse) again, then with delta = dO . O (the softmax's Jacobian term):
    dlogits = p * (dO . v - delta); dq = dlogits @ keys; each key gets dlogits^T q as a key and p^T dO as a value
    (K = V); the sink gets -p_sink * delta. Computes in fp32 (fp64 for fp64 inputs); the softmax scale is applied
    to each block's queries, where they are small and in cache.
    Returns the output [b, s, h, D] and, if asked, the teacher of the indexer's KL loss: the probabilities on the
    compressed slots summed over this rank's heads, [b, s, pattern.n_slots] (else None).
    """

    @staticmethod
    def forward(ctx, q, kv, comp, sinks, pattern, scale, want_teacher):
        dtype = torch.promote_types(q.dtype, torch.float32)
        q_, kv_, sinks_ = q.to(dtype), kv.to(dtype), sinks.to(dtype)
        comp_ = None if comp is None else comp.to(dtype)
        b, s, h, D = q.shape
        out, lse = q_.new_empty(b, s, h, D), q_.new_empty(b, s, h)
        teacher = q_.new_zeros(b, s, pattern.n_slots) if want_teacher and comp is not None else None
        for t0, t1 in pattern.blocks():
            qb = q_[:, t0:t1] * scale  # [b, C, h, D]
            parts = pattern.parts(t0, t1, kv_, comp_)
            e = [block_products(qb, keys) for keys, _, _ in parts]  # logits [b, C, h, n_i], exponentiated in place
            top, total = _sink_softmax_(e, [masks for _, *masks in parts], sinks_)
            o = block_weighted_sum(e[0], parts[0][0])
            for part, (keys, _, _) in zip(e[1:], parts[1:]):
                block_weighted_sum(part, keys, out=o)
            out[:, t0:t1] = o.div_(total.unsqueeze(-1))
            lse[:, t0:t1] = top + total.log()
            if teacher is not None and len(e) > 1:
                teacher[:, t0:t1, : e[1].shape[-1]] = (e[1] / total.unsqueeze(-1)).sum(2)
        ctx.pattern, ctx.scale = pattern, scale
        ctx.dtypes = (q.dtype, kv.dtype, None if comp is None else comp.dtype, sinks.dtype)
        ctx.save_for_backward(q_, kv_, comp_, sinks_, out, lse)
        if teacher is not None:
            ctx.mark_non_differentiable(teacher)
        return out.to(q.dtype), teacher

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _):
        q, kv, comp, sinks, out, lse = ctx.saved_tensors
        pattern, scale, D = ctx.pattern, ctx.scale, q.shape[-1]
        dout = dout.to(q.dtype).contiguous()
        dq, dkv = torch.empty_like(q), torch.zeros_like(kv)
        dcomp = None if comp is None else torch.zeros_like(comp)
        dsinks = torch.zeros_like(sinks)
        dpicked = None if pattern.picks is None else q.new_empty(q.shape[0] * pattern.block * pattern.n_slots * D)
        for t0, t1 in pattern.blocks():
            qb, do = q[:, t0:t1] * scale, dout[:, t0:t1]  # [b, C, h, D]
            delta = (do * out[:, t0:t1]).sum(-1, keepdim=True)  # [b, C, h, 1]
            lse_b = lse[:, t0:t1].unsqueeze(-1)
            dqb = None
            for i, (keys, bias, keep) in enumerate(pattern.parts(t0, t1, kv, comp)):
                # One product of [q ; dO] with the keys gives the logits (again) and dP = dO . v (K = V); one product
                # of [p ; dlogits]^T with [dO ; q] gives each key's gradient as a value and as a key. Stacked along
                # the queries ([b, 2C, h, D]) for keys shared by the block, along the heads ([b, C, 2h, D]) for
                # per-query keys.
                shared = keys.dim() == 3
                stack = 1 if shared else 2
                prod = block_products(torch.cat([qb, do], stack), keys)
                p, dlogits = prod.chunk(2, stack)  # [b, C, h, n] each
                p.add_(bias).sub_(lse_b).clamp_min_(LOGIT_FLOOR).exp_().mul_(keep)
                dlogits.sub_(delta).mul_(p)
                dqb = block_weighted_sum(dlogits, keys, out=dqb)
                if shared:  # the window rows lo .. t1-1, or the visible prefix of the entries
                    rows = dkv[:, t1 - keys.shape[1]: t1] if i == 0 else dcomp[:, : keys.shape[1]]
                    add_shared_keys_grad_(rows, prod, torch.cat([do, qb], stack))
                else:  # each query's picks: [b, C, k, D], added into the entries they came from
                    dkeys = per_query_keys_grad(prod, torch.cat([do, qb], stack), dpicked)
                    dcomp.view(-1, D).index_add_(0, pattern.picks[:, t0:t1].reshape(-1), dkeys.flatten(0, 2))
            dq[:, t0:t1] = dqb.mul_(scale)
            dsinks -= (torch.exp(sinks - lse_b.squeeze(-1)) * delta.squeeze(-1)).sum((0, 1))
        q_dtype, kv_dtype, comp_dtype, sinks_dtype = ctx.dtypes
        return (dq.to(q_dtype), dkv.to(kv_dtype), None if dcomp is None else dcomp.to(comp_dtype),
                dsinks.to(sinks_dtype), None, None, None)


class Attention(nn.Module):
    """The attention sublayer of block `layer` (kind from `compress_ratios[layer]`)."""

    def __init__(self, cfg: ModelConfig, ctx: LayerContext, layer: int):
        super().__init__()
        self.kind = cfg.layer_kind(layer)
        self.ratio = cfg.layer_ratio(layer)
        self.rope_type = "main" if self.kind == "swa" else "compress"
        self.ctx = ctx
        self.head_dim = cfg.head_dim
        self.window = cfg.sliding_window
        self.index_topk = cfg.index_topk
        self.scale = cfg.head_dim ** -0.5
        self.n_local_heads = divide(cfg.num_heads, ctx.tp_size, "model.num_heads / tensor parallel size")
        self.n_local_groups = divide(cfg.o_groups, ctx.tp_size, "model.o_groups / tensor parallel size")
        self.eps = cfg.rms_norm_eps
        self.quant_sim, self.rope_dim, self.fp8_block = cfg.quant_sim, cfg.rope_head_dim, cfg.quant_fp8_block
        # Which attention phase the layer runs (dense -> indexer_warmup -> sparse); set by the model.
        self.phase = "sparse"
        # Queries per block of the blocked attention and indexer (tests shrink it to get many blocks cheaply).
        self.query_block = QUERY_BLOCK

        self.wq_a = replicated_linear(ctx, cfg.hidden_size, cfg.q_lora_rank, fp8_module="attention")
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = ColumnLinear(ctx, cfg.q_lora_rank, cfg.num_heads * cfg.head_dim, input_in_region=True,
                                 fp8_module="attention")
        self.wkv = replicated_linear(ctx, cfg.hidden_size, cfg.head_dim, fp8_module="attention")
        self.kv_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        # Grouped output projection: group j maps its heads' (h/g * D) outputs to o_lora_rank (wo_a, block
        # diagonal, stored as [g * o_lora_rank, h/g * D] like the reference), then wo_b mixes g * o_lora_rank -> d.
        self.wo_a = sharded_parameter(ctx, (cfg.o_groups * cfg.o_lora_rank, cfg.num_heads * cfg.head_dim
                                            // cfg.o_groups), partition_dim=0, std=cfg.init_std)
        self.o_lora_rank = cfg.o_lora_rank
        self.wo_b = RowLinear(ctx, cfg.o_groups * cfg.o_lora_rank, cfg.hidden_size, fp8_module="attention")
        # Sink logits, fp32, zero-initialised as in Megatron's V4 (DeepSeek's init: NOT FOUND).
        self.attn_sink = sharded_parameter(ctx, (cfg.num_heads,), partition_dim=0, std=None, dtype=torch.float32)

        self.compressor = None if self.kind == "swa" else Compressor(
            cfg, ctx, self.ratio, cfg.head_dim, overlap=self.kind == "csa")
        self.indexer = LightningIndexer(cfg, ctx) if self.kind == "csa" else None
        sum_grads_over_tp(ctx, self.wq_a, self.q_norm, self.wkv, self.kv_norm,
                          *([self.compressor] if self.compressor is not None else []))

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, aux: dict | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [s, b, d] -> [s, b, d] (under sequence parallelism [s / tp, b, d] -> [s / tp, b, d]). Adds the indexer
        loss to `aux['indexer']` when this layer trains it.

        doc_ids [s, b] (whole sequence): sample-level masking of packed documents: a query sees only its own
        document's window tokens and compressed entries."""
        x = enter_tp_region(x, self.ctx.tp_group, self.ctx.sequence_parallel)  # [s, b, d] on every rank
        s, b, _ = x.shape
        cos, sin = rope(torch.arange(s, device=x.device), self.rope_type)

        q_latent = self.q_norm(self.wq_a(x))  # [s, b, q_lora]
        q = self.wq_b(q_latent).view(s, b, self.n_local_heads, self.head_dim)
        q = apply_rope(rms_normalize(q, self.eps), cos, sin)
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)  # [s, b, D]
        if self.quant_sim:
            kv = simulate_kv_fp8(kv, self.rope_dim, self.fp8_block)
        q, kv = q.transpose(0, 1).contiguous(), kv.transpose(0, 1).contiguous()  # [b, s, h, D], [b, s, D]

        comp, n = None, 0
        if self.compressor is not None:
            comp = self.compressor(x, rope, doc_ids).transpose(0, 1).contiguous()  # [b, T, D]
            n = comp.shape[1]
            comp = comp if n > 0 else None
        pattern = KeyPattern(s, self.window, self.query_block, x.device,
                             None if doc_ids is None else doc_ids.t(), self.ratio, n)
        train_indexer = (self.indexer is not None and n > 0 and self.phase != "dense" and self.training
                         and aux is not None)
        # The sparse phase needs the indexer's picks (unless its top-k keeps every entry: then it is dense
        # attention); the warm-up needs its scores only to train it. Its inputs are detached from the main model:
        # its only gradient is its KL loss.
        indexer_parts = None
        if self.indexer is not None and n > 0 and (self.phase == "sparse" or train_indexer):
            indexer_parts = self.indexer.project(x.detach(), q_latent.detach(), rope, doc_ids)
            if self.phase == "sparse" and self.index_topk < n:
                self._select(indexer_parts, pattern)

        out, teacher = _BlockedSinkAttention.apply(q, kv, comp, self.attn_sink, pattern, self.scale, train_indexer)

        if train_indexer:
            scores = sum_values_over(index_scores(*indexer_parts, picks=pattern.picks, block=self.query_block),
                                     self.ctx.tp_group)  # [b, s, n_slots]
            if pattern.picks is not None:
                candidates = pattern.valid
            else:  # every visible entry: [s, T], as the warm-up's dense KL needs
                candidates = compressed_visibility(s, n, self.ratio, x.device).unsqueeze(0)
                if doc_ids is not None:
                    candidates = candidates & same_document_entries(doc_ids, n, self.ratio)
                candidates = candidates.expand(b, s, n)
            aux.setdefault("indexer", []).append(
                indexer_kl_loss(teacher.unsqueeze(1), scores, candidates, self.ctx.tp_group))
        if aux is not None and aux.get("record_stats") and self.indexer is not None and n > 0:
            if indexer_parts is None:
                indexer_parts = self.indexer.project(x.detach(), q_latent.detach(), rope, doc_ids)
            aux.setdefault("indexer_recall", []).append(self._indexer_recall(q, kv, comp, pattern, indexer_parts))

        out = apply_rope(out.transpose(0, 1), cos, sin, inverse=True)  # [s, b, h, D]
        out = out.reshape(s, b, self.n_local_groups, -1)  # [s, b, g, h/g * D]
        wo_a = self.wo_a.view(self.n_local_groups, self.o_lora_rank, -1)
        out = torch.einsum("sbgi,gri->sbgr", out, wo_a).flatten(2)  # [s, b, g * o_lora_rank]
        return self.wo_b(out)

    @torch.no_grad()
    def _select(self, indexer_parts: tuple, pattern: KeyPattern) -> None:
        """The sparse phase's top-k (paper Eq. 17), block by block: index scores of the entries visible to the
        block [b, C, n], their top-k per query; sets pattern.picks (flat rows of the [b * T] entries) and
        pattern.valid [b, s, k], k = min(index_topk, T). A query with fewer than k visible entries keeps all of them
        and its other slots are invalid."""
        iq, iw, ikeys = indexer_parts
        b, s = iq.shape[:2]
        k = min(self.index_topk, pattern.n_entries)
        picks = torch.zeros(b, s, k, dtype=torch.long, device=iq.device)
        valid = torch.zeros(b, s, k, dtype=torch.bool, device=iq.device)
        for t0, t1 in pattern.blocks():
            n, seen = pattern.visible_entries(t0, t1)
            if n == 0:
                continue
            scores = block_index_scores(iq[:, t0:t1], iw[:, t0:t1], ikeys[:, :n])  # [b, C, n], this rank's heads
            if self.ctx.tp_size > 1:
                dist.all_reduce(scores, group=self.ctx.tp_group)
            idx, ok = topk_entries(scores, seen, k, row_length=pattern.n_entries)
            picks[:, t0:t1, : idx.shape[-1]], valid[:, t0:t1, : idx.shape[-1]] = idx, ok
        pattern.picks = picks + (torch.arange(b, device=iq.device) * pattern.n_entries).view(b, 1, 1)
        pattern.valid = valid

    @torch.no_grad()
    def _indexer_recall(self, q, kv, comp, pattern: KeyPattern, indexer_parts: tuple) -> torch.Tensor:
        """How many of the entries dense attention weighs most the indexer picks: |top-k(I) & top-k(p)| / k, over
        queries with more than k visible entries (p: dense attention over the window and every visible entry, on
        the compressed entries, summed over heads). Block by block: [b, h, C, window + T] at a time.
        q [b, s, h, D], kv [b, s, D], comp [b, T, D]."""
        iq, iw, ikeys = indexer_parts
        b, k = q.shape[0], self.index_topk
        hits = torch.zeros((), device=q.device)
        counted = 0
        for t0, t1 in pattern.blocks():
            n, seen = pattern.visible_entries(t0, t1)
            if n <= k:  # no query of the block has more than k visible entries
                continue
            lo, window_seen = pattern.window_keys(t0, t1)
            keys = torch.cat([kv[:, lo:t1], comp[:, :n]], dim=1)  # [b, L + n, D]
            mask = torch.cat([window_seen.expand(b, -1, -1), seen.expand(b, -1, -1)], dim=-1)
            _, probs = sink_attention(q[:, t0:t1].transpose(1, 2), keys, mask, self.attn_sink, self.scale)
            teacher = probs[..., t1 - lo:].sum(dim=1)  # [b, C, n]
            scores = block_index_scores(iq[:, t0:t1], iw[:, t0:t1], ikeys[:, :n])
            if self.ctx.tp_size > 1:
                dist.all_reduce(teacher, group=self.ctx.tp_group)
                dist.all_reduce(scores, group=self.ctx.tp_group)
            both = select_topk(scores, seen, k, pattern.n_entries) & select_topk(teacher, seen, k, pattern.n_entries)
            rows = (seen.sum(-1) > k).expand(b, -1)  # [b, C]
            hits += both.sum(-1)[rows].sum() / k
            counted += int(rows.sum())
        if counted == 0:
            return torch.ones((), device=q.device)
        return hits / counted
