"""The training loop: build, then one explicit step function repeated, with logging and evaluation.

    build:  config -> process groups -> model -> optimizer -> data -> run folder
    step:   attention phase for the step -> LR -> for each micro-batch: forward (LM + MTP + balance + indexer
            losses), backward -> data-parallel gradient average -> non-finite check -> clip -> optimizer step
            -> expert-bias update
    then:   log (TensorBoard, progress) -> evaluate every run.eval_interval steps
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from dsv4.conf.schema import DSV4Config
from dsv4.model.moe import Router, update_expert_bias
from dsv4.model.transformer import DSV4Model
from dsv4.parallel.state import ParallelGroups, init_distributed

from .data import build_data
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


# --- build ---------------------------------------------------------------------------------------------------------

def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Vectors (norm gains, mHC biases and scales, sinks) and the compressors' position biases are not decayed."""
    return param.dim() < 2 or name.endswith(".ape")


def build_optimizer(model: torch.nn.Module, cfg: DSV4Config) -> torch.optim.AdamW:
    """AdamW with two explicit parameter groups: decayed matrices, and everything else without decay."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        (plain if no_weight_decay(name, p) else decay).append(p)
    o = cfg.optim
    return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay, "name": "decay"},
                              {"params": plain, "weight_decay": 0.0, "name": "no_decay"}],
                             lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


def build_model(cfg: DSV4Config, groups: ParallelGroups) -> DSV4Model:
    torch.manual_seed(cfg.run.seed)
    return DSV4Model(cfg.model, groups.tp, params_dtype=DTYPES[cfg.precision.params_dtype],
                     ep_group=groups.ep if cfg.parallel.ep > 1 else None).train()


# --- one step ------------------------------------------------------------------------------------------------------

def grad_norm(model: torch.nn.Module, groups: ParallelGroups) -> torch.Tensor:
    """Global L2 norm of the gradients: tensor-parallel shards summed over the tensor-parallel group, routed experts
    over the expert-parallel group (each rank holds its own), replicated tensors counted once."""
    zero = torch.zeros((), device=next(model.parameters()).device)
    sums = {"tp": zero, "ep": zero, "replicated": zero}
    for p in model.parameters():
        if p.grad is not None:
            kind = ("tp" if getattr(p, "tensor_model_parallel", False)
                    else "ep" if not getattr(p, "allreduce", True) else "replicated")
            sums[kind] = sums[kind] + p.grad.detach().float().square().sum()
    for kind, group in (("tp", groups.tp), ("ep", groups.ep)):
        if dist.get_world_size(group) > 1:
            dist.all_reduce(sums[kind], group=group)
    return (sums["tp"] + sums["ep"] + sums["replicated"]).sqrt()


def to_device(batch: dict, device: torch.device) -> dict:
    """The loader's CPU tensors on the model's device."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def average_gradients(model: torch.nn.Module, groups: ParallelGroups) -> None:
    """Data parallelism: every replica applies the mean gradient over the dp data shards (megatron's DDP replaces
    this later). A routed expert's gradient already sums the tokens its expert-parallel group sent it, so it is
    summed over the ranks holding the same expert (expert data parallel) and divided by the same dp."""
    dp = dist.get_world_size(groups.dp)
    if dp == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=groups.dp if getattr(p, "allreduce", True) else groups.edp)
            p.grad /= dp


def expert_loads(model: DSV4Model) -> dict:
    """max / mean tokens per expert of each score-routed MoE layer, from the counts of the current step."""
    loads = {}
    for name, router in model.named_modules():
        if isinstance(router, Router) and not router.is_hash and router.tokens_per_expert.sum() > 0:
            count = router.tokens_per_expert
            loads[f"moe/load_max_over_mean/{name.removesuffix('.ffn.gate')}"] = (count.max() / count.mean()).item()
    return loads


def train_step(model: DSV4Model, optimizer: torch.optim.Optimizer, batches: list, cfg: DSV4Config,
               groups: ParallelGroups, step: int) -> dict:
    """One optimizer step over the micro-batches of a global batch; returns its metrics.

    A non-finite loss or gradient norm (on any rank) skips the update (run.on_nan=skip) or raises
    NonFiniteLossError (run.on_nan=stop). Either way no parameter, optimizer state or expert bias changes.
    """
    lr = learning_rate(cfg.optim, step, cfg.run.steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    w_mtp = mtp_loss_weight(cfg.optim, cfg.model.mtp_loss_weight, step, cfg.run.steps)
    optimizer.zero_grad(set_to_none=True)
    sums: dict = defaultdict(float)
    tokens = 0
    device = next(model.parameters()).device
    for batch in batches:
        batch = to_device(batch, device)
        out = model(batch["input_ids"], batch["labels"], batch["loss_mask"], mtp_loss_weight=w_mtp,
                    document_ids=batch.get("document_ids"))
        (out.loss / len(batches)).backward()
        sums["loss"] += out.loss.item()
        sums["lm_loss"] += out.lm_loss.item()
        if out.mtp_losses:
            sums["mtp_loss"] += torch.stack(out.mtp_losses).mean().item()
        if out.indexer_loss is not None:
            sums["indexer_loss"] += out.indexer_loss.item()
        if out.balance_loss is not None:
            sums["balance_loss"] += out.balance_loss.item()
        tokens += batch["input_ids"].numel()
    metrics = {k: v / len(batches) for k, v in sums.items()}
    if groups.dp_size > 1:  # report the global batch's losses, not this replica's share
        values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=device)
        dist.all_reduce(values, group=groups.dp)
        metrics = dict(zip(metrics, (values / groups.dp_size).tolist()))
    average_gradients(model, groups)
    norm = grad_norm(model, groups)
    finite = torch.tensor([float(math.isfinite(metrics["loss"]) and torch.isfinite(norm).item())], device=device)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    metrics.update(lr=lr, grad_norm=norm.item(), mtp_weight=w_mtp, tokens=tokens * groups.dp_size,
                   skipped=finite.item() == 0)
    if metrics["skipped"]:
        optimizer.zero_grad(set_to_none=True)
        for router in (m for m in model.modules() if isinstance(m, Router) and not m.is_hash):
            router.tokens_per_expert.zero_()  # a bad step's routing must not steer the bias
        if cfg.run.on_nan == "stop":
            raise NonFiniteLossError(
                f"step {step + 1}: non-finite loss {metrics['loss']} or gradient norm {metrics['grad_norm']}; "
                f"lower optim.lr, raise optim.warmup_steps, or set run.on_nan=skip to skip such steps")
        return metrics
    if cfg.optim.grad_clip > 0:
        scale = (cfg.optim.grad_clip / (norm + 1e-6)).clamp(max=1.0)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.dtype))
    optimizer.step()
    metrics.update(expert_loads(model))
    update_expert_bias(model, cfg.model.bias_update_rate, groups.dp)
    return metrics


