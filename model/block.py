"""One DeepSeek-V4 block and the multi-token-prediction block (spec sections 2 and 6; reference `Block`, `MTPBlock`).

There is no plain residual add: mHC wraps attention and MoE separately, and RMSNorm comes *after* the mHC
collapse, right before the sublayer:
    x, post, res = pre-mix(X);  X = post * attn(attn_norm(x)) + res^T X
    x, post, res = pre-mix(X);  X = post * moe(ffn_norm(x), ids) + res^T X
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.parallel.layers import LayerContext, replicated_linear, sum_grads_over_tp

from .attention import Attention
from .config import ModelConfig
from .mhc import HyperConnection, HyperHead
from .moe import MoE
from .norm import RMSNorm
from .recompute import recomputed
from .rope import RotaryEmbedding


class Block(nn.Module):
    """Attention and MoE sublayers, each inside its own hyper-connection. `layer` indexes `compress_ratios`."""

    def __init__(self, cfg: ModelConfig, ctx: LayerContext, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_hc = HyperConnection(cfg)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, ctx, layer)
        self.ffn_hc = HyperConnection(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = MoE(cfg, ctx, layer)
        # Per-token and replicated: under sequence parallelism each rank sees its own tokens only.
        sum_grads_over_tp(ctx, self.attn_hc, self.attn_norm, self.ffn_hc, self.ffn_norm, sequence_parallel_only=True)
        self.recompute = False  # keep only the input streams in training, replay in backward (parallel.recompute)

    def forward(self, streams: torch.Tensor, token_ids: torch.Tensor, rope: RotaryEmbedding,
                aux: dict | None = None, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """streams [s, b, n, d] ([s / tp, b, n, d] under sequence parallelism), token_ids [s, b], doc_ids [s, b]
        (packed documents; both for the whole sequence) -> streams like the input."""
        if self.recompute and self.training and torch.is_grad_enabled():
            return recomputed(self._forward, streams, token_ids, rope, aux, doc_ids)
        return self._forward(streams, token_ids, rope, aux, doc_ids)

    def _forward(self, streams, token_ids, rope, aux, doc_ids):
        pre, post, res = self.attn_hc.weights(streams)
        out = self.attn(self.attn_norm(self.attn_hc.collapse(streams, pre)), rope, aux, doc_ids)
        streams = self.attn_hc.expand(out, streams, post, res)
        record = aux is not None and aux.get("record_stats")
        if record:
            aux.setdefault("mhc_res", []).append(res.detach().mean(dim=(0, 1)))

        pre, post, res = self.ffn_hc.weights(streams)
        out = self.ffn(self.ffn_norm(self.ffn_hc.collapse(streams, pre)), token_ids, aux)
        if record:
            aux.setdefault("mhc_res", []).append(res.detach().mean(dim=(0, 1)))
        return self.ffn_hc.expand(out, streams, post, res)


class MTPBlock(nn.Module):
    """Multi-token prediction depth k (reference `MTPBlock`; V3/V4 MTP).

    Combines the previous depth's streams at position t with the embedding of token t+k:
        X = e_proj(enorm(embed(ids shifted by k))) + h_proj(hnorm(X_prev))   (h_proj per stream)
    then one full block (its schedule entry is `compress_ratios[num_layers + k - 1]`), then its own `hc_head`
    and its own final `norm`:  logits_k = head(norm_k(hc_head_k(X)))  (reference: `self.head(x, self.hc_head_fn,
    ..., self.norm)`; the released checkpoints hold `mtp.<i>.norm.weight`). Only the embedding and the output
    head are shared with the main model.
    """

    def __init__(self, cfg: ModelConfig, ctx: LayerContext, depth: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.e_proj = replicated_linear(ctx, cfg.hidden_size, cfg.hidden_size)
        self.h_proj = replicated_linear(ctx, cfg.hidden_size, cfg.hidden_size)
        self.block = Block(cfg, ctx, cfg.num_layers + depth - 1)
        self.hc_head = HyperHead(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        sum_grads_over_tp(ctx, self.enorm, self.hnorm, self.e_proj, self.h_proj, self.hc_head, self.norm,
                          sequence_parallel_only=True)

    def forward(self, streams: torch.Tensor, embedded_next: torch.Tensor, token_ids_next: torch.Tensor,
                rope: RotaryEmbedding, aux: dict | None = None,
                doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """streams [s, b, n, d]; embedded_next [s, b, d] -> (new streams, normed hidden [s, b, d] for the head)."""
        x = self.e_proj(self.enorm(embedded_next)).unsqueeze(-2) + self.h_proj(self.hnorm(streams))  # [s, b, n, d]
        streams = self.block(x, token_ids_next, rope, aux, doc_ids)
        return streams, self.norm(self.hc_head(streams))  # [s, b, d]
