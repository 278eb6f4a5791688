"""The one place that chooses the implementation of the model's parallel linear layers and embedding.

Every projection of the model is built here, so switching the implementation is a change in this file only:
- megatron-core's local tensor-parallel layers (default);
- with `precision.fp8` and a module group of `precision.fp8_modules` (attention, indexer, experts): the same layers
  with their GEMMs in FP8 (`dsv4.parallel.fp8`: PyTorch's scaled_mm on Hopper, or the `emulate` backend), or, with
  the `te` backend, TransformerEngine's layers through megatron-core (`TEColumnParallelLinear`, `TERowParallelLinear`,
  `TELinear`), run under TE's FP8 autocast (`fp8_autocast`). The TE path is untested here: TransformerEngine cannot
  be installed on the project's CPU machines.

- column-parallel: output dim split over the tensor-parallel group (q up-projection, indexer heads, head/logits,
  shared expert);
- row-parallel: input dim split, output all-reduced, or reduce-scattered along the sequence under sequence
  parallelism (attention output projection, shared expert down-projection);
- replicated: small projections every tensor-parallel rank holds whole (low-rank q down-projection, the shared
  K=V head, compressors, router, mHC, norms).

Tensor-parallel regions (megatron's convention, with or without sequence parallelism): a region starts where the
activations enter replicated (no SP: `copy`, all-reduce of the gradient) or gathered along the sequence (SP:
all-gather, reduce-scatter of the gradient) and ends at a row-parallel layer. Inside a region every rank computes
*partial* gradients of whatever it uses from its own heads only; replicated parameters used inside a region are
marked `grad_sum_over_tp` and their gradients are summed over the tensor-parallel group once per step
(`dsv4.parallel.grads.finalize_grads`). Under SP the per-token parameters outside the regions (norms, mHC, router, MTP
projections) see only this rank's tokens and are marked the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    gather_from_sequence_parallel_region)
from torch import nn

from .fp8 import Fp8Plan, fp8_linear


@dataclass
class LayerContext:
    """What every parallel layer needs: megatron's config, the tensor-parallel group and the init std."""

    mp_config: ModelParallelConfig
    tp_group: dist.ProcessGroup
    init_std: float
    ep_group: Optional[dist.ProcessGroup] = None
    """Expert-parallel group the routed experts are spread over (None: every expert on this rank)."""
    etp_group: Optional[dist.ProcessGroup] = None
    """Expert-tensor-parallel group each routed expert's matrices are split over (None: whole experts)."""
    inner_config: Optional[ModelParallelConfig] = None
    """`mp_config` without sequence parallelism: for column layers whose input is already inside a region."""
    fp8: Optional[Fp8Plan] = None
    """FP8 GEMMs for the module groups it covers (None: every layer in its parameter dtype)."""

    def fp8_for(self, module: Optional[str]) -> Optional[Fp8Plan]:
        """The FP8 plan when module group `module` runs in FP8, else None."""
        return self.fp8 if self.fp8 is not None and self.fp8.covers(module) else None

    @property
    def sequence_parallel(self) -> bool:
        return bool(self.mp_config.sequence_parallel) and self.tp_size > 1

    @property
    def etp_size(self) -> int:
        return 1 if self.etp_group is None else dist.get_world_size(self.etp_group)

    @property
    def etp_rank(self) -> int:
        return 0 if self.etp_group is None else dist.get_rank(self.etp_group)

    @property
    def ep_size(self) -> int:
        return 1 if self.ep_group is None else dist.get_world_size(self.ep_group)

    @property
    def ep_rank(self) -> int:
        return 0 if self.ep_group is None else dist.get_rank(self.ep_group)

    @property
    def tp_size(self) -> int:
        return dist.get_world_size(self.tp_group)

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.tp_group)

    def init_method(self, std: Optional[float] = None):
        std = self.init_std if std is None else std
        return lambda w: nn.init.normal_(w, mean=0.0, std=std)


def make_layer_context(tp_group: dist.ProcessGroup, init_std: float, params_dtype: torch.dtype = torch.float32,
                       ep_group: Optional[dist.ProcessGroup] = None, *,
                       etp_group: Optional[dist.ProcessGroup] = None,
                       sequence_parallel: bool = False, fp8: Optional[Fp8Plan] = None) -> LayerContext:
    """Megatron's ModelParallelConfig for our layers.

    `sequence_parallel` (acts with more than one tensor-parallel rank): activations between tensor-parallel regions
    are split along the sequence over the tensor-parallel group.

    Weights are always initialised on the CPU, as the full (master) tensor sliced to this rank's part, from the
    torch generator: a model built with a given seed is the same on CPU and GPU and for every tensor-parallel size.
    The model moves itself to the GPU afterwards when there is one.
    """
    tp = dist.get_world_size(tp_group)
    mp_config = ModelParallelConfig(
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=params_dtype,
        use_cpu_initialization=True,
        perform_initialization=True,
    )
    inner = replace(mp_config, sequence_parallel=False)
    return LayerContext(mp_config, tp_group, init_std, ep_group, etp_group, inner, fp8)


