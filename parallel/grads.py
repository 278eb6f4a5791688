"""Gradient finalisation after the backward passes of a step, before the optimizer: the one place where the
gradients of all model chunks become those of the whole model.

    1. data parallel: megatron DDP's reduce(-scatter) of the gradient buffers over the data-parallel groups
       (expert parameters over the expert-data-parallel group), when the chunks are wrapped in DDP; for plain
       chunks (tests, tools) the same all-reduce here. Either way the result is the mean over the dp replicas:
       a routed expert's gradient already sums the tokens sent to it, so it is summed over the ranks holding the
       same expert slice (expert data parallel, which also spans the tensor-parallel peers when etp < tp) and
       divided by the same dp;
    2. tensor parallel: parameters marked `grad_sum_over_tp` (replicated, used inside a tensor-parallel region, or
       per-token under sequence parallelism: see dsv4.parallel.layers) hold partial gradients: summed over tp;
    3. pipeline parallel: the first stage's embedding and the last stage's copy (for MTP), marked
       `shared_embedding`, are summed over the embedding group so both stay equal.

Steps 2 and 3 are linear, so they commute with step 1; they run after it as in megatron-core (whose DDP keeps a
shared embedding in a bucket of its own, so both stages shard it alike).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["finalize_grads", "param_grad"]


def param_grad(p: torch.nn.Parameter) -> Optional[torch.Tensor]:
    """The gradient the optimizer will read: DDP accumulates into `main_grad`, plain modules into `grad`."""
    return getattr(p, "main_grad", None) if hasattr(p, "main_grad") else p.grad


def _all_reduce_coalesced(grads: list, group: dist.ProcessGroup) -> None:
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def _average_plain(chunk: torch.nn.Module, groups) -> None:
    """Step 1 for a chunk without DDP: dense gradients all-reduced over dp, experts' over edp; both / dp."""
    dp = dist.get_world_size(groups.dp)
    for p in chunk.parameters():
        if p.grad is None:
            continue
        group = groups.dp if getattr(p, "allreduce", True) else groups.edp
        if dist.get_world_size(group) > 1:
            dist.all_reduce(p.grad, group=group)
        if dp > 1:
            p.grad /= dp


def finalize_grads(chunks: Iterable[torch.nn.Module], groups, force_all_reduce: bool = False) -> None:
    """Steps 1-3 of the module docstring for this rank's model chunks (DDP-wrapped or plain); `groups` is the
    rank's `dsv4.parallel.state.ParallelGroups`. `force_all_reduce`: all-reduce even under the distributed
    optimizer, so every rank holds whole gradients (for inspection; the optimizer only needs its shard)."""
    chunks = list(chunks)
    params = [p for chunk in chunks for p in chunk.parameters() if p.requires_grad]
    for chunk in chunks:
        if hasattr(chunk, "finish_grad_sync"):
            chunk.finish_grad_sync(force_all_reduce=force_all_reduce)
        else:
            _average_plain(chunk, groups)
    tp_group, embd_group = groups.tp, groups.embd
    if dist.get_world_size(tp_group) > 1:
        partial = [g for p in params if getattr(p, "grad_sum_over_tp", False) and (g := param_grad(p)) is not None]
        by_dtype: dict = {}
        for g in partial:
            by_dtype.setdefault(g.dtype, []).append(g)
        for grads in by_dtype.values():
            _all_reduce_coalesced(grads, tp_group)
    if embd_group is not None and dist.get_world_size(embd_group) > 1 and \
            dist.get_rank() in dist.get_process_group_ranks(embd_group):
        for p in params:
            if getattr(p, "shared_embedding", False) and (g := param_grad(p)) is not None:
                dist.all_reduce(g, group=embd_group)
