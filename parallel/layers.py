"""The one place that chooses the implementation of the model's parallel linear layers and embedding.

Every projection of the model is built here, so switching the implementation (megatron-core's local tensor-parallel
layers today; TransformerEngine for the FP8 attention blocks on GPU) is a change in this file only.

- column-parallel: output dim split over the tensor-parallel group (q up-projection, indexer heads, head/logits);
- row-parallel: input dim split, output all-reduced (attention output projection);
- replicated: small projections every tensor-parallel rank holds whole (low-rank q down-projection, the shared
  K=V head, compressors, router). Their inputs are identical on every rank, so their gradients are too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from torch import nn


@dataclass
class LayerContext:
    """What every parallel layer needs: megatron's config, the tensor-parallel group and the init std."""

    mp_config: ModelParallelConfig
    tp_group: dist.ProcessGroup
    init_std: float
    ep_group: Optional[dist.ProcessGroup] = None
    """Expert-parallel group the routed experts are spread over (None: every expert on this rank)."""

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
                       ep_group: Optional[dist.ProcessGroup] = None) -> LayerContext:
    """Megatron's ModelParallelConfig for our layers.

    Weights are always initialised on the CPU, as the full (master) tensor sliced to this rank's part, from the
    torch generator: a model built with a given seed is the same on CPU and GPU and for every tensor-parallel size.
    The model moves itself to the GPU afterwards when there is one.
    """
    mp_config = ModelParallelConfig(
        tensor_model_parallel_size=dist.get_world_size(tp_group),
        params_dtype=params_dtype,
        use_cpu_initialization=True,
        perform_initialization=True,
    )
    return LayerContext(mp_config, tp_group, init_std, ep_group)


class ColumnLinear(nn.Module):
    """y = x W^T with W's rows (outputs) split over the tensor-parallel group. No bias (V4 has none)."""

    def __init__(self, ctx: LayerContext, in_features: int, out_features: int, gather_output: bool = False,
                 std: Optional[float] = None):
        super().__init__()
        self.linear = ColumnParallelLinear(in_features, out_features, config=ctx.mp_config,
                                           init_method=ctx.init_method(std), bias=False,
                                           gather_output=gather_output, tp_group=ctx.tp_group)

    @property
    def weight(self) -> nn.Parameter:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)[0]


class RowLinear(nn.Module):
    """y = x W^T with W's columns (inputs) split over the tensor-parallel group; the output is all-reduced."""

    def __init__(self, ctx: LayerContext, in_features: int, out_features: int, std: Optional[float] = None):
        super().__init__()
        self.linear = RowParallelLinear(in_features, out_features, config=ctx.mp_config,
                                        init_method=ctx.init_method(std), bias=False, input_is_parallel=True,
                                        skip_bias_add=False, tp_group=ctx.tp_group)

    @property
    def weight(self) -> nn.Parameter:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)[0]


def replicated_linear(ctx: LayerContext, in_features: int, out_features: int,
                      dtype: Optional[torch.dtype] = None, std: Optional[float] = None) -> nn.Linear:
    """A bias-free linear held whole by every tensor-parallel rank."""
    layer = nn.Linear(in_features, out_features, bias=False, dtype=dtype or ctx.mp_config.params_dtype)
    ctx.init_method(std)(layer.weight)
    return layer


def vocab_embedding(ctx: LayerContext, vocab_size: int, hidden_size: int) -> VocabParallelEmbedding:
    """Token embedding with the vocabulary split over the tensor-parallel group."""
    return VocabParallelEmbedding(vocab_size, hidden_size, init_method=ctx.init_method(), config=ctx.mp_config,
                                  tp_group=ctx.tp_group)


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
           "vocab_embedding", "sharded_parameter", "divide"]
