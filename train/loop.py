"""The training loop: build, then one explicit step function repeated, with logging and evaluation.

    build:  config -> process groups -> model chunks (pipeline stages) in megatron DDP -> megatron optimizer
            (distributed: ZeRO-1) -> data -> run folder
    step:   attention phase for the step -> LR -> megatron-core schedule: forward (LM + MTP + balance + indexer
            losses) and backward of every micro-batch, pipelined over the stages -> gradient finalisation
            (data-parallel reduction, tensor-parallel partial sums, shared embedding) -> non-finite check -> clip
            -> optimizer step -> expert-bias update
    then:   log (TensorBoard, progress) -> evaluate every run.eval_interval steps
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import chain
from typing import Optional

import torch
import torch.distributed as dist

from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.distributed import DistributedDataParallel as DDP
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import MixedPrecisionOptimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import ParamGroupOverride
from megatron.core.pipeline_parallel import get_forward_backward_func

from dsv4.conf.schema import DSV4Config
from dsv4.model.moe import Router, update_expert_bias
from dsv4.model.transformer import DSV4Model, ModelOutput, combine_stats, pipeline_stages
from dsv4.optim.distributed import DistributedMuon
from dsv4.optim.muon import no_weight_decay
from dsv4.parallel.grads import finalize_grads
from dsv4.parallel.fp8 import Fp8Plan, resolve_fp8
from dsv4.parallel.state import ParallelGroups, init_distributed

from .checkpoint import CheckpointError, claim_run_dir, load_checkpoint, resolve_resume, save_checkpoint
from .data import build_data
from .preemption import StopRequest, requeue_slurm_job
from .flops import device_peak_flops, training_flops_per_token
from .metrics import Monitor, write_run_record
from .schedules import learning_rate, mtp_loss_weight

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients became NaN/Inf and the run was told to stop (run.on_nan=stop)."""


@dataclass
class TrainResult:
    """What a run did: per-step metrics (rank 0's view) and the last validation loss."""

    run_dir: str
    history: list = field(default_factory=list)  # one dict per optimizer step
    valid_loss: Optional[float] = None
    skipped_steps: int = 0
    evaluations: dict = field(default_factory=dict)  # step -> validation metrics of the evaluation at that step
    stopped_by: Optional[str] = None  # the signal that stopped the run before run.steps (a checkpoint was saved)
    chunks: list = field(default_factory=list, repr=False)  # the trained model chunks of this rank


# --- build ---------------------------------------------------------------------------------------------------------

def build_model(cfg: DSV4Config, groups: ParallelGroups) -> list:
    """This rank's model chunks (one per virtual pipeline stage), wrapped in megatron-core's DDP.

    DDP keeps the gradients in contiguous fp32 buffers (`main_grad`) and reduces them over the data-parallel
    group(s): all-reduce, or reduce-scatter with the distributed optimizer (ZeRO-1), overlapped with the backward
    pass in buckets when `parallel.overlap_grad_reduce` is set."""
    p = cfg.parallel
    fp8 = fp8_plan(cfg)
    chunks = [DSV4Model(cfg.model, groups.tp, params_dtype=cfg.precision.torch_params_dtype(), fp8=fp8,
                        ep_group=groups.ep if p.ep > 1 else None, etp_group=groups.etp if p.etp > 1 else None,
                        sequence_parallel=p.sp, stage=stage, seed=cfg.run.seed,
                        recompute=p.recompute == "block").train()
              for stage in pipeline_stages(cfg.model.num_layers, p.pp, groups.pp_rank, p.vpp, p.pp_layers)]
    # Muon shards its state by whole tensors itself (dsv4.optim.distributed): DDP all-reduces whole gradients.
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=p.overlap_grad_reduce,
                                               use_distributed_optimizer=p.distributed_optimizer
                                               and cfg.optim.name != "muon")
    # Only the first chunk gets buckets (megatron's convention: later chunks' reduction is not overlapped).
    wrapped = [DDP(chunk.config, ddp_config, chunk, disable_bucketing=i > 0) for i, chunk in enumerate(chunks)]
    if p.overlap_grad_reduce:
        # The schedule holds the reduction back until each chunk's last micro-batch, then starts it bucket by bucket.
        one = len(wrapped) == 1
        config = chunks[0].config
        config.no_sync_func = wrapped[0].no_sync if one else [c.no_sync for c in wrapped]
        config.grad_sync_func = wrapped[0].start_grad_sync if one else [c.start_grad_sync for c in wrapped]
    return wrapped


