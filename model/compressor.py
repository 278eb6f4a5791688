"""KV compression and the lightning indexer of DeepSeek-V4's hybrid attention (spec section 4).

- `Compressor`: softmax-gated pooling of blocks of m tokens into one compressed KV entry, with a learned position
  bias (paper Eq. 20-22 for HCA, m' = 128); the *overlapped* variant for CSA (Eq. 9-12, m = 4) pools 2m tokens:
  block i through one projection and block i-1 through another, under one joint softmax.
- `LightningIndexer`: scores every visible compressed entry for each query (Eq. 13-17),
  I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . K[s]), and picks the top-k entries CSA attends to.
- `compressed_visibility`: strict causality of compressed entries: entry i (tokens i*m .. i*m+m-1) is visible to
  query t iff i < floor((t + 1) / m), i.e. only complete blocks count; `same_document_entries` adds the
  document boundary of packed sequences.

Shapes use Megatron's sequence-first layout: x [s, b, d]; compressed entries [T, b, head_dim], T = s // m.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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

    def forward(self, x: torch.Tensor, q_latent: torch.Tensor, rope: RotaryEmbedding,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [s, b, d], q_latent [s, b, q_lora] -> index scores [b, s, T] (fp32, not yet causally masked)."""
        s, b, _ = x.shape
        keys = self.compressor(x, rope, doc_ids).float()  # [T, b, c]
        # Shared by all heads: the keys' gradient is the sum over every rank's heads.
        keys = sum_gradients_over(keys, self.ctx.tp_group)
        q = self.wq_b(q_latent).view(s, b, self.n_local_heads, self.head_dim)
        cos, sin = rope(torch.arange(s, device=x.device), "compress")
        q = apply_rope(q, cos, sin)
        if self.quant_sim:
            q = simulate_indexer_fp4(q, self.fp4_block)
        scores = F.relu(torch.einsum("sbhc,tbc->bsht", q.float(), keys)) * self.score_scale  # [b, s, h, T]
        weights = self.weights_proj(x).float() * self.weight_scale  # [s, b, h]
        scores = (scores * weights.permute(1, 0, 2).unsqueeze(-1)).sum(dim=2)  # [b, s, T]
        return sum_values_over(scores, self.ctx.tp_group)  # partial sums over each rank's heads


def select_topk(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k visible entries per query as a mask [b, s, T] (paper Eq. 17).

    scores [b, s, T]; visible [1 or b, s, T]. Queries with fewer than k visible entries keep all of them.
    """
    n_entries = scores.shape[-1]
    k = min(k, n_entries)
    masked = scores.masked_fill(~visible, float("-inf"))
    idx = masked.topk(k, dim=-1).indices  # [b, s, k]
    chosen = torch.zeros_like(visible.expand_as(scores)).scatter(-1, idx, True)
    return chosen & visible
