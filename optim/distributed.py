"""Muon + AdamW for the model chunks of one rank, with every parallel dimension (spec section 8, "Distributed Muon").

Gradients arrive whole and averaged on every data-parallel replica (megatron DDP all-reduce + `finalize_grads`).
The optimizer state is then sharded over the replicas the V4 way, by whole tensors:

- ownership: every parameter tensor has one owner among the ranks that hold copies of it (the data-parallel group
  for dense parameters, the expert-data-parallel group for routed experts). Owners are assigned greedily, largest
  cost first to the least loaded rank (a knapsack-style balance; cost = Newton-Schulz flops for Muon matrices,
  elements for AdamW tensors). Only the owner keeps the tensor's state (Muon momentum, AdamW moments, an fp32
  master copy for bf16 parameters) and computes its update; each full matrix is orthogonalised exactly once per
  replica set.
- tensor parallelism: a Muon matrix split over tp (or an expert split over etp) is orthogonalised whole: its
  tensor-parallel peers (all owners of their shards, by construction) all-gather the momentum look-ahead, each runs
  Newton-Schulz on the full matrix and keeps its own slice. Blocks that are local by construction (each routed
  expert under ep, each `wo_a` output group under tp) need no gather. AdamW is element-wise: shards stay local.
- after the updates, each owner broadcasts its tensors to the other replicas (one flat broadcast per owner).

Communication per step, in units of the parameter bytes P: the DDP all-reduce of gradients (~2P in a ring) plus
the owners' broadcasts (~P), against ~2P for ZeRO-1 AdamW (reduce-scatter + all-gather); tensor-parallel gathers
add the Muon look-ahead of split matrices (their size times (tp-1)/tp) inside each tensor-parallel group.
With `sharded=False` every replica owns everything: no broadcasts, state replicated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron.core.dist_checkpointing import ShardedTensor

from dsv4.model.config import ModelConfig
from dsv4.parallel.grads import param_grad

from .muon import (NS_PRESETS, BlockLayout, assign_param_groups, block_kind, muon_update, no_weight_decay,
                   orthogonal_blocks, orthogonalized)

__all__ = ["DistributedMuon", "global_grad_norm"]


@dataclass
class _Entry:
    """One parameter tensor of this rank, with what the optimizer needs to know about it."""

    name: str
    param: torch.nn.Parameter
    kind: str  # muon | adamw
    group: str  # the schedule group: muon | adamw | adamw_no_decay
    replicas: dist.ProcessGroup  # the ranks holding copies of this tensor (dp, or edp for routed experts)
    cost: float
    gather: Optional[tuple] = None  # (group, dim): Muon needs the whole matrix from these shards
    layout: Optional[BlockLayout] = None  # Muon blocks of the whole matrix
    owner: int = 0  # rank within `replicas`
    state: dict = field(default_factory=dict)


def global_grad_norm(params, groups, device: Optional[torch.device] = None) -> torch.Tensor:
    """L2 norm of the whole model's gradient from this rank's parameters: tensor-parallel shards summed over tp,
    routed experts over their expert-parallel and expert-tensor-parallel groups, every stage over pp; tensors
    replicated over tp or dp, and the last stage's embedding copy (`shared`), counted once. `device`: where the sums
    live (default: the first parameter's; needed when this rank trains no parameter this step)."""
    params = list(params)
    device = device if device is not None else params[0].device
    dense_split = torch.zeros((), dtype=torch.float64, device=device)
    replicated = torch.zeros((), dtype=torch.float64, device=device)
    experts = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        g = param_grad(p)
        if g is None or getattr(p, "shared", False):
            continue
        s = g.detach().double().square().sum()
        if not getattr(p, "allreduce", True):
            experts += s
        elif getattr(p, "tensor_model_parallel", False):
            dense_split += s
        else:
            replicated += s
    for value, group in ((dense_split, groups.tp), (experts, groups.etp), (experts, groups.ep)):
        if dist.get_world_size(group) > 1:
            dist.all_reduce(value, group=group)
    total = dense_split + replicated + experts
    if dist.get_world_size(groups.pp) > 1:
        dist.all_reduce(total, group=groups.pp)
    return total.sqrt()


class DistributedMuon:
    """Muon for hidden matrices and AdamW for the rest (`dsv4.optim.muon.assign_param_groups`), over this rank's
    model chunks (DDP-wrapped: gradients in `main_grad`); see the module docstring for the distribution.

    `param_groups` (muon, adamw, adamw_no_decay) carry `lr`, `weight_decay` and `wd_mult` for the training loop's
    schedule, like megatron's optimizer."""

    def __init__(self, named_params, model_cfg: ModelConfig, groups, *, lr: float, weight_decay: float,
                 betas: tuple[float, float], eps: float, momentum: float = 0.95, nesterov: bool = True,
                 ns: str = "v4_hybrid", rms_scale: float = 0.18, ns_dtype: torch.dtype = torch.bfloat16,
                 sharded: bool = True):
        if ns not in NS_PRESETS:
            raise ValueError(f"ns={ns!r}: choose one of {sorted(NS_PRESETS)}")
        named_params = [(n, p) for n, p in named_params if p.requires_grad]
        self.assignment = assign_param_groups(named_params, model_cfg)
        self.groups, self.sharded = groups, sharded
        self.ns, self.momentum, self.nesterov, self.rms_scale = NS_PRESETS[ns], momentum, nesterov, rms_scale
        self.ns_dtype = ns_dtype
        self.betas, self.eps, self.step_count = betas, eps, 0
        self.param_groups = [{"name": g, "lr": lr, "weight_decay": weight_decay, "wd_mult": m, "lr_mult": 1.0}
                             for g, m in (("muon", 1.0), ("adamw", 1.0), ("adamw_no_decay", 0.0))]
        muon_ids = {id(p) for _, p in self.assignment.muon}
        self.entries = [self._entry(name, p, id(p) in muon_ids, model_cfg) for name, p in named_params]
        self._assign_owners()
        self._loading: dict = {}  # checkpoint key -> (entry, state name) while a load is prepared
        self._keys: dict = {}  # id(entry) -> its parameter's checkpoint key (without "model.")
        for e in self._owned():
            if e.param.dtype != torch.float32:
                e.state["master"] = e.param.detach().float().clone()

    # --- construction ----------------------------------------------------------------------------------------------
    def _entry(self, name: str, p: torch.nn.Parameter, muon: bool, cfg: ModelConfig) -> _Entry:
        expert = not getattr(p, "allreduce", True)
        replicas = self.groups.edp if expert else self.groups.dp
        if not muon:
            return _Entry(name, p, "adamw", "adamw_no_decay" if no_weight_decay(name, p) else "adamw", replicas,
                          float(p.numel()))
        gather, shape = None, tuple(p.shape)
        split_group = self.groups.etp if expert else self.groups.tp
        if getattr(p, "tensor_model_parallel", False) and dist.get_world_size(split_group) > 1:
            if block_kind(name, p.dim()) != "per_group":  # wo_a's output groups are whole on each rank
                gather = (split_group, p.partition_dim)
                shape = list(shape)
                shape[p.partition_dim] *= dist.get_world_size(split_group)
                shape = tuple(shape)
        layout = orthogonal_blocks(name, shape, cfg.o_lora_rank)
        b, m, n = layout.blocks
        return _Entry(name, p, "muon", "muon", replicas, float(b * m * n * min(m, n)), gather, layout)

    def _assign_owners(self) -> None:
        """Greedy balance per replica group, largest cost first; the same on every rank of the group (they hold
        the same tensors in the same order)."""
        if not self.sharded:
            for e in self.entries:
                e.owner = dist.get_rank(e.replicas)
            return
        for kind in ("dense", "expert"):
            members = [e for e in self.entries if (e.replicas is self.groups.edp) == (kind == "expert")]
            if not members:
                continue
            loads = [0.0] * dist.get_world_size(members[0].replicas)
            for e in sorted(members, key=lambda e: -e.cost):  # sorted() is stable: ties keep model order
                e.owner = min(range(len(loads)), key=lambda r: loads[r])
                loads[e.owner] += e.cost

    def _owned(self):
        return [e for e in self.entries if e.owner == dist.get_rank(e.replicas)]

    # --- what the training loop calls --------------------------------------------------------------------------------
    def summary(self) -> str:
        """The Muon/AdamW assignment (printed at start-up)."""
        return self.assignment.summary()

    def zero_grad(self) -> None:
        """Gradients live in the DDP buffers, which the loop zeroes."""

    def prepare_grads(self) -> bool:
        return False

    def _trained(self, entries) -> list:
        """The entries trained this step: a frozen parameter (`requires_grad` off, everything but the indexers in
        the indexer warm-up) still has a (zero) `main_grad` in DDP's buffer, but no update, decay or state change."""
        return [e for e in entries if e.param.requires_grad]

    def get_grad_norm(self) -> float:
        """The global gradient norm of the parameters trained this step."""
        device = self.entries[0].param.device
        return global_grad_norm([e.param for e in self._trained(self.entries)], self.groups, device).item()

    def clip_grads(self, max_norm: float, total_norm: float) -> None:
        """Scale every trained gradient by max_norm / total_norm when that is below 1 (megatron's rule)."""
        coeff = max_norm / (total_norm + 1.0e-6)
        if coeff < 1.0:
            for e in self._trained(self.entries):
                g = param_grad(e.param)
                if g is not None:
                    g.mul_(coeff)

    @torch.no_grad()
    def step_with_ready_grads(self) -> bool:
        """Owners update their trained tensors (Muon or AdamW), then broadcast them to the other replicas. A frozen
        tensor keeps its value and its state (momentum, moments, AdamW step count) untouched."""
        self.step_count += 1
        hyper = {g["name"]: g for g in self.param_groups}
        for e in self._trained(self._owned()):
            g = param_grad(e.param)
            if g is None:
                continue
            group = hyper[e.group]
            lr, wd = group["lr"], group["weight_decay"]  # the loop's schedule has applied lr_mult and wd_mult
            target = e.state.get("master", e.param.data)
            update = self._muon(e, g) if e.kind == "muon" else self._adamw(e, g)
            target.mul_(1 - lr * wd)  # decoupled weight decay
            target.add_(update, alpha=-lr)
            if target is not e.param.data:
                e.param.data.copy_(target)
        if self.sharded:
            self._broadcast()
        return True

    # --- checkpoints ----------------------------------------------------------------------------------------------------
    STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "master")

    def sharded_state_dict(self, model_state: dict, is_loading: bool = False,
                           available: Optional[set] = None) -> dict:
        """The optimizer state as megatron-core ShardedTensors, for `dist_checkpointing`.

        Each state tensor has the shape and place of its parameter's slice (`model_state`: the model's sharded
        state dict, `dsv4.parallel.sharding.model_sharded_state_dict`), so it reshards like the parameter. Only the
        owner holds state; it writes it as the main copy over the replicas (replica id 0 along data parallelism),
        so a checkpoint saved over dp replicas loads under another dp size, where other ranks own the tensors.
        `is_loading`: allocates the state of the tensors this rank owns, restricted to the keys `available` in
        the checkpoint (state that was never created, e.g. of a parameter frozen so far, stays absent).

        AdamW step counts: the optimizer's `step_count`, except for tensors that were frozen for some steps (the
        indexer warm-up); those are listed in `optimizer.muon.adamw_steps` {parameter key: step}, gathered from
        every rank (a collective: every rank calls this)."""
        by_param = {id(sh.data): sh for sh in model_state.values()}
        self._loading, self._keys = {}, {}
        out = {"optimizer.muon.step_count": self.step_count}
        steps = {}
        for e in self._owned():
            sh = by_param[id(e.param)]
            self._keys[id(e)] = sh.key.removeprefix("model.")
            replica = sh.replica_id
            if self.sharded:  # the owner holds the only copy among the replicas: main along data parallelism
                replica = (*replica[:-1], 0) if isinstance(replica, tuple) else 0
            if e.kind == "adamw" and e.state.get("step", self.step_count) != self.step_count:
                steps[self._keys[id(e)]] = e.state["step"]
            for name in self.STATE_KEYS:
                key = f"optimizer.muon.{name}.{sh.key.removeprefix('model.')}"
                if is_loading:
                    if available is not None and key not in available:
                        continue
                    self._loading[key] = (e, name)
                    data = torch.zeros(e.param.shape, dtype=torch.float32, device=e.param.device)
                elif name in e.state:
                    data = e.state[name]
                else:
                    continue
                out[key] = replace(sh, key=key, data=data, replica_id=replica)
        if not is_loading:
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, steps)
            out["optimizer.muon.adamw_steps"] = {k: v for rank_steps in every for k, v in rank_steps.items()}
        return out

    def load_state_dict(self, state: dict) -> None:
        """Take the tensors `dist_checkpointing.load` filled, from `sharded_state_dict(..., is_loading=True)`.
        AdamW's step count is the optimizer's, except for the tensors `optimizer.muon.adamw_steps` lists (frozen
        for some steps)."""
        self.step_count = int(state["optimizer.muon.step_count"])
        steps = state.get("optimizer.muon.adamw_steps") or {}
        for key, sh in state.items():
            if key not in ("optimizer.muon.step_count", "optimizer.muon.adamw_steps"):
                e, name = self._loading[key]
                e.state[name] = sh
        for e in self._owned():
            if e.kind == "adamw" and "exp_avg" in e.state:
                e.state["step"] = int(steps.get(self._keys[id(e)], self.step_count))
        self._loading = {}

    # --- the updates ---------------------------------------------------------------------------------------------------
    def _muon(self, e: _Entry, g: torch.Tensor) -> torch.Tensor:
        """buf <- mu buf + g on this rank's shard; Newton-Schulz on the whole matrix (gathered from the
        tensor-parallel shards when split); returns this shard's update."""
        g = g.float()
        buf = e.state.setdefault("momentum_buffer", torch.zeros_like(g))
        if e.gather is None:
            return e.layout.merge(muon_update(e.layout.split(g.contiguous()), e.layout.split(buf), self.momentum,
                                              self.nesterov, self.ns, self.rms_scale, self.ns_dtype))
        # Split matrix: the momentum is element-wise, so each shard keeps its own; the look-ahead is gathered.
        buf.mul_(self.momentum).add_(g)
        look = g + self.momentum * buf if self.nesterov else buf.clone()
        group, dim = e.gather
        pieces = [torch.empty_like(look) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, look.contiguous(), group=group)
        whole = torch.cat(pieces, dim=dim)
        full = e.layout.merge(orthogonalized(e.layout.split(whole.contiguous()), self.ns, self.rms_scale,
                                             self.ns_dtype))
        return full.chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)]

    def _adamw(self, e: _Entry, g: torch.Tensor) -> torch.Tensor:
        """AdamW's update direction (decoupled decay is applied by the caller), bias-corrected as torch's."""
        g = g.float()
        b1, b2 = self.betas
        m = e.state.setdefault("exp_avg", torch.zeros_like(g))
        v = e.state.setdefault("exp_avg_sq", torch.zeros_like(g))
        e.state["step"] = e.state.get("step", 0) + 1
        t = e.state["step"]
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(self.eps)
        return (m / (1 - b1 ** t)) / denom

    def _broadcast(self) -> None:
        """Every owner sends its tensors to the other replicas: one flat broadcast per (replica group, owner)."""
        for replicas in {id(e.replicas): e.replicas for e in self.entries}.values():
            if dist.get_world_size(replicas) == 1:
                continue
            members = [e for e in self.entries if e.replicas is replicas]
            for owner in range(dist.get_world_size(replicas)):
                tensors = [e.param.data for e in self._trained(members) if e.owner == owner]
                for dtype in sorted({t.dtype for t in tensors}, key=str):
                    same = [t for t in tensors if t.dtype == dtype]
                    flat = _flatten_dense_tensors(same)
                    dist.broadcast(flat, src=dist.get_global_rank(replicas, owner), group=replicas)
                    for t, synced in zip(same, _unflatten_dense_tensors(flat, same)):
                        t.copy_(synced)
