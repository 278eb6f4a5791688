"""megatron-core's AdamW state as whole-parameter tensors, for checkpoints that load under any parallel layout.

megatron-core's optimizers keep AdamW state per parameter: whole (FP32Optimizer, Float16OptimizerWithFloat16Params)
or, with the distributed optimizer (ZeRO-1), as each data-parallel rank's range of the flattened parameter. For a
checkpoint each state tensor is reassembled in the shape of its parameter's slice (this rank's tensor-parallel /
expert shard), so it is stored like the parameter (`dsv4.parallel.sharding`) and reshards with it:

    save:  every rank writes its ranges into zeroed flat buffers, summed over the data-parallel group (one
           all-reduce per state and optimizer); the data-parallel replicas then hold equal copies and the first
           writes them (the parameter's own replica ids)
    load:  every rank reads the whole tensors of the parameters it has a range of, and keeps its range

We do not use megatron-core 0.16.1's own `fully_reshardable` format: on a pipeline stage whose DDP buffer ends with
the (padded) embedding it pads the last range with zeros ("param range exceeds unpadded buffer", megatron-core
issue #504) and loads them, and without TransformerEngine/apex its load breaks on torch Adam's `step`.
The save holds each optimizer's reassembled state once (like megatron's non-memory-efficient format).
"""

from __future__ import annotations

from dataclasses import replace
from itertools import chain
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

__all__ = ["adam_sharded_state_dict", "load_adam_state_dict"]

MOMENTS = ("exp_avg", "exp_avg_sq")


def _optimizers(optimizer) -> list:
    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if o.optimizer is not None]


def _local_states(opt) -> Iterator[tuple]:
    """(model parameter, (start, end) of this rank's range in the flattened parameter or None, the main-parameter
    state dict {"param": fp32 main, "exp_avg", "exp_avg_sq", "step"} of that range) for every parameter of `opt`."""
    if isinstance(opt, DistributedOptimizer):
        for buffer in opt.buffers:
            for p in buffer.param_index_map:
                if p in opt.model_param_group_index_map:
                    r = opt._get_model_param_range_map(p)["param"]
                    yield p, (r.start, r.end), opt._get_main_param_and_optimizer_states(p)
                else:
                    yield p, None, None
        return
    if hasattr(opt, "float16_groups"):  # bf16/fp16 parameters with fp32 main copies
        pairs = chain(zip(chain(*opt.float16_groups), chain(*opt.fp32_from_float16_groups)),
                      ((p, p) for p in chain(*opt.fp32_from_fp32_groups)))
    else:  # FP32Optimizer: the model parameters are the main parameters
        pairs = ((p, p) for group in opt.optimizer.param_groups for p in group["params"])
    for model_p, main in pairs:
        yield model_p, (0, model_p.numel()), {"param": main, **opt.optimizer.state[main]}


def _replicas(opt) -> Optional[dist.ProcessGroup]:
    return opt.data_parallel_group if isinstance(opt, DistributedOptimizer) else None


def _steps(optimizer, by_param: dict) -> tuple[int, dict]:
    """torch Adam's step counts: the largest (that of every parameter trained at every step) and {parameter key:
    step} of the parameters whose count differs (left out of the update for some steps: the indexer warm-up freezes
    all but the indexers, `dsv4.train.loop.leave_out_frozen`). Gathered from every rank: a collective."""
    local = {}
    for opt in _optimizers(optimizer):
        for p, rng, states in _local_states(opt):
            if rng is not None:
                local[by_param[id(p)].key.removeprefix("model.")] = int(states.get("step", 0))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, local)
    steps = {k: v for rank_steps in every for k, v in rank_steps.items()}
    common = max(steps.values(), default=0)
    return common, {k: v for k, v in steps.items() if v != common}


def adam_sharded_state_dict(optimizer, model_state: dict, is_loading: bool = False,
                            available: Optional[set] = None) -> dict:
    """ShardedTensors of the AdamW moments (and fp32 master weights of non-fp32 parameters) of megatron-core's
    (chained) optimizer, keyed `optimizer.adam.<state>.<parameter key>`, plus the step count. `model_state`: the
    model's sharded state dict. Loading: allocates the tensors to read, restricted to the keys `available`.
    Saving is a collective (the step counts are gathered from every rank)."""
    by_param = {id(sh.data): sh for sh in model_state.values()}
    out: dict = {"optimizer.adam.step": 0, "optimizer.adam.steps": {}}  # loading: the checkpoint's replace them
    if not is_loading:
        out["optimizer.adam.step"], out["optimizer.adam.steps"] = _steps(optimizer, by_param)
    for opt in _optimizers(optimizer):
        entries = list(_local_states(opt))
        names = [*MOMENTS] + (["param"] if any(p.dtype != torch.float32 for p, _, _ in entries) else [])
        for name in names:
            if is_loading:
                whole = {id(p): torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                         for p, rng, _ in entries if rng is not None}
            else:
                whole = _reassemble(entries, name, _replicas(opt))
            for p, rng, _ in entries:
                if name == "param" and p.dtype == torch.float32:
                    continue  # the model parameter itself is the master copy
                sh = by_param[id(p)]
                key = f"optimizer.adam.{name}.{sh.key.removeprefix('model.')}"
                if id(p) not in whole or (available is not None and key not in available):
                    continue
                out[key] = replace(sh, key=key, data=whole[id(p)], dtype=torch.float32)
    return out


def _reassemble(entries: list, name: str, replicas) -> dict:
    """{id(param): its whole state `name` [param shape]}, from every data-parallel rank's ranges."""
    total = sum(p.numel() for p, _, _ in entries)
    device = entries[0][0].device if entries else None
    flat = torch.zeros(total, dtype=torch.float32, device=device)
    offset, views = 0, {}
    for p, rng, states in entries:
        if rng is not None and name in states:
            flat[offset + rng[0]: offset + rng[1]] = states[name].detach().reshape(-1).float()
        views[id(p)] = flat[offset: offset + p.numel()].view(p.shape)
        offset += p.numel()
    if replicas is not None and dist.get_world_size(replicas) > 1:
        dist.all_reduce(flat, group=replicas)  # ranges are disjoint: the sum is the concatenation
    return views


@torch.no_grad()
def load_adam_state_dict(optimizer, keys: dict, loaded: dict) -> None:
    """Put the tensors a `dist_checkpointing.load` filled (from `adam_sharded_state_dict(..., is_loading=True)`) into
    the optimizer: each rank keeps its range. `keys`: {id(model parameter): its checkpoint key without "model."}.
    Every parameter gets its own `step` tensor (torch increments it in place): the checkpoint's common step, or
    its own where `optimizer.adam.steps` lists it."""
    step = float(loaded["optimizer.adam.step"])
    own_steps = loaded.get("optimizer.adam.steps") or {}
    for opt in _optimizers(optimizer):
        opt.init_state_fn(opt.optimizer, opt.config)  # allocate exp_avg / exp_avg_sq where torch has none yet
        for group in opt.optimizer.param_groups:
            for main in group["params"]:
                opt.optimizer.state[main]["step"] = torch.tensor(step)
        for p, rng, states in _local_states(opt):
            for name in (*MOMENTS, "param"):
                key = f"optimizer.adam.{name}.{keys[id(p)]}"
                if rng is not None and key in loaded:
                    states[name].view(-1).copy_(loaded[key].reshape(-1)[rng[0]:rng[1]])
            if rng is not None and keys[id(p)] in own_steps:
                opt.optimizer.state[states["param"]]["step"] = torch.tensor(float(own_steps[keys[id(p)]]))