def build_optimizer(chunks: list, cfg: DSV4Config, groups: Optional[ParallelGroups] = None):
    """optim.name=adamw: megatron-core's optimizer over the chunks: AdamW (torch's, as megatron falls back to it
    without TransformerEngine/apex), fp32 master weights for bf16 parameters, state sharded over the data-parallel
    ranks with the distributed optimizer. Separate optimizers for dense and expert parameters (they reduce over
    different groups), chained. Two parameter groups each: decayed matrices, and the rest without decay.

    optim.name=muon: V4's Muon + AdamW (dsv4.optim.distributed.DistributedMuon; `groups` needed), its state sharded
    over the data-parallel replicas by whole tensors when parallel.distributed_optimizer is set."""
    o = cfg.optim
    if o.name == "muon":
        named = [(n, p) for c in chunks for n, p in unwrap(c).named_parameters()]
        return DistributedMuon(named, cfg.model, groups, lr=o.lr, weight_decay=o.weight_decay,
                               betas=(o.beta1, o.beta2), eps=o.eps, momentum=o.muon_momentum,
                               nesterov=o.muon_nesterov, ns=o.muon_ns, rms_scale=o.muon_rms_scale,
                               ns_dtype=DTYPES[o.muon_ns_dtype],
                               sharded=cfg.parallel.distributed_optimizer)
    params_dtype = cfg.precision.torch_params_dtype()
    config = OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                             adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.grad_clip,
                             bf16=params_dtype == torch.bfloat16, params_dtype=params_dtype,
                             use_distributed_optimizer=cfg.parallel.distributed_optimizer)
    plain = ParamKey(with_name_predicate=ParamWithNamePredicate(
        name="no_weight_decay", fn=lambda param, name: no_weight_decay(name, param)))
    return get_megatron_optimizer(config, chunks, config_overrides={plain: ParamGroupOverride(wd_mult=0.0)})


def unwrap(chunk) -> DSV4Model:
    """The DSV4Model inside a DDP wrapper (or the model itself)."""
    return getattr(chunk, "module", chunk)


# --- one step ------------------------------------------------------------------------------------------------------

def to_device(batch: dict, device: torch.device) -> dict:
    """The loader's CPU tensors on the model's device."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def expert_loads(chunks: list) -> dict:
    """max / mean tokens per expert of each score-routed MoE layer on this rank, from the counts of the step."""
    loads = {}
    for chunk in chunks:
        model = unwrap(chunk)
        for name, router in model.named_modules():
            if isinstance(router, Router) and not router.is_hash and router.tokens_per_expert.sum() > 0:
                count = router.tokens_per_expert
                layer = model.global_name(name).removesuffix(".ffn.gate")
                loads[f"moe/load_max_over_mean/{layer}"] = (count.max() / count.mean()).item()
    return loads


def _run_schedule(chunks: list, batches: list, cfg: DSV4Config, forward_only: bool, stats: bool = False,
                  **forward_kwargs) -> tuple:
    """Forward (and backward) of every micro-batch through megatron-core's schedule for this layout (no
    pipelining, 1F1B, or interleaved 1F1B). Returns the last stage's per-micro-batch loss records (empty on other
    stages) and this rank's summed auxiliary losses. `stats`: the first micro-batch also records diagnostics."""
    aux_sums: dict = defaultdict(float)
    device = next(chunks[0].parameters()).device
    n_micro = len(batches)
    calls: dict = defaultdict(int)

    def forward_step(data_iterator, chunk):
        batch = to_device(next(data_iterator), device)
        first = calls[id(chunk)] == 0
        calls[id(chunk)] += 1
        out = chunk(batch["input_ids"], batch.get("labels"), batch.get("loss_mask"),
                    document_ids=batch.get("document_ids"), record_stats=stats and first, **forward_kwargs)
        for key, value in unwrap(chunk).aux_values.items():
            aux_sums[key] += value.item()
        if not isinstance(out, ModelOutput):
            return out, None

        def loss_func(loss):
            # Copies: the schedule divides the returned loss in place by the number of micro-batches.
            record = {"loss": loss.detach().clone(), "lm_loss": out.lm_loss.detach().clone()}
            if out.mtp_losses:
                record["mtp_loss"] = torch.stack(out.mtp_losses).mean().detach()
            return loss, record

        return out.loss, loss_func

    for chunk in chunks:
        unwrap(chunk).loss_scale = 1.0 / n_micro
    iterators = [iter(batches) for _ in chunks]
    records = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=n_micro,
        seq_length=cfg.data.seq_length,
        # The pipeline carries the n residual streams of mHC: [s(/tp), b * n, d] per micro-batch.
        micro_batch_size=cfg.data.micro_batch_size * cfg.model.hc_mult, forward_only=forward_only)
    return records, aux_sums


