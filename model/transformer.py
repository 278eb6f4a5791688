"""The DeepSeek-V4 language model (spec section 2; reference `Transformer`).

    h = embed(ids);  X = [h, h, h, h]                     (n = hc_mult residual streams)
    X = block_l(X) for every block l                      (hybrid SWA / CSA / HCA attention + MoE, inside mHC)
    logits = head(norm(hc_head(X)))
    MTP depth k: X_k = mtp_k(X_{k-1}, embed(ids shifted by k)); logits_k = head(norm(mtp_k.hc_head(X_k)))

The loss is  CE(main) + mtp_loss_weight * mean_k CE(depth k) + indexer_loss_coef * mean(indexer KL losses)
+ sum(sequence balance losses). Inputs are [b, s] token ids as users hold them; inside, activations are
sequence-first [s, b, ...] as in megatron-core. Vocabulary, query heads and indexer heads are split over the
tensor-parallel group handed in; nothing reads a global process group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule

from dsv4.parallel.cross_entropy import vocab_parallel_cross_entropy
from dsv4.parallel.layers import ColumnLinear, make_layer_context, vocab_embedding

from .block import Block, MTPBlock
from .config import ATTENTION_PHASES, ModelConfig
from .mhc import HyperHead
from .norm import RMSNorm
from .rope import RotaryEmbedding


@dataclass
class ModelOutput:
    """What a forward pass returns. Losses are set when labels are given; logits when asked for."""

    logits: Optional[torch.Tensor] = None  # [b, s, vocab] (gathered over tensor parallelism)
    loss: Optional[torch.Tensor] = None  # the total training loss
    lm_loss: Optional[torch.Tensor] = None
    mtp_losses: list = field(default_factory=list)  # one per MTP depth
    indexer_loss: Optional[torch.Tensor] = None
    balance_loss: Optional[torch.Tensor] = None
    stats: dict = field(default_factory=dict)  # with record_stats: indexer_recall, mhc_composite_gain


class DSV4Model(MegatronModule):
    """DeepSeek-V4 with MTP, built from a `ModelConfig` and the groups it runs on: tensor parallel, and optionally
    expert parallel (routed experts spread over `ep_group`)."""

    def __init__(self, cfg: ModelConfig, tp_group: dist.ProcessGroup, params_dtype: torch.dtype = torch.float32,
                 ep_group: Optional[dist.ProcessGroup] = None):
        cfg.validate()
        ctx = make_layer_context(tp_group, cfg.init_std, params_dtype, ep_group)
        super().__init__(config=ctx.mp_config)
        self.cfg = cfg
        self.tp_group = tp_group
        self.ep_size = ctx.ep_size  # routed experts are spread over this many ranks
        self.rope = RotaryEmbedding(cfg)
        self.embed = vocab_embedding(ctx, cfg.vocab_size, cfg.hidden_size)
        self.layers = torch.nn.ModuleList(Block(cfg, ctx, i) for i in range(cfg.num_layers))
        self.hc_head = HyperHead(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = ColumnLinear(ctx, cfg.hidden_size, cfg.vocab_size)
        self.mtp = torch.nn.ModuleList(MTPBlock(cfg, ctx, k) for k in range(1, cfg.mtp_depth + 1))
        self.phase = "sparse"
        if torch.cuda.is_available():  # built on the CPU (see make_layer_context), run on this rank's GPU
            self.cuda(torch.cuda.current_device())

    # --- attention phases ----------------------------------------------------------------------------------
    def set_attention_phase(self, phase: str) -> None:
        """dense: CSA attends to every visible compressed entry, the indexer is idle.
        indexer_warmup: dense attention; only the indexers learn (their KL loss), everything else is frozen.
        sparse: top-k attention; the indexers learn from their KL loss on detached inputs, the rest from the LM loss.
        """
        if phase not in ATTENTION_PHASES:
            raise ValueError(f"attention phase {phase!r}: expected one of {ATTENTION_PHASES}")
        self.phase = phase
        indexer_params = {id(p) for p in self.indexer_parameters()}
        for p in self.parameters():
            p.requires_grad_(phase != "indexer_warmup" or id(p) in indexer_params)
        for block in self.blocks():
            block.attn.phase = phase

    def set_step(self, step: int) -> str:
        """Switch to the attention phase the config schedules for optimizer step `step`; returns it."""
        phase = self.cfg.attention_phase(step)
        if phase != self.phase:
            self.set_attention_phase(phase)
        return phase

    def blocks(self):
        """Every Block: the main ones, then the MTP ones."""
        yield from self.layers
        yield from (m.block for m in self.mtp)

    def indexer_parameters(self):
        for block in self.blocks():
            if block.attn.indexer is not None:
                yield from block.attn.indexer.parameters()

    # --- forward -------------------------------------------------------------------------------------------
    def _logits(self, streams: torch.Tensor, hc_head: HyperHead) -> torch.Tensor:
        """[s, b, n, d] -> vocab-parallel logits [s, b, vocab / tp]."""
        return self.head(self.norm(hc_head(streams)))

    def _ce(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean token loss over `mask`; logits [s, b, v/tp], labels and mask [s, b]."""
        per_token = vocab_parallel_cross_entropy(logits, labels, self.tp_group)
        return (per_token * mask).sum() / mask.sum().clamp_min(1)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                loss_mask: Optional[torch.Tensor] = None, return_logits: Optional[bool] = None,
                mtp_loss_weight: Optional[float] = None, record_stats: bool = False,
                document_ids: Optional[torch.Tensor] = None) -> ModelOutput:
        """input_ids [b, s]; labels [b, s] (next tokens; the MTP depth-k target of position t is labels[t + k]);
        loss_mask [b, s] (1 = count the token). Logits are returned when there are no labels, or on request.
        `mtp_loss_weight` overrides the config's (V4 lowers it when LR decay starts). `record_stats` measures the
        indexer's recall of dense attention's top-k and the mHC composite residual gain (costs a dense pass).
        `document_ids` [b, s] (non-decreasing along s) masks attention between packed documents."""
        if return_logits is None:
            return_logits = labels is None
        ids = input_ids.t().contiguous()  # [s, b]
        s, b = ids.shape
        aux: dict = {"record_stats": record_stats}
        docs = None if document_ids is None else document_ids.t().contiguous()  # [s, b]
        h = self.embed(input_ids).transpose(0, 1)  # [s, b, d]
        streams = h.unsqueeze(2).expand(s, b, self.cfg.hc_mult, -1).contiguous()  # [s, b, n, d]
        for layer in self.layers:
            streams = layer(streams, ids, self.rope, aux, docs)
        logits = self._logits(streams, self.hc_head)

        out = ModelOutput()
        if record_stats:
            out.stats = self._stats(aux)
        if return_logits:
            out.logits = gather_from_tensor_model_parallel_region(logits, group=self.tp_group).transpose(0, 1)
        if labels is None:
            return out

        labels = labels.t().contiguous()
        mask = torch.ones_like(labels, dtype=torch.float32) if loss_mask is None else loss_mask.t().float()
        out.lm_loss = self._ce(logits, labels, mask)
        total = out.lm_loss

        for k, mtp in enumerate(self.mtp, start=1):
            # Depth k sees tokens t+1..t+k through the shifted embedding and predicts labels[t + k]; the last k
            # positions have no target and are masked (their shifted inputs are padding).
            ids_k = torch.roll(ids, -k, dims=0)
            streams, hidden = mtp(streams, self.embed(ids_k.t()).transpose(0, 1), ids_k, self.rope, aux, docs)
            mask_k = torch.roll(mask, -k, dims=0).clone()
            mask_k[-k:] = 0
            out.mtp_losses.append(self._ce(self.head(self.norm(hidden)), torch.roll(labels, -k, dims=0), mask_k))
        if out.mtp_losses:
            weight = self.cfg.mtp_loss_weight if mtp_loss_weight is None else mtp_loss_weight
            total = total + weight * torch.stack(out.mtp_losses).mean()
        if aux.get("indexer"):
            out.indexer_loss = torch.stack(aux["indexer"]).mean()
            total = total + self.cfg.indexer_loss_coef * out.indexer_loss
        if aux.get("balance"):
            out.balance_loss = torch.stack(aux["balance"]).sum()
            total = total + out.balance_loss
        out.loss = total
        return out

    @staticmethod
    def _stats(aux: dict) -> dict:
        """Diagnostics of a record_stats pass (main blocks only; the MTP blocks run later)."""
        stats = {}
        if aux.get("indexer_recall"):
            stats["indexer_recall"] = torch.stack(aux["indexer_recall"]).mean().item()
        if aux.get("mhc_res"):
            # The streams evolve as X' = B^T X: the composite map of all sublayers is B_L^T ... B_1^T. Its gain is
            # the largest absolute row sum (mHC paper: ~1.6 with the Sinkhorn constraint vs ~3000 unconstrained).
            composite = torch.eye(aux["mhc_res"][0].shape[-1], dtype=torch.float64)
            for res in aux["mhc_res"]:
                composite = res.double().cpu().t() @ composite
            stats["mhc_composite_gain"] = composite.abs().sum(-1).max().item()
        return stats
