"""Autograd-aware collectives over a process group passed in: gradient and value sums for tensor parallelism,
entering and leaving tensor-parallel regions (with or without sequence parallelism), and the row exchanges of
expert and expert-tensor parallelism.

megatron-core's `copy_to_` / `reduce_from_tensor_model_parallel_region` all-reduce `tensor.contiguous()` and
return the original tensor: for a non-contiguous tensor (a transposed gradient, say) the reduced copy is dropped
and the result is silently wrong. These two do the same job on a contiguous tensor they return.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region


class _SumGradients(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce (sum) the gradient over the group."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumValues(torch.autograd.Function):
    """Forward: all-reduce (sum) over the group. Backward: identity."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def sum_gradients_over(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """For a replicated tensor each rank uses only partly (its own heads): the full gradient is the group's sum."""
    return x if dist.get_world_size(group) == 1 else _SumGradients.apply(x, group)


def sum_values_over(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Partial results (over each rank's heads) -> their sum on every rank; the gradient passes through."""
    return x if dist.get_world_size(group) == 1 else _SumValues.apply(x, group)


class _AllToAll(torch.autograd.Function):
    """Forward: rows split `in_splits` go out, rows split `out_splits` come in. Backward: the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list, in_splits: list, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list, in_splits: list, group: dist.ProcessGroup) -> torch.Tensor:
    """Exchange rows of x over `group` (in_splits[r] rows to rank r, out_splits[r] from it), differentiably."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def enter_tp_region(x: torch.Tensor, group: dist.ProcessGroup, sequence_parallel: bool) -> torch.Tensor:
    """Activations [s(/tp), b, ...] entering a tensor-parallel region: replicated x passes through and its gradient
    is summed over the group (megatron's `copy_to_tensor_model_parallel_region`); under sequence parallelism this
    rank's part of the sequence is all-gathered, and the gradient reduce-scattered back."""
    if dist.get_world_size(group) == 1:
        return x
    if sequence_parallel:
        return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=group)
    return _SumGradients.apply(x, group)


def split_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Replicated [s, b, ...] -> this rank's part of the sequence; the gradient is all-gathered back."""
    if dist.get_world_size(group) == 1:
        return x
    return scatter_to_sequence_parallel_region(x, group=group)


def join_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's part of the sequence -> the replicated [s, b, ...] (all-gather); the gradient, the same on every
    rank, is split back."""
    if dist.get_world_size(group) == 1:
        return x
    return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=group)


def gather_rows(x: torch.Tensor, counts: list, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's rows (rank r holds counts[r] of them), differentiably: the backward sums each
    rank's gradient chunks back to the rank the rows came from (a reduce-scatter of uneven chunks)."""
    n = dist.get_world_size(group)
    if n == 1:
        return x
    mine = counts[dist.get_rank(group)]
    return all_to_all(x.repeat(n, *([1] * (x.dim() - 1))), counts, [mine] * n, group)


def reduce_scatter_rows(x: torch.Tensor, counts: list, group: dist.ProcessGroup) -> torch.Tensor:
    """The inverse pattern of `gather_rows`: every rank holds partial results for all rows (rank r's rows are the
    r-th chunk, counts[r] long); each rank receives its own rows summed over the group."""
    n = dist.get_world_size(group)
    if n == 1:
        return x
    mine = counts[dist.get_rank(group)]
    return all_to_all(x, [mine] * n, counts, group).view(n, mine, *x.shape[1:]).sum(0)
