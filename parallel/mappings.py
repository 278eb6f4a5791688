"""Autograd-aware collectives over a process group passed in: gradient and value sums for tensor parallelism,
and the row exchange of expert parallelism.

megatron-core's `copy_to_` / `reduce_from_tensor_model_parallel_region` all-reduce `tensor.contiguous()` and
return the original tensor: for a non-contiguous tensor (a transposed gradient, say) the reduced copy is dropped
and the result is silently wrong. These two do the same job on a contiguous tensor they return.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


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