@torch.no_grad()
def evaluate(model: DSV4Model, batches, groups: ParallelGroups) -> dict:
    """Mean LM loss (and perplexity) over validation micro-batches; the first also measures the indexer's recall of
    dense attention's top-k and the mHC composite gain."""
    model.eval()
    total, count, stats = 0.0, 0, {}
    device = next(model.parameters()).device
    for i, batch in enumerate(batches):
        batch = to_device(batch, device)
        out = model(batch["input_ids"], batch["labels"], batch["loss_mask"], record_stats=i == 0,
                    document_ids=batch.get("document_ids"))
        if i == 0:
            stats = out.stats
        total += out.lm_loss.item()
        count += 1
    model.train()
    loss = torch.tensor([total, float(count)], device=device)  # NCCL reduces device tensors only
    dist.all_reduce(loss, group=groups.dp)
    mean = (loss[0] / loss[1].clamp_min(1)).item()
    return {"valid/lm_loss": mean, "valid/perplexity": math.exp(min(mean, 50.0)),
            **{f"valid/{k}": v for k, v in stats.items()}}


# --- the run -------------------------------------------------------------------------------------------------------

def train(cfg: DSV4Config, run_dir: Optional[str] = None) -> TrainResult:
    """Train `cfg.run.steps` optimizer steps; `cfg` must be validated (compose_config / to_config do it)."""
    groups = init_distributed(tp=cfg.parallel.tp, ep=cfg.parallel.ep)
    run_dir = run_dir or cfg.run.output_dir
    rank0 = dist.get_rank() == 0
    model = build_model(cfg, groups)
    optimizer = build_optimizer(model, cfg)
    data = build_data(cfg, dp_rank=groups.dp_rank, dp_size=groups.dp_size)
    if rank0:
        write_run_record(run_dir, cfg)
    monitor = Monitor(run_dir, cfg.run.steps, enabled=rank0, progress_bar=cfg.run.progress_bar)
    n_micro = cfg.data.global_batch_size // (cfg.data.micro_batch_size * groups.dp_size)
    peak = device_peak_flops()
    n_params = sum(p.numel() for p in model.parameters())
    monitor.message(f"dsv4-train: {n_params:,} parameters on rank 0, {cfg.run.steps} steps of "
                    f"{cfg.data.global_batch_size} x {cfg.data.seq_length} tokens, run folder {run_dir}")
    result = TrainResult(run_dir=run_dir)
    skipped_in_a_row = 0
    train_iter = iter(data.train)
    try:
        for step in range(cfg.run.steps):
            t0 = time.perf_counter()
            phase = model.set_step(step)
            batches = [next(train_iter) for _ in range(n_micro)]
            metrics = train_step(model, optimizer, batches, cfg, groups, step)
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
            if done % cfg.run.log_interval == 0 or done == cfg.run.steps or metrics["skipped"]:
                monitor.scalars(done, {_tb_name(k): v for k, v in metrics.items()
                                       if k not in ("tokens", "skipped")})
                note = " (skipped: non-finite)" if metrics["skipped"] else ""
                monitor.progress(done, f"loss {metrics['loss']:.4f} lm {metrics['lm_loss']:.4f} lr {metrics['lr']:.2e} "
                                       f"{metrics['tokens_per_s']:.0f} tok/s phase {phase}{note}",
                                 metrics["loss"])
            if data.valid is not None and (done == cfg.run.steps or (cfg.run.eval_interval
                                                                       and done % cfg.run.eval_interval == 0)):
                valid = evaluate(model, data.valid(cfg.run.eval_iters), groups)
                result.valid_loss = valid["valid/lm_loss"]
                monitor.scalars(done, valid)
                monitor.message(f"step {done}: " + " ".join(f"{k.removeprefix('valid/')} {v:.4f}"
                                                            for k, v in valid.items()))
    finally:
        monitor.close()
    return result


def _tb_name(key: str) -> str:
    """TensorBoard tag of a metric: losses under loss/, the rest under train/ (moe/ tags keep theirs)."""
    if key.startswith("moe/"):
        return key
    return f"loss/{key}" if key.endswith("loss") else f"train/{key}"
