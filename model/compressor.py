"""KV compression and the lightning indexer of DeepSeek-V4's hybrid attention (spec section 4).

- `Compressor`: softmax-gated pooling of blocks of m tokens into one compressed KV entry, with a learned position
  bias (paper Eq. 20-22 for HCA, m' = 128); the *overlapped* variant for CSA (Eq. 9-12, m = 4) pools 2m tokens:
  block i through one projection and block i-1 through another, under one joint softmax.
- `LightningIndexer`: scores every visible compressed entry for each query (Eq. 13-17),
  I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . K[s]), and picks the top-k entries CSA attends to.
- `compressed_visibility`: strict causality of compressed entries: entry i (tokens i*m .. i*m+m-1) is visible to
  query t iff i < floor((t + 1) / m), i.e. only complete blocks count; `same_document_entries` adds the
  document boundary of packed sequences.
- The query-blocked products the indexer and the attention share: queries go `QUERY_BLOCK` at a time against
  keys that are either shared by the block ([b, n, c]) or gathered per query ([b, C, k, c], the top-k picks), so
  that no [s, T] tensor per head is ever held; `index_scores` is the indexer's score as such a blocked autograd
  function, whose backward recomputes each block's products instead of storing them.

Shapes use Megatron's sequence-first layout: x [s, b, d]; compressed entries [T, b, head_dim], T = s // m. The blocked
code is batch-first: queries [b, s, h, c], keys [b, T, c].
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from dsv4.parallel.layers import ColumnLinear, LayerContext, divide, replicated_linear
from dsv4.parallel.mappings import sum_gradients_over, sum_values_over

from .config import ModelConfig
from .norm import RMSNorm
from .quant import simulate_indexer_fp4, simulate_kv_fp8
from .rope import RotaryEmbedding, apply_rope


def compressed_visibility(seq_len: int, n_entries: int, ratio: int, device=None) -> torch.Tensor:
    """[s, T] bool: query t may see compressed entry i iff i < (t + 1) // ratio."""
    t = torch.arange(seq_len, device=device)
    i = torch.arange(n_entries, device=device)
    return i.unsqueeze(0) < ((t + 1) // ratio).unsqueeze(1)


def same_document_entries(doc_ids: torch.Tensor, n_entries: int, ratio: int) -> torch.Tensor:
    """[b, s, T] bool, for packed documents (doc_ids [s, b], non-decreasing along s): entry i belongs to query t's
    document iff block i ends in it. The compressor pools only that document's tokens into the entry, so with this
    mask no information crosses documents."""
    block_doc = doc_ids[ratio - 1: n_entries * ratio: ratio].t()  # [b, T]: document of each block's last token
    return doc_ids.t().unsqueeze(2) == block_doc.unsqueeze(1)


class Compressor(nn.Module):
    """Compress every `ratio` tokens into one KV entry (paper Eq. 9-12 overlapped / Eq. 20-22 plain).

    C = H W^KV and Z = H W^Z (one column block each, two with overlap); per block, S = softmax over the block's
    tokens of (Z + B) channel by channel, with B = `ape` the learned position bias; C^Comp_i = sum_j S_j * C_j.
    With overlap, entry i pools 2m tokens: block i-1 through the first projection half (C^a) and block i through
    the second (C^b); block 0's missing predecessor is padded with -inf gates (weight 0).
    Then RMSNorm, RoPE at the block's first token (position i*m), and the reference's precision simulation:
    FP8 on the non-RoPE dims for attention KV, or Hadamard + FP4 for the indexer's keys (`for_indexer`).
    The projections and the pooling run in fp32, as in the reference.
    """

    def __init__(self, cfg: ModelConfig, ctx: LayerContext, ratio: int, head_dim: int, overlap: bool,
                 for_indexer: bool = False):
        super().__init__()
        self.ratio, self.head_dim, self.overlap, self.for_indexer = ratio, head_dim, overlap, for_indexer
        self.quant_sim, self.fp8_block, self.fp4_block = cfg.quant_sim, cfg.quant_fp8_block, cfg.quant_fp4_block
        self.rope_dim = cfg.rope_head_dim
        width = (2 if overlap else 1) * head_dim
        self.wkv = replicated_linear(ctx, cfg.hidden_size, width, dtype=torch.float32, fp8_module="indexer")
        self.wgate = replicated_linear(ctx, cfg.hidden_size, width, dtype=torch.float32, fp8_module="indexer")
        self.ape = nn.Parameter(torch.zeros(ratio, width, dtype=torch.float32))
        self.norm = RMSNorm(head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [s, b, d] -> compressed entries [s // ratio, b, head_dim] (a trailing partial block is dropped).

        doc_ids [s, b] (packed documents): an entry pools only the tokens of the document its block ends in.
        """
        s, b, _ = x.shape
        m, hd = self.ratio, self.head_dim
        n = s // m
        xf = x[: n * m].float()
        kv = self.wkv(xf).view(n, m, b, -1)  # [n, m, b, width]
        gate = self.wgate(xf).view(n, m, b, -1) + self.ape.view(1, m, 1, -1)
        docs = None if doc_ids is None else doc_ids[: n * m].view(n, m, b)
        if self.overlap:
            # Entry i: [C^a of block i-1 ; C^b of block i] over 2m positions, one joint softmax.
            prev_kv = torch.cat([kv.new_zeros(1, m, b, hd), kv[:-1, ..., :hd]], dim=0)
            prev_gate = torch.cat([gate.new_full((1, m, b, hd), float("-inf")), gate[:-1, ..., :hd]], dim=0)
            kv = torch.cat([prev_kv, kv[..., hd:]], dim=1)  # [n, 2m, b, hd]
            gate = torch.cat([prev_gate, gate[..., hd:]], dim=1)
            if docs is not None:
                docs = torch.cat([torch.cat([docs[:1], docs[:-1]], dim=0), docs], dim=1)  # [n, 2m, b]
        if docs is not None:
            other_doc = docs != docs[:, -1:]  # not the document of the block's last token
            gate = gate.masked_fill(other_doc.unsqueeze(-1), float("-inf"))
        pooled = (kv * gate.softmax(dim=1)).sum(dim=1)  # [n, b, hd]
        c = self.norm(pooled)
        cos, sin = rope(torch.arange(n, device=x.device) * m, "compress")
        c = apply_rope(c, cos, sin)
        if self.quant_sim:
            c = (simulate_indexer_fp4(c, self.fp4_block) if self.for_indexer
                 else simulate_kv_fp8(c, self.rope_dim, self.fp8_block))
        return c.to(x.dtype)


class LightningIndexer(nn.Module):
    """The lightning indexer of CSA layers (paper Eq. 13-17; reference `Indexer`).

    q^I = W^I_q q_latent reuses the attention's low-rank query latent; its last rope dims get the compressed-layer
    RoPE at the query position. Keys come from the indexer's own overlapped compressor. Per-head weights
    w = W_w x * n_heads^-1/2, and I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . K[s]) * head_dim^-1/2.
    With `quant_sim`, q and K are Hadamard-rotated and FP4-simulated like the reference; without it the rotation
    is skipped: it is orthogonal, so on its own it leaves every score unchanged.
    Indexer heads are split over the tensor-parallel group; partial head sums are all-reduced.
    """

    def __init__(self, cfg: ModelConfig, ctx: LayerContext):
        super().__init__()
        self.ctx = ctx
        self.head_dim = cfg.index_head_dim
        self.n_local_heads = divide(cfg.index_n_heads, ctx.tp_size, "model.index_n_heads / tensor parallel size")
        self.score_scale = cfg.index_head_dim ** -0.5
        self.weight_scale = cfg.index_n_heads ** -0.5
        self.quant_sim, self.fp4_block = cfg.quant_sim, cfg.quant_fp4_block
        # Inputs are inside the attention's region (and detached): no communication on the way in.
        self.wq_b = ColumnLinear(ctx, cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, input_in_region=True,
                                 fp8_module="indexer")
        self.weights_proj = ColumnLinear(ctx, cfg.hidden_size, cfg.index_n_heads, input_in_region=True)
        self.compressor = Compressor(cfg, ctx, cfg.csa_ratio, cfg.index_head_dim, overlap=True, for_indexer=True)

    def project(self, x: torch.Tensor, q_latent: torch.Tensor, rope: RotaryEmbedding,
                doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [s, b, d], q_latent [s, b, q_lora] -> what the scores are made of, batch-first and fp32:
        queries [b, s, h_local, c], head weights [b, s, h_local] (both scales folded in), keys [b, T, c]."""
        s, b, _ = x.shape
        keys = self.compressor(x, rope, doc_ids).float()  # [T, b, c]
        # Shared by all heads: the keys' gradient is the sum over every rank's heads.
        keys = sum_gradients_over(keys, self.ctx.tp_group).transpose(0, 1).contiguous()  # [b, T, c]
        q = self.wq_b(q_latent).view(s, b, self.n_local_heads, self.head_dim)
        cos, sin = rope(torch.arange(s, device=x.device), "compress")
        q = apply_rope(q, cos, sin)
        if self.quant_sim:
            q = simulate_indexer_fp4(q, self.fp4_block)
        weights = self.weights_proj(x).float() * (self.weight_scale * self.score_scale)  # [s, b, h]
        return q.float().transpose(0, 1).contiguous(), weights.transpose(0, 1).contiguous(), keys

    def forward(self, x: torch.Tensor, q_latent: torch.Tensor, rope: RotaryEmbedding,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [s, b, d], q_latent [s, b, q_lora] -> index scores [b, s, T] (fp32, not yet causally masked)."""
        scores = index_scores(*self.project(x, q_latent, rope, doc_ids))
        return sum_values_over(scores, self.ctx.tp_group)  # partial sums over each rank's heads


# --- query-blocked products ---------------------------------------------------------------------------------------

QUERY_BLOCK = 64
"""Queries per block in the blocked indexer and attention. With V4's 128-token window a block's band holds 191 keys of
which each query uses 128: smaller blocks waste less of the band but pay the per-block Python and kernel-launch cost
more often and make smaller matrix products; larger blocks also spill the gathered top-k entries ([C, k, D] per block)
out of cache. 64 was the fastest of 16-256 in CPU-time profiles of bench/attention_scaling.py's layers (8 heads of
128, window 128, top-512) on the 2-core VM, with 32 close behind (the machine is shared: +-20% noise)."""


def query_blocks(seq_len: int, block: int) -> list[tuple[int, int]]:
    """[(t0, t1)]: consecutive query blocks covering 0 .. seq_len."""
    return [(t0, min(t0 + block, seq_len)) for t0 in range(0, seq_len, block)]


def block_products(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q [b, C, h, c] . keys -> [b, C, h, n]; keys [b, n, c] are shared by the block's queries (one matrix product
    for all C * h rows) or [b, C, n, c] are each query's own (the gathered top-k)."""
    if keys.dim() == 3:
        b, C, h, c = q.shape
        return torch.bmm(q.reshape(b, C * h, c), keys.transpose(1, 2)).view(b, C, h, -1)
    return torch.matmul(q, keys.transpose(-1, -2))


def block_weighted_sum(p: torch.Tensor, keys: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """p [b, C, h, n] weighting keys ([b, n, c] shared or [b, C, n, c] per query) -> [b, C, h, c], added into the
    contiguous `out` if given (no temporary)."""
    b, C, h, n = p.shape
    if keys.dim() == 3:
        a, v = p.reshape(b, C * h, n), keys
    else:
        a, v = p.reshape(b * C, h, n), keys.reshape(b * C, n, -1)
    if out is None:
        return torch.bmm(a, v).view(b, C, h, -1)
    out.view(a.shape[0], a.shape[1], -1).baddbmm_(a, v)
    return out


def add_shared_keys_grad_(out: torch.Tensor, g: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The keys' gradient of block_products for keys shared by the block, added into out [b, n, c] (a view, e.g.
    rows of the whole gradient): g [b, C, h, n], q [b, C, h, c], summed over the block's queries and heads."""
    b, C, h, n = g.shape
    return out.baddbmm_(g.reshape(b, C * h, n).transpose(1, 2), q.reshape(b, C * h, -1))


def per_query_keys_grad(g: torch.Tensor, q: torch.Tensor, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """The keys' gradient of block_products for per-query keys: g [b, C, h, n], q [b, C, h, c] -> [b, C, n, c]
    (summed over heads), written into `buffer` (flat, at least b * C * n * c elements) if given."""
    b, C, h, n = g.shape
    out = None if buffer is None else buffer[: b * C * n * q.shape[-1]].view(b * C, n, -1)
    return torch.bmm(g.reshape(b * C, h, n).transpose(1, 2), q.reshape(b * C, h, -1), out=out).view(b, C, n, -1)


def gather_entries(keys: torch.Tensor, picks: torch.Tensor, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """keys [b, T, c], picks [b, C, k] (flat row numbers into keys.view(b * T, c)) -> [b, C, k, c], written into
    `buffer` (flat, at least b * C * k * c elements) if given: the blocked loops reuse one buffer, which saves an
    allocation per block and keeps it in cache. index_select: several times faster than advanced indexing."""
    rows, c = picks.reshape(-1), keys.shape[-1]
    out = None if buffer is None else buffer[: rows.numel() * c].view(-1, c)
    return torch.index_select(keys.reshape(-1, c), 0, rows, out=out).view(*picks.shape, c)


def block_index_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """One query block of I[t, j] = sum_h w[t, h] * ReLU(q[t, h] . K[j]): q [b, C, h, c], w [b, C, h] -> [b, C, n]."""
    return torch.matmul(w.unsqueeze(-2), block_products(q, keys).relu_()).squeeze(-2)


class _IndexScores(torch.autograd.Function):
    """Index scores of every entry (picks None) or of each query's picked entries, query block by query block.

    Autograd through the plain ops would keep every block's ReLU'd products [b, C, h, n] for the backward, as much
    as the whole score tensor times the heads; this backward recomputes them block by block instead.
    """

    @staticmethod
    def forward(ctx, q, w, keys, picks, block):
        b, s, _, c = q.shape
        out = q.new_empty(b, s, keys.shape[1] if picks is None else picks.shape[-1])
        buffer = None if picks is None else keys.new_empty(b * block * picks.shape[-1] * c)
        for t0, t1 in query_blocks(s, block):
            kb = keys if picks is None else gather_entries(keys, picks[:, t0:t1], buffer)
            out[:, t0:t1] = block_index_scores(q[:, t0:t1], w[:, t0:t1], kb)
        ctx.block = block
        ctx.save_for_backward(q, w, keys, picks)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, w, keys, picks = ctx.saved_tensors
        b, s, _, c = q.shape
        grad = grad.contiguous()
        dq, dw, dkeys = torch.empty_like(q), torch.empty_like(w), torch.zeros_like(keys)
        buffers = None if picks is None else keys.new_empty(2, b * ctx.block * picks.shape[-1] * c)
        for t0, t1 in query_blocks(s, ctx.block):
            qb, wb, g = q[:, t0:t1], w[:, t0:t1], grad[:, t0:t1].unsqueeze(2)  # g [b, C, 1, n]
            kb = keys if picks is None else gather_entries(keys, picks[:, t0:t1], buffers[0])
            dots = block_products(qb, kb)  # [b, C, h, n]
            ddots = (dots > 0) * wb.unsqueeze(-1) * g  # [b, C, h, n]
            dw[:, t0:t1] = (dots.relu_() * g).sum(-1)
            dq[:, t0:t1] = block_weighted_sum(ddots, kb)
            if picks is None:
                add_shared_keys_grad_(dkeys, ddots, qb)
            else:
                dkeys.view(-1, c).index_add_(0, picks[:, t0:t1].reshape(-1),
                                             per_query_keys_grad(ddots, qb, buffers[1]).flatten(0, 2))
        return dq, dw, dkeys, None, None


def index_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, picks: torch.Tensor | None = None,
                 block: int = QUERY_BLOCK) -> torch.Tensor:
    """The indexer's scores I[t, j] = sum_h w[t, h] * ReLU(q[t, h] . K[j]) over this rank's heads, differentiable.

    q [b, s, h, c], w [b, s, h], keys [b, T, c] (from `LightningIndexer.project`); picks None -> [b, s, T] (every
    entry, unmasked), or picks [b, s, k] (flat row numbers into keys.view(b * T, c)) -> [b, s, k].
    """
    return _IndexScores.apply(q, w, keys, picks, block)


def topk_entries(scores: torch.Tensor, visible: torch.Tensor, k: int,
                 row_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k visible entries per query (paper Eq. 17) as indices [b, s, min(k, n)] into the entries and their
    validity: a query with fewer than k visible entries keeps all of them, its other slots are invalid.
    scores [b, s, n]; visible [1 or b, s, n].

    The picks equal torch.topk over whole rows (the reference's and transformers' computation on [s, T]) ties
    included: an index score is exactly 0 whenever ReLU zeroes every head, and topk breaks such ties in a way that
    depends on the row's length and on sorting. So rows whose k-th best score ties with an unpicked one are redone
    as sorted topk over the whole row: the n scores given, padded with -inf to `row_length` when they are only the
    first n of it (a query block's visible prefix). Every other row has a unique top-k set.
    """
    n = scores.shape[-1]
    k = min(k, n)
    masked = scores.masked_fill(~visible, float("-inf"))
    top = masked.topk(k, dim=-1, sorted=False)  # unsorted: faster, and the slots' order is irrelevant
    idx, kth = top.indices, top.values.amin(-1, keepdim=True)
    tied = torch.isfinite(kth) & ((masked == kth).sum(-1, keepdim=True) > (top.values == kth).sum(-1, keepdim=True))
    rows = tied.squeeze(-1).nonzero(as_tuple=True)
    if rows[0].numel():
        whole = masked.new_full((rows[0].numel(), max(n, row_length or n)), float("-inf"))
        whole[:, :n] = masked[rows]
        idx[rows] = whole.topk(k, dim=-1).indices
    return idx, visible.expand_as(scores).gather(-1, idx)


def select_topk(scores: torch.Tensor, visible: torch.Tensor, k: int, row_length: int | None = None) -> torch.Tensor:
    """The top-k visible entries per query as a mask [b, s, n] (see `topk_entries`)."""
    idx, valid = topk_entries(scores, visible, k, row_length)
    return torch.zeros_like(visible.expand_as(scores)).scatter(-1, idx, valid)
