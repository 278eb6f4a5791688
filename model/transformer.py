"""The DeepSeek-V4 language model (spec section 2; reference `Transformer`).

    h = embed(ids);  X = [h, h, h, h]                     (n = hc_mult residual streams)
    X = block_l(X) for every block l                      (hybrid SWA / CSA / HCA attention + MoE, inside mHC)
    logits = head(norm(hc_head(X)))
    MTP depth k: X_k = mtp_k(X_{k-1}, embed(ids shifted by k)); logits_k = head(mtp_k.norm(mtp_k.hc_head(X_k)))
                 (each MTP block has its own final norm; the embedding and head are shared)

The loss is  CE(main) + mtp_loss_weight * mean_k CE(depth k) + indexer_loss_coef * mean(indexer KL losses)
+ sum(sequence balance losses). Inputs are [b, s] token ids as users hold them; inside, activations are
sequence-first [s, b, ...] as in megatron-core. Vocabulary, query heads and indexer heads are split over the
tensor-parallel group handed in; nothing reads a global process group.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from dsv4.parallel.cross_entropy import vocab_parallel_cross_entropy
from dsv4.parallel.fp8 import Fp8Plan, fp8_autocast
from dsv4.parallel.layers import ColumnLinear, make_layer_context, sum_grads_over_tp, vocab_embedding

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


@dataclass(frozen=True)
class PipelineStage:
    """The part of the model one model chunk holds: blocks [first_layer, end_layer) (global indices, so every
    block keeps its place in the hybrid attention schedule), the embedding on the first stage, and the final
    norm, head and MTP blocks on the last. The last stage also keeps a copy of the embedding for MTP when it is
    not also the first; the two copies start equal and their gradients are summed
    (`dsv4.parallel.grads.finalize_grads`).
    """

    first_layer: int
    end_layer: int
    pre_process: bool = True
    post_process: bool = True
    pp_size: int = 1
    vpp_size: int = 1
    vp_stage: int = 0
    """This chunk's index among the rank's virtual stages (its virtual stage is vp_stage * pp_size + pp rank)."""


def layer_split(num_layers: int, stages: int, pp_layers: Sequence[int] = ()) -> list[int]:
    """Blocks per virtual pipeline stage, in model order: `pp_layers` when given, else an even split with the
    remainder on the first stages (the last stage also runs the head and the MTP blocks)."""
    if pp_layers:
        if len(pp_layers) != stages or sum(pp_layers) != num_layers or min(pp_layers) < 1:
            raise ValueError(f"parallel.pp_layers={list(pp_layers)}: give {stages} positive counts (pp * vpp) that "
                             f"sum to model.num_layers={num_layers}")
        return list(pp_layers)
    if num_layers < stages:
        raise ValueError(f"{num_layers} layers cannot fill {stages} pipeline stages (pp * vpp); lower parallel.pp "
                         f"or parallel.vpp")
    base, extra = divmod(num_layers, stages)
    return [base + (i < extra) for i in range(stages)]


def pipeline_stages(num_layers: int, pp: int, pp_rank: int, vpp: int = 1,
                    pp_layers: Sequence[int] = ()) -> list[PipelineStage]:
    """The model chunks of pipeline rank `pp_rank`: chunk c is virtual stage c * pp + pp_rank (megatron's
    interleaving order)."""
    counts = layer_split(num_layers, pp * vpp, pp_layers)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    chunks = []
    for c in range(vpp):
        v = c * pp + pp_rank
        chunks.append(PipelineStage(starts[v], starts[v] + counts[v], pre_process=v == 0,
                                    post_process=v == pp * vpp - 1, pp_size=pp, vpp_size=vpp, vp_stage=c))
    return chunks


@contextmanager
def _init_rng(seed: int, component: int):
    """Initialise one component from its own seed, so a block's weights do not depend on which other blocks this
    rank builds (pipeline stages) or on the order of construction."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + component)
        yield