def _step_losses(records: list, aux_sums: dict, n_micro: int, groups: ParallelGroups, device) -> dict:
    """The step's mean losses over all micro-batches and data-parallel replicas, the same on every rank: the LM and
    MTP losses come from the last pipeline stage, auxiliary losses are summed over the stages."""
    keys = ["loss", "lm_loss", "mtp_loss", "indexer_loss", "balance_loss"]
    values = torch.zeros(len(keys), dtype=torch.float64, device=device)
    for record in records:  # the last stage's total includes its own auxiliary losses
        for i, key in enumerate(keys[:3]):
            if key in record:
                values[i] += record[key].double()
    values[0] += aux_sums.get("total", 0.0)  # the earlier stages' auxiliary losses
    values[3] += aux_sums.get("indexer", 0.0)
    values[4] += aux_sums.get("balance", 0.0)
    seen = torch.tensor([any("mtp_loss" in r for r in records), "indexer" in aux_sums, "balance" in aux_sums],
                        dtype=torch.float64, device=device)
    values = torch.cat([values, seen])
    if groups.pp_size > 1:
        dist.all_reduce(values, group=groups.pp)
    if groups.dp_size > 1:
        dist.all_reduce(values, group=groups.dp)
    values, seen = values[:len(keys)] / (n_micro * groups.dp_size), values[len(keys):]
    seen = {k for k, flag in zip(("mtp_loss", "indexer_loss", "balance_loss"), seen.tolist()) if flag > 0}
    metrics = dict(zip(keys, values.tolist()))
    for key in ("mtp_loss", "indexer_loss", "balance_loss"):
        if key not in seen:
            del metrics[key]
    return metrics