class _Fp8ColumnParallelLinear(ColumnParallelLinear):
    """megatron's column-parallel layer with its GEMMs in FP8. Only the local computation changes: the input is
    all-gathered along the sequence (gradient reduce-scattered) or its gradient all-reduced exactly as megatron's
    own `linear_with_grad_accumulation_and_async_allreduce` does, through megatron's autograd collectives."""

    def __init__(self, *args, fp8: Fp8Plan, **kwargs):
        super().__init__(*args, **kwargs)
        self.fp8 = fp8

    def _forward_impl(self, input, weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                      sequence_parallel=False, tp_group=None, **_):
        if sequence_parallel:
            input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=tp_group)
        elif allreduce_dgrad:
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        return fp8_linear(input, weight, self.fp8)


class _Fp8RowParallelLinear(RowParallelLinear):
    """megatron's row-parallel layer with its GEMMs in FP8 (its reduction after the GEMM is megatron's)."""

    def __init__(self, *args, fp8: Fp8Plan, **kwargs):
        super().__init__(*args, **kwargs)
        self.fp8 = fp8

    def _forward_impl(self, input, weight, *args, **kwargs):
        return fp8_linear(input, weight, self.fp8)


class Fp8Linear(nn.Linear):
    """A bias-free replicated linear whose GEMMs run in FP8."""

    def __init__(self, in_features: int, out_features: int, fp8: Fp8Plan, dtype: torch.dtype):
        super().__init__(in_features, out_features, bias=False, dtype=dtype)
        self.fp8 = fp8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.fp8)


def _te_layers():
    """megatron-core's TransformerEngine layers (only with the te backend, which checked that TE imports)."""
    from megatron.core.extensions import transformer_engine as te_ext
    return te_ext


class ColumnLinear(nn.Module):
    """y = x W^T with W's rows (outputs) split over the tensor-parallel group. No bias (V4 has none).

    By default the layer starts a tensor-parallel region: its input is replicated (gradient all-reduced) or, under
    sequence parallelism, this rank's part of the sequence (all-gathered). With `input_in_region` the input is
    already inside a region: no communication, and the input's gradient is this rank's partial one.
    """

    def __init__(self, ctx: LayerContext, in_features: int, out_features: int, gather_output: bool = False,
                 std: Optional[float] = None, input_in_region: bool = False, fp8_module: Optional[str] = None):
        super().__init__()
        config = ctx.inner_config if input_in_region else ctx.mp_config
        fp8 = ctx.fp8_for(fp8_module)
        if fp8 is not None and fp8.backend == "te":
            if input_in_region:  # TE's layer has no "input already in the region" mode: a local GEMM on its input
                self.linear = _te_layers().TELinear(
                    in_features, out_features // ctx.tp_size, parallel_mode=None, config=config,
                    init_method=ctx.init_method(std), bias=False, skip_bias_add=False,
                    skip_weight_param_allocation=False, tp_group=ctx.tp_group)
            else:
                self.linear = _te_layers().TEColumnParallelLinear(
                    in_features, out_features, config=config, init_method=ctx.init_method(std),
                    gather_output=gather_output, bias=False, skip_bias_add=False, is_expert=False,
                    tp_group=ctx.tp_group)
            return
        kwargs = dict(config=config, init_method=ctx.init_method(std), bias=False, gather_output=gather_output,
                      tp_group=ctx.tp_group, disable_grad_reduce=input_in_region)
        self.linear = (ColumnParallelLinear(in_features, out_features, **kwargs) if fp8 is None else
                       _Fp8ColumnParallelLinear(in_features, out_features, fp8=fp8, **kwargs))

    @property
    def weight(self) -> nn.Parameter:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)[0]


