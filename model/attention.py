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

Tensor parallelism: query heads, sinks and output groups are split over the tensor-parallel group; the single
K=V head, the low-rank query projection and the compressors are replicated: each rank computes them whole (they
are small) and contributes the partial gradient of its own heads, summed over the group once per step. The layer
is one tensor-parallel region: x enters replicated (or, under sequence parallelism, all-gathered along the
sequence, since every query needs the whole window and the compressors pool across the sequence) and leaves
through the row-parallel `wo_b` (all-reduce, or reduce-scatter under sequence parallelism). The attention itself is computed densely over [window tokens ; compressed entries] with masks, which
is exact and simple; sparse GPU kernels (FlashMLA-style) are a later, GPU-only path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dsv4.parallel.layers import (ColumnLinear, LayerContext, RowLinear, divide, replicated_linear,
                                  sharded_parameter, sum_grads_over_tp)
from dsv4.parallel.mappings import enter_tp_region

from .compressor import Compressor, LightningIndexer, compressed_visibility, same_document_entries, select_topk
from .config import ModelConfig
from .norm import RMSNorm, rms_normalize
from .quant import simulate_kv_fp8
from .rope import RotaryEmbedding, apply_rope


def sliding_window_mask(seq_len: int, window: int, device=None) -> torch.Tensor:
    """[s, s] bool: query t sees key j iff t - window < j <= t."""
    t = torch.arange(seq_len, device=device).unsqueeze(1)
    j = torch.arange(seq_len, device=device).unsqueeze(0)
    return (j <= t) & (j > t - window)


def sink_attention(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, sinks: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with a per-head sink logit in the denominator only (reference `sparse_attn`).

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

    The teacher p[t, :] is the main attention's probability on the compressed entries, summed over heads and
    L1-normalised over `candidates` (every visible entry in warm-up, the selected top-k in the sparse phase); it
    is detached. probs [b, h_local, s, T] (compressed part only); index_scores [b, s, T]; candidates [b, s, T].
    Averaged over the queries that have at least one candidate.
    """
    teacher = probs.detach().sum(dim=1)  # [b, s, T]
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
        positions = torch.arange(s, device=x.device)
        cos, sin = rope(positions, self.rope_type)

        q_latent = self.q_norm(self.wq_a(x))  # [s, b, q_lora]
        q = self.wq_b(q_latent).view(s, b, self.n_local_heads, self.head_dim)
        q = apply_rope(rms_normalize(q, self.eps), cos, sin)
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)  # [s, b, D]
        if self.quant_sim:
            kv = simulate_kv_fp8(kv, self.rope_dim, self.fp8_block)

        keys = kv
        mask = sliding_window_mask(s, self.window, x.device).unsqueeze(0)  # [1, s, s]
        if doc_ids is not None:
            mask = mask & (doc_ids.t().unsqueeze(2) == doc_ids.t().unsqueeze(1))  # [b, s, s]
        index_scores = candidates = None
        if self.compressor is not None:
            compressed = self.compressor(x, rope, doc_ids)  # [T, b, D]
            n = compressed.shape[0]
            visible = compressed_visibility(s, n, self.ratio, x.device).unsqueeze(0)  # [1, s, T]
            if doc_ids is not None:
                visible = visible & same_document_entries(doc_ids, n, self.ratio)  # [b, s, T]
            comp_mask = visible.expand(b, s, n)
            # Sparse attention needs the indexer's picks; the warm-up needs its scores only to train it.
            needs_scores = self.phase == "sparse" or (self.phase == "indexer_warmup" and self.training)
            if self.indexer is not None and n > 0 and needs_scores:
                # The indexer's only gradient is its KL loss: its inputs are detached from the main model.
                index_scores = self.indexer(x.detach(), q_latent.detach(), rope, doc_ids)  # [b, s, T]
                if self.phase == "sparse":
                    comp_mask = select_topk(index_scores.detach(), visible, self.index_topk)
                candidates = comp_mask
            keys = torch.cat([kv, compressed], dim=0)
            mask = torch.cat([mask.expand(b, s, s), comp_mask], dim=-1)  # [b, s, s + T]

        q = q.permute(1, 2, 0, 3)  # [b, h, s, D]
        out, probs = sink_attention(q, keys.transpose(0, 1), mask, self.attn_sink, self.scale)

        if index_scores is not None and self.training and aux is not None:
            aux.setdefault("indexer", []).append(
                indexer_kl_loss(probs[..., s:], index_scores, candidates, self.ctx.tp_group))
        if aux is not None and aux.get("record_stats") and self.indexer is not None and n > 0:
            aux.setdefault("indexer_recall", []).append(
                self._indexer_recall(x, q_latent, q, keys, mask[..., :s], visible, index_scores, rope, doc_ids))

        out = apply_rope(out.permute(2, 0, 1, 3), cos, sin, inverse=True)  # [s, b, h, D]
        out = out.reshape(s, b, self.n_local_groups, -1)  # [s, b, g, h/g * D]
        wo_a = self.wo_a.view(self.n_local_groups, self.o_lora_rank, -1)
        out = torch.einsum("sbgi,gri->sbgr", out, wo_a).flatten(2)  # [s, b, g * o_lora_rank]
        return self.wo_b(out)

    @torch.no_grad()
    def _indexer_recall(self, x, q_latent, q, keys, window_mask, visible, index_scores, rope,
                        doc_ids) -> torch.Tensor:
        """How many of the entries dense attention weighs most the indexer picks: |top-k(I) & top-k(p)| / k, over
        queries with more than k visible entries (p: dense attention on the compressed entries, summed over heads).
        """
        s, b = x.shape[:2]
        dense_mask = torch.cat([window_mask.expand(b, s, s), visible.expand(b, -1, -1)], dim=-1)
        _, probs = sink_attention(q, keys.transpose(0, 1), dense_mask, self.attn_sink, self.scale)
        teacher = probs[..., s:].sum(dim=1)  # [b, s, T]
        if self.ctx.tp_size > 1:
            dist.all_reduce(teacher, group=self.ctx.tp_group)
        if index_scores is None:
            index_scores = self.indexer(x, q_latent, rope, doc_ids)
        picked = select_topk(index_scores, visible, self.index_topk)
        best = select_topk(teacher, visible, self.index_topk)
        hits = (picked & best).sum(-1).float() / self.index_topk  # [b, s]
        counted = (visible.sum(-1) > self.index_topk).expand_as(hits)
        if not counted.any():
            return torch.ones((), device=x.device)
        return hits[counted].mean()
