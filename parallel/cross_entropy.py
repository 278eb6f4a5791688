"""Cross entropy over vocabulary-parallel logits, with the tensor-parallel group passed in.

megatron-core's `vocab_parallel_cross_entropy` reads the global tensor-parallel group; this is the same
computation (its `VocabParallelCrossEntropy` math helpers) with the group as an argument, so the model never
reaches for a global.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        # Megatron's helpers work in place on fp32 logits; copy so the caller's logits stay intact.
        logits, logits_max = VocabParallelCrossEntropy.calculate_logits_max(logits.to(torch.float32, copy=True))
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        part = logits.shape[-1]
        start = dist.get_rank(group) * part
        target_mask, masked_target_1d, predicted, sum_exp, exp_logits = (
            VocabParallelCrossEntropy.calculate_predicted_logits(logits, target, logits_max, start, start + part))
        dist.all_reduce(predicted, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
        softmax, loss = VocabParallelCrossEntropy.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
        ctx.save_for_backward(softmax, target_mask, masked_target_1d)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        softmax, target_mask, masked_target_1d = ctx.saved_tensors
        grad_2d, arange_1d, update, grad_input = VocabParallelCrossEntropy.prepare_gradient_calculation_operands(
            softmax, target_mask)
        grad_input = VocabParallelCrossEntropy.calculate_gradients(grad_2d, arange_1d, masked_target_1d, update,
                                                                   grad_input, grad_output)
        return grad_input, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 group: dist.ProcessGroup) -> torch.Tensor:
    """Per-token loss [...] from logits [..., vocab/tp] split over `group` and integer targets [...]."""
    return _VocabParallelCE.apply(logits, target, group)