def _set_schedule(optimizer, cfg: DSV4Config, lr: float) -> None:
    """This step's learning rate (and weight decay, per group's multiplier) on every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = cfg.optim.weight_decay * group.get("wd_mult", 1.0)


def _clip(optimizer, max_norm: float, total_norm: float) -> None:
    """Scale the main gradients of every (chained) optimizer by max_norm / total_norm when that is below 1."""
    if isinstance(optimizer, DistributedMuon):
        optimizer.clip_grads(max_norm, total_norm)
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = opt.get_parameters()
        if params:
            clip_grad_by_total_norm_fp32(params, max_norm=max_norm, total_norm=total_norm)


def _main_params(opt):
    """(model parameter, the main parameter megatron's optimizer `opt` updates for it) pairs: an fp32 shard of it
    under the distributed optimizer, an fp32 copy of a bf16 parameter, or the fp32 parameter itself."""
    if isinstance(opt, DistributedOptimizer):
        yield from zip(chain(*opt.model_float16_groups), chain(*opt.shard_fp32_from_float16_groups))
        yield from zip(chain(*opt.model_fp32_groups), chain(*opt.shard_fp32_groups))
    elif hasattr(opt, "float16_groups"):  # Float16OptimizerWithFloat16Params
        yield from zip(chain(*opt.float16_groups), chain(*opt.fp32_from_float16_groups))
        yield from ((p, p) for p in chain(*opt.fp32_from_fp32_groups))
    elif opt.optimizer is not None:  # FP32Optimizer: the model parameters are the main parameters
        yield from ((p, p) for group in opt.optimizer.param_groups for p in group["params"])


def leave_out_frozen(optimizer) -> None:
    """Keep the parameters frozen this step (`requires_grad` off: the idle indexers in the dense phase, everything
    but the indexers in the indexer warm-up, `DSV4Model.set_attention_phase`) out of the update and out of the
    gradient norm and clipping.

    Why: megatron's DDP keeps a `main_grad` buffer for a frozen parameter (zero, as nothing flows into it), and its
    optimizers hand it to AdamW as the gradient, so weight decay and the moments would still move the tensor (and
    its step count grow). torch's AdamW (and apex/TE FusedAdam) skip a parameter whose `.grad` is None: no decay,
    no moment or step update. megatron's gradient norm and clipping read only the `.grad`s that are set, so the norm
    is that of the parameters being trained. Call it after `prepare_grads` (which sets every main `.grad`).
    DistributedMuon reads `main_grad` itself and skips frozen tensors in its own step, norm and clipping."""
    if isinstance(optimizer, DistributedMuon):
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for model_param, main in _main_params(opt):
            if not model_param.requires_grad:
                main.grad = None


def relearn_overlapped_reduction(chunks: list, cfg: DSV4Config, step: int) -> None:
    """Under parallel.overlap_grad_reduce: make megatron DDP learn again which parameters get gradients, in the
    phases that freeze some (dense, indexer warm-up) and at every phase change.

    Why: megatron's bucket groups record, in the first step, which parameters' gradient hooks fire, then launch a
    bucket's reduction during backward once exactly those have fired (and assert at the next reset that every
    parameter of the group fired). Frozen tensors fire none, and the set changes with the phase. A bucket group
    still "in its first batch" reduces after backward instead (`finish_grad_sync`): the same sums, not overlapped.
    So while a phase freezes tensors (and on the first step of a new phase) the groups' record is cleared and they
    stay in their first batch; from the second sparse step on, the reduction overlaps with backward again. Call it
    before `zero_grad_buffer` (whose reset would check the record)."""
    if not cfg.parallel.overlap_grad_reduce:
        return
    phase = cfg.model.attention_phase(step)
    if phase == "sparse" and (step == 0 or cfg.model.attention_phase(step - 1) == "sparse"):
        return
    for chunk in chunks:
        for group in [*chunk.bucket_groups, *chunk.expert_parallel_bucket_groups]:
            group.per_param_grad_ready_counts = {}
            group.golden_per_param_grad_ready_counts = {}
            group.is_first_batch = True


def _optimizer_step(optimizer, chunks: list) -> None:
    """Update the parameters. megatron-core 0.16.1 chains a dense and an expert DistributedOptimizer, and each one's
    step all-gathers the parameters of every bucket (dense and expert) afterwards: twice ZeRO-1's parameter
    all-gather per step (measured, bench/RESULTS.md). Here each one updates its shard, then the chunks gather once."""
    inner = getattr(optimizer, "chained_optimizers", None)
    if (not inner or not all(isinstance(o, DistributedOptimizer) for o in inner)
            or any(o.ddp_config.overlap_param_gather or o.ddp_config.use_megatron_fsdp for o in inner)):
        optimizer.step_with_ready_grads()
        return
    for opt in inner:
        MixedPrecisionOptimizer.step_with_ready_grads(opt)  # the update, without DistributedOptimizer's gather
    for chunk in chunks:
        chunk.start_param_sync()


def train_step(chunks: list, optimizer, batches: list, cfg: DSV4Config, groups: ParallelGroups, step: int) -> dict:
    """One optimizer step over the micro-batches of a global batch; returns its metrics.

    forward/backward of every micro-batch (megatron-core schedule) -> gradient finalisation (data-parallel
    reduction, tensor-parallel partial sums, shared embedding) -> frozen tensors left out (`leave_out_frozen`: the
    indexer warm-up) -> gradient norm -> non-finite check -> clip ->
    optimizer step (parameters all-gathered again under the distributed optimizer) -> expert-bias update.

    A non-finite loss or gradient norm (on any rank) skips the update (run.on_nan=skip) or raises
    NonFiniteLossError (run.on_nan=stop). Either way no parameter, optimizer state or expert bias changes.
    """
    lr = learning_rate(cfg.optim, step, cfg.run.steps)
    _set_schedule(optimizer, cfg, lr)
    w_mtp = mtp_loss_weight(cfg.optim, cfg.model.mtp_loss_weight, step, cfg.run.steps)
    relearn_overlapped_reduction(chunks, cfg, step)
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    device = next(chunks[0].parameters()).device
    records, aux_sums = _run_schedule(chunks, batches, cfg, forward_only=False, mtp_loss_weight=w_mtp)
    finalize_grads(chunks, groups)
    metrics = _step_losses(records, aux_sums, len(batches), groups, device)
    optimizer.prepare_grads()
    leave_out_frozen(optimizer)
    norm = float(optimizer.get_grad_norm())
    finite = torch.tensor([float(math.isfinite(metrics["loss"]) and math.isfinite(norm))], device=device)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    tokens = sum(b["input_ids"].numel() for b in batches) * groups.dp_size
    metrics.update(lr=lr, grad_norm=norm, mtp_weight=w_mtp, tokens=tokens, skipped=finite.item() == 0)
    if metrics["skipped"]:
        for router in (m for c in chunks for m in unwrap(c).modules() if isinstance(m, Router) and not m.is_hash):
            router.tokens_per_expert.zero_()  # a bad step's routing must not steer the bias
        if cfg.run.on_nan == "stop":
            raise NonFiniteLossError(
                f"step {step + 1}: non-finite loss {metrics['loss']} or gradient norm {metrics['grad_norm']}; "
                f"lower optim.lr, raise optim.warmup_steps, or set run.on_nan=skip to skip such steps")
        return metrics
    if cfg.optim.grad_clip > 0:
        _clip(optimizer, cfg.optim.grad_clip, norm)
    _optimizer_step(optimizer, chunks)
    metrics.update(expert_loads(chunks))
    for chunk in chunks:
        update_expert_bias(unwrap(chunk), cfg.model.bias_update_rate, groups.tp_dp)
    return metrics


@torch.no_grad()
def evaluate(chunks: list, batches, cfg: DSV4Config, groups: ParallelGroups) -> dict:
    """Mean LM loss (and perplexity) over the validation micro-batches of every data-parallel rank, each weighted by
    its loss tokens (a padding micro-batch, with a zero loss mask, counts for nothing: `data.valid`); the first
    also measures the indexer's recall of dense attention's top-k and the mHC composite gain (combined over the
    pipeline stages)."""
    batches = list(batches)
    tokens = [float(b["loss_mask"].sum()) for b in batches]  # the last stage's records come in this order
    for chunk in chunks:
        chunk.eval()
    device = next(chunks[0].parameters()).device
    records, _ = _run_schedule(chunks, batches, cfg, forward_only=True, stats=True)
    parts = [(unwrap(c).stage.vp_stage * groups.pp_size + groups.pp_rank, unwrap(c).stats_parts) for c in chunks]
    for chunk in chunks:
        chunk.train()
    loss = torch.tensor([sum(r["lm_loss"].item() * n for r, n in zip(records, tokens)),
                         sum(n for _, n in zip(records, tokens))], dtype=torch.float64, device=device)
    dist.all_reduce(loss, group=groups.pp)  # only the last stage holds records
    dist.all_reduce(loss, group=groups.dp)
    mean = (loss[0] / loss[1].clamp_min(1)).item()
    if groups.pp_size > 1:
        gathered = [None] * groups.pp_size
        dist.all_gather_object(gathered, parts, group=groups.pp)
        parts = [p for rank_parts in gathered for p in rank_parts]
    stats = combine_stats([p for _, p in sorted(parts, key=lambda vp: vp[0])])
    return {"valid/lm_loss": mean, "valid/perplexity": math.exp(min(mean, 50.0)),
            **{f"valid/{k}": v for k, v in stats.items()}}


# --- the run -------------------------------------------------------------------------------------------------------

def train(cfg: DSV4Config, run_dir: Optional[str] = None) -> TrainResult:
    """Train `cfg.run.steps` optimizer steps; `cfg` must be validated (compose_config / to_config do it).

    The stop-signal handlers (run.stop_signals, and SIGINT) are installed first, so that a signal during start-up
    (SLURM may warn early) is not fatal: it stops the run after its first step, with a checkpoint; a Ctrl-C during
    start-up stops it before the first step."""
    stop = StopRequest(cfg.run.stop_signals)
    try:
        with contextlib.ExitStack() as cleanup:  # what _train holds until it ends: the run folder's lock
            return _train(cfg, run_dir, stop, cleanup)
    finally:
        stop.restore()


def fp8_plan(cfg: DSV4Config) -> Optional[Fp8Plan]:
    """The FP8 plan of `precision.fp8` on this machine (None without FP8), or a ConfigError saying what is missing."""
    pr = cfg.precision
    return resolve_fp8(pr.fp8, pr.fp8_backend, pr.fp8_modules, pr.fp8_block)


def _train(cfg: DSV4Config, run_dir: Optional[str], stop: StopRequest, cleanup: contextlib.ExitStack) -> TrainResult:
    p = cfg.parallel
    fp8_plan(cfg)  # precision.fp8 this machine cannot run: stop before any process group or data is touched
    groups = init_distributed(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, vpp=p.vpp,
                              rendezvous_timeout_s=cfg.cluster.rendezvous_timeout_s,
                              collective_timeout_s=cfg.cluster.collective_timeout_s)
    run_dir = run_dir or cfg.run.output_dir
    rank0 = dist.get_rank() == 0
    cleanup.enter_context(claim_run_dir(run_dir))  # one run per folder; before anything is written to it
    chunks = build_model(cfg, groups)
    optimizer = build_optimizer(chunks, cfg, groups)
    data = build_data(cfg, dp_rank=groups.dp_rank, dp_size=groups.dp_size)
    start = _resume(cfg, run_dir, chunks, optimizer, data, groups)  # before anything is written to the run folder
    if rank0:
        write_run_record(run_dir, cfg)
        # The run's own copy of its tokenizer, which dsv4-export writes beside the exported weights.
        run_tokenizer = os.path.join(os.path.abspath(run_dir), "tokenizer.json")
        if data.tokenizer.path != run_tokenizer:
            shutil.copyfile(data.tokenizer.path, run_tokenizer)
    monitor = Monitor(run_dir, cfg.run.steps, enabled=rank0, progress_bar=cfg.run.progress_bar, start_step=start)
    n_micro = cfg.data.global_batch_size // (cfg.data.micro_batch_size * groups.dp_size)
    peak = device_peak_flops()
    n_params = sum(t.numel() for c in chunks for t in c.parameters())
    monitor.message(f"dsv4-train: {n_params:,} parameters on rank 0 (tp={p.tp} pp={p.pp} vpp={p.vpp} ep={p.ep} "
                    f"etp={p.etp} dp={groups.dp_size}), {cfg.run.steps} steps of "
                    f"{cfg.data.global_batch_size} x {cfg.data.seq_length} tokens, run folder {run_dir}")
    plan = fp8_plan(cfg)
    monitor.message(f"precision: {str(cfg.precision.torch_params_dtype()).replace('torch.', '')} parameters" + (
        f", FP8 GEMMs ({plan.recipe}, {plan.backend}) for {', '.join(plan.modules)}" if plan else ""))
    if isinstance(optimizer, DistributedMuon):
        monitor.message("optimizer: Muon + AdamW, parameter groups of rank 0:\n" + optimizer.summary())
    result = TrainResult(run_dir=run_dir, chunks=chunks)
    skipped_in_a_row = 0
    train_iter = iter(data.train)
    if start:
        left = f"{cfg.run.steps - start} steps to go" if start < cfg.run.steps else "nothing left to train"
        monitor.message(f"resumed at step {start} ({data.train.consumed_samples} samples consumed), {left}")
    saves = AsyncCallsQueue() if cfg.run.async_save else None
    device = next(chunks[0].parameters()).device
    try:
        if stop.agreed(device) == signal.SIGINT:  # Ctrl-C during start-up: nothing trained, nothing to save
            result.stopped_by = "SIGINT"
            monitor.message(f"interrupted (SIGINT) during start-up: stopped before step {start + 1}, nothing saved")
            return result
        for step in range(start, cfg.run.steps):
            t0 = time.perf_counter()
            phase = [unwrap(c).set_step(step) for c in chunks][0]
            batches = [next(train_iter) for _ in range(n_micro)]
            metrics = train_step(chunks, optimizer, batches, cfg, groups, step)
            elapsed = time.perf_counter() - t0
            flops = training_flops_per_token(cfg.model, cfg.data.seq_length, phase) * metrics["tokens"]
            metrics.update(step_time=elapsed, tokens_per_s=metrics["tokens"] / elapsed,
                           tflops_per_device=flops / elapsed / dist.get_world_size() / 1e12)
            if peak:
                metrics["mfu"] = flops / elapsed / dist.get_world_size() / peak
            skipped_in_a_row = skipped_in_a_row + 1 if metrics["skipped"] else 0
            result.skipped_steps += int(metrics["skipped"])
            if skipped_in_a_row >= cfg.run.max_skipped_steps:
                raise NonFiniteLossError(f"{skipped_in_a_row} consecutive steps had a non-finite loss; lower "
                                         f"optim.lr or check the data (run.max_skipped_steps={cfg.run.max_skipped_steps})")
            result.history.append(metrics)
            done = step + 1
            monitor.record(done, metrics)
            if done % cfg.run.log_interval == 0 or done == cfg.run.steps or metrics["skipped"]:
                monitor.scalars(done, {_tb_name(k): v for k, v in metrics.items()
                                       if k not in ("tokens", "skipped")})
                note = " (skipped: non-finite)" if metrics["skipped"] else ""
                monitor.progress(done, f"loss {metrics['loss']:.4f} lm {metrics['lm_loss']:.4f} lr {metrics['lr']:.2e} "
                                       f"{metrics['tokens_per_s']:.0f} tok/s phase {phase}{note}",
                                 metrics["loss"])
            if data.valid is not None and (done == cfg.run.steps or (cfg.run.eval_interval
                                                                       and done % cfg.run.eval_interval == 0)):
                valid = evaluate(chunks, data.valid(cfg.run.eval_iters), cfg, groups)
                result.valid_loss = valid["valid/lm_loss"]
                result.evaluations[done] = valid
                monitor.scalars(done, valid)
                monitor.message(f"step {done}: " + " ".join(f"{k.removeprefix('valid/')} {v:.4f}"
                                                            for k, v in valid.items()))
            if saves is not None:
                saves.maybe_finalize_async_calls(blocking=False)  # publish background saves that have finished
            saved = cfg.run.save_interval and (done % cfg.run.save_interval == 0 or done == cfg.run.steps)
            if saved:
                path = save_checkpoint(run_dir, done, chunks, optimizer, data.train, cfg, groups, saves)
                monitor.message(f"step {done}: checkpoint {path}" + (" (writing in the background)" if saves else ""))
            signum = stop.agreed(device)  # SLURM's USR1 warning / SIGTERM, on any rank: save and stop
            if signum and done < cfg.run.steps:
                result.stopped_by = signal.Signals(signum).name
                if not saved:
                    path = save_checkpoint(run_dir, done, chunks, optimizer, data.train, cfg, groups, saves)
                if saves is not None:
                    saves.maybe_finalize_async_calls(blocking=True)
                note = ""
                if result.stopped_by.removeprefix("SIG") in cfg.run.requeue_on and dist.get_rank() == 0:
                    note = "; " + requeue_slurm_job()
                monitor.message(f"step {done}: stopping on {result.stopped_by}, checkpoint {path}{note}")
                break
        if saves is not None:
            saves.maybe_finalize_async_calls(blocking=True)
    finally:
        monitor.close()
    return result


def _resume(cfg: DSV4Config, run_dir: str, chunks: list, optimizer, data, groups: ParallelGroups) -> int:
    """Load the checkpoint run.resume names (rank 0 decides which, every rank loads its part); returns the step to
    continue from (0: a fresh start). Raises CheckpointError on every rank."""
    choice = [None, None]
    if dist.get_rank() == 0:
        try:
            choice[0] = resolve_resume(cfg.run.resume, run_dir)
        except CheckpointError as e:
            choice[1] = str(e)
    dist.broadcast_object_list(choice, src=0)
    if choice[1]:
        raise CheckpointError(choice[1])
    if choice[0] is None:
        return 0
    return load_checkpoint(choice[0], chunks, optimizer, data.train, cfg, groups)


def _tb_name(key: str) -> str:
    """TensorBoard tag of a metric: losses under loss/, the rest under train/ (moe/ tags keep theirs)."""
    if key.startswith("moe/"):
        return key
    return f"loss/{key}" if key.endswith("loss") else f"train/{key}"