class _AttachLoss(torch.autograd.Function):
    """Forward: x unchanged. Backward: x's gradient, and `scale` as the gradient of the scalar `loss`. A pipeline
    stage that is not the last adds its auxiliary losses (balance, indexer KL) to the objective this way: they
    join the backward pass through the stage's output (megatron's MoEAuxLossAutoScaler does the same)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.save_for_backward(loss)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad, torch.full_like(loss, ctx.scale), None


class DSV4Model(MegatronModule):
    """DeepSeek-V4 with MTP, or one pipeline chunk of it, built from a `ModelConfig` and the groups it runs on:
    tensor parallel (optionally with sequence parallelism), expert parallel (routed experts spread over
    `ep_group`), expert-tensor parallel (each expert split over `etp_group`).

    Weights are drawn per component from `seed` (default: torch's current seed), so the model is the same for
    every layout. `self.config` is the megatron TransformerConfig the schedules and DDP read. `fp8`: the FP8 plan
    (`dsv4.parallel.fp8`) for the module groups it covers; with the TransformerEngine backend the forward runs
    under TE's FP8 autocast. `recompute`: every block (MTP included) keeps only its input in training and is
    recomputed in backward (`dsv4.model.recompute`).
    """

    def __init__(self, cfg: ModelConfig, tp_group: dist.ProcessGroup, params_dtype: torch.dtype = torch.float32,
                 ep_group: Optional[dist.ProcessGroup] = None, *, etp_group: Optional[dist.ProcessGroup] = None,
                 sequence_parallel: bool = False, stage: Optional[PipelineStage] = None, seed: Optional[int] = None,
                 fp8: Optional[Fp8Plan] = None, recompute: bool = False):
        cfg.validate()
        ctx = make_layer_context(tp_group, cfg.init_std, params_dtype, ep_group, etp_group=etp_group,
                                 sequence_parallel=sequence_parallel, fp8=fp8)
        stage = stage or PipelineStage(0, cfg.num_layers)
        super().__init__(config=TransformerConfig(
            num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
            tensor_model_parallel_size=ctx.tp_size, sequence_parallel=ctx.sequence_parallel,
            pipeline_model_parallel_size=stage.pp_size,
            virtual_pipeline_model_parallel_size=stage.vpp_size if stage.vpp_size > 1 else None,
            expert_model_parallel_size=ctx.ep_size, expert_tensor_parallel_size=ctx.etp_size,
            # Only for megatron's layout checks (it needs experts to allow ep); dsv4's MoE reads `cfg`.
            num_moe_experts=cfg.n_routed_experts, moe_ffn_hidden_size=cfg.moe_intermediate_size,
            add_bias_linear=False,
            params_dtype=params_dtype, pipeline_dtype=params_dtype, use_cpu_initialization=True))
        self.cfg, self.ctx, self.stage = cfg, ctx, stage
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        self.tp_group = tp_group
        self.ep_size = ctx.ep_size  # routed experts are spread over this many ranks
        self.pre_process, self.post_process = stage.pre_process, stage.post_process
        self.vp_stage = stage.vp_stage
        self.layer_offset = stage.first_layer
        self.input_tensor: Optional[torch.Tensor] = None  # a later pipeline stage's input, set by the schedule
        self.loss_scale = 1.0  # gradient scale of this chunk's auxiliary losses (1 / micro-batches), set per step
        self.aux_values: dict = {}  # the last forward's auxiliary losses (detached), for logging
        self.stats_parts: dict = {}  # the last record_stats forward's raw diagnostics, see combine_stats
        seed = torch.initial_seed() if seed is None else seed
        n_blocks = cfg.num_layers + cfg.mtp_depth

        self.rope = RotaryEmbedding(cfg)
        self.embed = None
        if stage.pre_process or (stage.post_process and cfg.mtp_depth > 0):
            with _init_rng(seed, 0):
                self.embed = vocab_embedding(ctx, cfg.vocab_size, cfg.hidden_size)
            self.embed.weight.shared_embedding = True
            if not stage.pre_process:
                self.embed.weight.shared = True  # megatron's marker: a copy, counted once in the gradient norm
        blocks = []
        for i in range(stage.first_layer, stage.end_layer):
            with _init_rng(seed, 1 + i):
                blocks.append(Block(cfg, ctx, i))
        self.layers = torch.nn.ModuleList(blocks)
        if stage.post_process:
            with _init_rng(seed, 1 + n_blocks):
                self.hc_head = HyperHead(cfg)
                self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
                self.head = ColumnLinear(ctx, cfg.hidden_size, cfg.vocab_size)
            sum_grads_over_tp(ctx, self.hc_head, self.norm, sequence_parallel_only=True)
            mtp = []
            for k in range(1, cfg.mtp_depth + 1):
                with _init_rng(seed, cfg.num_layers + k):
                    mtp.append(MTPBlock(cfg, ctx, k))
            self.mtp = torch.nn.ModuleList(mtp)
        else:
            self.mtp = torch.nn.ModuleList()
        # Indexer losses are averaged over every CSA block of the whole model (all stages).
        self.n_indexer_layers = sum(cfg.layer_kind(i) == "csa" for i in range(n_blocks))
        self.phase = "sparse"
        for block in self.blocks():
            block.recompute = recompute
        if torch.cuda.is_available():  # built on the CPU (see make_layer_context), run on this rank's GPU
            self.cuda(torch.cuda.current_device())

    def global_name(self, name: str) -> str:
        """A parameter or module name of this chunk as in the whole model: a pipeline chunk numbers its blocks from
        0, the whole model from `layer_offset`."""
        if not name.startswith("layers."):
            return name
        local, _, rest = name.removeprefix("layers.").partition(".")
        return f"layers.{int(local) + self.layer_offset}" + (f".{rest}" if rest else "")

    def set_input_tensor(self, input_tensor) -> None:
        """The pipeline schedule hands a later stage its input (the previous stage's streams) here."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    # --- attention phases ----------------------------------------------------------------------------------
    def set_attention_phase(self, phase: str) -> None:
        """dense: CSA attends to every visible compressed entry; the indexers are idle, so they are frozen (trained,
            they would get no gradient, and weight decay alone would shrink them through the whole dense phase).
        indexer_warmup: dense attention; only the indexers learn (their KL loss), everything else is frozen.
        sparse: top-k attention; the indexers learn from their KL loss on detached inputs, the rest from the LM loss.
        Frozen means `requires_grad` off; the training loop keeps such tensors out of the optimizer step
        (`dsv4.train.loop.leave_out_frozen`), so neither they nor their optimizer state change.
        """
        if phase not in ATTENTION_PHASES:
            raise ValueError(f"attention phase {phase!r}: expected one of {ATTENTION_PHASES}")
        self.phase = phase
        indexer_params = {id(p) for p in self.indexer_parameters()}
        for p in self.parameters():
            trains = {"dense": id(p) not in indexer_params, "indexer_warmup": id(p) in indexer_params,
                      "sparse": True}[phase]
            p.requires_grad_(trains)
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
    def _embed(self, ids_bs: torch.Tensor) -> torch.Tensor:
        """Token ids [b, s] -> embeddings [s, b, d] ([s / tp, b, d] under sequence parallelism)."""
        h = self.embed(ids_bs)
        return h if self.ctx.sequence_parallel else h.transpose(0, 1)

    def _ce(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean token loss over `mask`; logits [s, b, v/tp], labels and mask [s, b]."""
        per_token = vocab_parallel_cross_entropy(logits, labels, self.tp_group)
        return (per_token * mask).sum() / mask.sum().clamp_min(1)

    def forward(self, *args, **kwargs):
        """`_forward` (below), under TransformerEngine's FP8 autocast when the FP8 plan uses the te backend."""
        with fp8_autocast(self.ctx.fp8, self.ctx.tp_group):
            return self._forward(*args, **kwargs)

    def _forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                loss_mask: Optional[torch.Tensor] = None, return_logits: Optional[bool] = None,
                mtp_loss_weight: Optional[float] = None, record_stats: bool = False,
                document_ids: Optional[torch.Tensor] = None):
        """input_ids [b, s]; labels [b, s] (next tokens; the MTP depth-k target of position t is labels[t + k]);
        loss_mask [b, s] (1 = count the token). Logits are returned when there are no labels, or on request.
        `mtp_loss_weight` overrides the config's (V4 lowers it when LR decay starts). `record_stats` measures the
        indexer's recall of dense attention's top-k and the mHC composite residual gain (costs a dense pass).
        `document_ids` [b, s] (non-decreasing along s) masks attention between packed documents.

        Every pipeline stage receives the same arguments (hash routing and document masks need the ids). A stage
        that is not the last returns its output streams as a tensor [s(/tp), b * n, d] for the next stage, with its
        auxiliary losses attached; the last stage returns a `ModelOutput`."""
        if return_logits is None:
            return_logits = labels is None
        ids = input_ids.t().contiguous()  # [s, b]
        s, b = ids.shape
        n, d = self.cfg.hc_mult, self.cfg.hidden_size
        aux: dict = {"record_stats": record_stats}
        docs = None if document_ids is None else document_ids.t().contiguous()  # [s, b]
        if self.pre_process:
            h = self._embed(input_ids)  # [s', b, d]
            streams = h.unsqueeze(2).expand(h.shape[0], b, n, d).contiguous()  # [s', b, n, d]
        else:
            streams = self.input_tensor.view(-1, b, n, d)
        for layer in self.layers:
            streams = layer(streams, ids, self.rope, aux, docs)
        if record_stats:
            self.stats_parts = self._stats_parts(aux)
        if not self.post_process:
            aux_losses = self._aux_losses(aux)
            out = streams.view(-1, b * n, d)
            if aux_losses["total"] is not None and self.training:
                out = _AttachLoss.apply(out, aux_losses["total"], self.loss_scale)
            return out

        logits = self.head(self.norm(self.hc_head(streams)))  # [s, b, vocab / tp]
        out = ModelOutput()
        if record_stats:
            out.stats = combine_stats([self.stats_parts])
        if return_logits:
            out.logits = gather_from_tensor_model_parallel_region(logits, group=self.tp_group).transpose(0, 1)
        if labels is None:
            aux_losses = self._aux_losses(aux)
            out.indexer_loss, out.balance_loss = aux_losses["indexer"], aux_losses["balance"]
            return out

        labels = labels.t().contiguous()
        mask = torch.ones_like(labels, dtype=torch.float32) if loss_mask is None else loss_mask.t().float()
        out.lm_loss = self._ce(logits, labels, mask)
        total = out.lm_loss

        for k, mtp in enumerate(self.mtp, start=1):
            # Depth k sees tokens t+1..t+k through the shifted embedding and predicts labels[t + k]; the last k
            # positions have no target and are masked (their shifted inputs are padding).
            ids_k = torch.roll(ids, -k, dims=0)
            streams, hidden = mtp(streams, self._embed(ids_k.t()), ids_k, self.rope, aux, docs)
            mask_k = torch.roll(mask, -k, dims=0).clone()
            mask_k[-k:] = 0
            out.mtp_losses.append(self._ce(self.head(hidden), torch.roll(labels, -k, dims=0), mask_k))
        if out.mtp_losses:
            weight = self.cfg.mtp_loss_weight if mtp_loss_weight is None else mtp_loss_weight
            total = total + weight * torch.stack(out.mtp_losses).mean()
        aux_losses = self._aux_losses(aux)  # after the MTP blocks, which add their own
        out.indexer_loss, out.balance_loss = aux_losses["indexer"], aux_losses["balance"]
        if aux_losses["total"] is not None:
            total = total + aux_losses["total"]
        out.loss = total
        return out

    def _aux_losses(self, aux: dict) -> dict:
        """This chunk's auxiliary losses: indexer = sum of its KL losses / every CSA block of the model (the mean
        when one chunk holds them all), balance = sum of its sequence balance losses, and their weighted total.

        Also records them, detached, in `aux_values` for logging: indexer and balance always, the total only on
        a stage before the last (the last stage's total is part of the loss it returns)."""
        indexer = balance = total = None
        if aux.get("indexer"):
            indexer = torch.stack(aux["indexer"]).sum() / self.n_indexer_layers
            total = self.cfg.indexer_loss_coef * indexer
        if aux.get("balance"):
            balance = torch.stack(aux["balance"]).sum()
            total = balance if total is None else total + balance
        losses = {"indexer": indexer, "balance": balance, "total": total}
        logged = ("indexer", "balance") if self.post_process else ("indexer", "balance", "total")
        self.aux_values = {k: losses[k].detach() for k in logged if losses[k] is not None}
        return losses

    @staticmethod
    def _stats_parts(aux: dict) -> dict:
        """The raw diagnostics of this chunk's main blocks, for combining over pipeline stages: the indexer recall
        per CSA block and the composite residual map B_last^T ... B_first^T of its blocks."""
        parts = {"recall": [r.item() for r in aux.get("indexer_recall", [])], "composite": None}
        if aux.get("mhc_res"):
            composite = torch.eye(aux["mhc_res"][0].shape[-1], dtype=torch.float64)
            for res in aux["mhc_res"]:
                composite = res.double().cpu().t() @ composite
            parts["composite"] = composite
        return parts


def combine_stats(parts: list) -> dict:
    """indexer_recall (mean over CSA blocks) and mhc_composite_gain from `_stats_parts` of the model's chunks in
    model order. The streams evolve as X' = B^T X: the composite map of all sublayers is B_L^T ... B_1^T; its gain
    is the largest absolute row sum (mHC paper: ~1.6 with the Sinkhorn constraint vs ~3000 unconstrained)."""
    stats = {}
    recall = [r for p in parts for r in p["recall"]]
    if recall:
        stats["indexer_recall"] = sum(recall) / len(recall)
    composites = [p["composite"] for p in parts if p["composite"] is not None]
    if composites:
        total = composites[0]
        for c in composites[1:]:
            total = c @ total
        stats["mhc_composite_gain"] = total.abs().sum(-1).max().item()
    return stats