class RowLinear(nn.Module):
    """y = x W^T with W's columns (inputs) split over the tensor-parallel group; ends a region: the output is
    all-reduced, or reduce-scattered along the sequence under sequence parallelism."""

    def __init__(self, ctx: LayerContext, in_features: int, out_features: int, std: Optional[float] = None,
                 fp8_module: Optional[str] = None):
        super().__init__()
        fp8 = ctx.fp8_for(fp8_module)
        kwargs = dict(config=ctx.mp_config, init_method=ctx.init_method(std), bias=False, input_is_parallel=True,
                      skip_bias_add=False, tp_group=ctx.tp_group)
        if fp8 is not None and fp8.backend == "te":
            self.linear = _te_layers().TERowParallelLinear(in_features, out_features, is_expert=False, **kwargs)
        else:
            self.linear = (RowParallelLinear(in_features, out_features, **kwargs) if fp8 is None else
                           _Fp8RowParallelLinear(in_features, out_features, fp8=fp8, **kwargs))

    @property
    def weight(self) -> nn.Parameter:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)[0]


def replicated_linear(ctx: LayerContext, in_features: int, out_features: int,
                      dtype: Optional[torch.dtype] = None, std: Optional[float] = None,
                      fp8_module: Optional[str] = None) -> nn.Module:
    """A bias-free linear held whole by every tensor-parallel rank (its GEMMs in FP8 when the plan covers
    `fp8_module`). Its `weight` is [out, in] in every implementation."""
    dtype = dtype or ctx.mp_config.params_dtype
    fp8 = ctx.fp8_for(fp8_module)
    if fp8 is not None and fp8.backend == "te":
        class _TEReplicatedLinear(_te_layers().TELinear):
            def forward(self, x):  # megatron's TE layers return (output, bias)
                return super().forward(x)[0]

        return _TEReplicatedLinear(in_features, out_features, parallel_mode="duplicated", config=ctx.mp_config,
                                   init_method=ctx.init_method(std), bias=False, skip_bias_add=False,
                                   skip_weight_param_allocation=False, tp_group=ctx.tp_group)
    layer = nn.Linear(in_features, out_features, bias=False, dtype=dtype) if fp8 is None else \
        Fp8Linear(in_features, out_features, fp8, dtype)
    ctx.init_method(std)(layer.weight)
    return layer


def vocab_embedding(ctx: LayerContext, vocab_size: int, hidden_size: int) -> VocabParallelEmbedding:
    """Token embedding with the vocabulary split over the tensor-parallel group: ids [b, s] -> [b, s, d], or
    under sequence parallelism this rank's part of the sequence, sequence-first: [s / tp, b, d]."""
    return VocabParallelEmbedding(vocab_size, hidden_size, init_method=ctx.init_method(), config=ctx.mp_config,
                                  tp_group=ctx.tp_group, reduce_scatter_embeddings=ctx.sequence_parallel)


def sum_grads_over_tp(ctx: LayerContext, *modules: nn.Module, sequence_parallel_only: bool = False) -> None:
    """Mark every parameter of `modules` as partial per tensor-parallel rank (see the module docstring): always
    for replicated parameters used inside a region, or (`sequence_parallel_only`) only under sequence parallelism
    for per-token parameters outside the regions. A no-op with one tensor-parallel rank."""
    if ctx.tp_size == 1 or (sequence_parallel_only and not ctx.sequence_parallel):
        return
    for module in modules:
        for p in module.parameters():
            p.grad_sum_over_tp = True


def sharded_parameter(ctx: LayerContext, full_shape: tuple[int, ...], partition_dim: int,
                      std: Optional[float], dtype: Optional[torch.dtype] = None) -> nn.Parameter:
    """A parameter split along `partition_dim` over the tensor-parallel group, initialised as the slice of one
    full tensor (normal(0, std), or zeros when std is None), so the model does not depend on the TP size."""
    if full_shape[partition_dim] % ctx.tp_size:
        raise ValueError(f"dim {partition_dim} of a {full_shape} parameter is not divisible by the tensor-parallel "
                         f"size {ctx.tp_size}")
    full = torch.zeros(full_shape, dtype=torch.float32)
    if std is not None:
        nn.init.normal_(full, mean=0.0, std=std)
    local = full.chunk(ctx.tp_size, dim=partition_dim)[ctx.tp_rank]
    param = nn.Parameter(local.to(dtype or ctx.mp_config.params_dtype).contiguous())
    # Megatron's attributes: checkpointing and grad-norm code read them to know how the tensor is split.
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = 1
    return param


def divide(numerator: int, denominator: int, what: str) -> int:
    """numerator / denominator, with an error naming `what` when it does not divide."""
    if numerator % denominator:
        raise ValueError(f"{what}: {numerator} is not divisible by {denominator}")
    return numerator // denominator


__all__ = ["LayerContext", "make_layer_context", "ColumnLinear", "RowLinear", "replicated_linear",
           "vocab_embedding", "sharded_parameter", "sum_grads_over_tp", "divide"]
