"""Where each rank's slice of a tensor sits in the whole model: megatron-core `ShardedTensor`s for checkpoints.

A checkpoint stores every tensor by its global name and global shape; each rank writes the slice it holds (once:
copies are marked as replicas) and reads the slice its layout asks for, so a checkpoint saved under one parallel
layout loads under any other (tp, pp, vpp, ep, etp and dp all free to change). The slice of a parameter follows
from the markers the layers put on it (`dsv4.parallel.layers`, `dsv4.model.moe`):

    routed experts (`allreduce=False`)   dim 0 split over ep (global expert index), `partition_dim` over etp;
                                         copies: the expert-data-parallel replicas
    `tensor_model_parallel`              `partition_dim` split over tp; copies: the data-parallel replicas
    anything else                        whole on every rank; copies: tp x dp
    the last stage's embedding copy      (`shared`) never written; read like the first stage's

Pipeline stages hold different blocks under their global names (`DSV4Model.global_name`), so pp and vpp need no
offsets. Buffers that are state (router expert biases, hash tables) are saved like unsplit parameters.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing import ShardedTensor

__all__ = ["model_sharded_state_dict", "rank_sharded_tensor"]


def _group_rank(group) -> tuple[int, int]:
    return (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)


def model_sharded_state_dict(chunks: list, groups, prefix: str = "model.") -> dict:
    """{global key: ShardedTensor} of every parameter and persistent buffer of this rank's model chunks (DDP
    wrappers or DSV4Models). The ShardedTensors hold the parameters themselves, so a load writes into the model and
    megatron-core's optimizers can map their state onto them."""
    tp_rank, tp = _group_rank(groups.tp)
    dp_rank, _ = _group_rank(groups.dp)
    ep_rank, ep = _group_rank(groups.ep)
    etp_rank, etp = _group_rank(groups.etp)
    edp_rank, _ = _group_rank(groups.edp)
    out = {}
    for chunk in chunks:
        model = getattr(chunk, "module", chunk)
        tensors = list(model.named_parameters()) + [
            (n, b) for n, b in model.named_buffers() if _persistent(model, n)]
        for name, t in tensors:
            key = prefix + model.global_name(name)
            if not getattr(t, "allreduce", True):  # a routed expert stack [local experts, ...]
                out[key] = ShardedTensor.from_rank_offsets(
                    key, t, (0, ep_rank, ep), (t.partition_dim, etp_rank, etp), replica_id=edp_rank)
            elif getattr(t, "tensor_model_parallel", False):
                copy = int(getattr(t, "shared", False))
                out[key] = ShardedTensor.from_rank_offsets(key, t, (t.partition_dim, tp_rank, tp),
                                                           replica_id=(copy, dp_rank))
            else:
                out[key] = ShardedTensor.from_rank_offsets(
                    key, t, replica_id=(int(getattr(t, "shared", False)), tp_rank, dp_rank))
    return out


def rank_sharded_tensor(key: str, tensor: torch.Tensor) -> ShardedTensor:
    """A per-rank tensor (e.g. RNG state) as row `rank` of a [world, ...] tensor: loadable only by the same rank of
    a run with the same world size."""
    flat = tensor.reshape(1, -1)
    return ShardedTensor.from_rank_offsets(key, flat, (0, dist.get_rank(), dist.get_world_size()), replica_id=0)


def _persistent(model: torch.nn.Module, name: str) -> bool:
    """Whether buffer `name` (dotted) goes into the state dict (not registered with persistent=False)."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return leaf not in module._non_persistent_buffers_set
