"""Process groups, built once and handed down.

megatron-core keeps its process groups in module globals (``megatron.core.parallel_state``). The
project reads them in exactly one place, ``init_distributed``, and passes the resulting
``ParallelGroups`` to whatever needs them, so every module states its parallel dependencies in its
signature and can be tested with groups of its choosing.
"""

from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu

from dsv4.model.config import ConfigError

from .cpu_compat import enable_cpu_compat
from .launch import launch_env, rendezvous

__all__ = ["ParallelGroups", "init_distributed", "destroy_distributed"]


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups this rank belongs to.

    Dense part of the model: world = pp x dp x tp (tp fastest). Routed experts: world = pp x edp x ep x etp
    (megatron-core's expert grid, etp fastest)."""

    tp: dist.ProcessGroup
    pp: dist.ProcessGroup
    ep: dist.ProcessGroup
    dp: dist.ProcessGroup
    edp: dist.ProcessGroup
    """Expert data parallel: the ranks holding the same experts (and the same expert-tensor shard)."""
    etp: dist.ProcessGroup
    """Expert tensor parallel: the ranks splitting each routed expert's matrices."""
    tp_dp: dist.ProcessGroup
    """Tensor x data parallel: every rank of a pipeline stage; each holds different tokens under sequence
    parallelism, so per-token statistics (router loads) are summed over it."""
    embd: Optional[dist.ProcessGroup]
    """The first and last pipeline stage: both hold the token embedding (input and MTP), kept in sync (None on
    the stages in between)."""

    @property
    def tp_size(self) -> int:
        return dist.get_world_size(self.tp)

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.tp)

    @property
    def pp_size(self) -> int:
        return dist.get_world_size(self.pp)

    @property
    def pp_rank(self) -> int:
        return dist.get_rank(self.pp)

    @property
    def ep_size(self) -> int:
        return dist.get_world_size(self.ep)

    @property
    def ep_rank(self) -> int:
        return dist.get_rank(self.ep)

    @property
    def etp_size(self) -> int:
        return dist.get_world_size(self.etp)

    @property
    def dp_size(self) -> int:
        return dist.get_world_size(self.dp)

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp)


def init_distributed(tp: int = 1, pp: int = 1, ep: int = 1, etp: int = 1, vpp: int = 1,
                     backend: str | None = None, *, rendezvous_timeout_s: float = 300.0,
                     collective_timeout_s: float = 1800.0) -> ParallelGroups:
    """Initialize torch.distributed and megatron's parallel state (if not done yet); return the groups.

    The rank and world come from the launcher (``dsv4.parallel.launch``: torchrun, RANK/WORLD_SIZE, or an srun
    job step); without one, a single-process world is created on an in-memory store, so notebooks and tests
    need no launcher. ``backend`` defaults to nccl with CUDA and gloo without; on a machine without
    CUDA the CPU compatibility layer is enabled (it is a no-op when CUDA is available).

    Without torchrun the ranks meet through ``launch.rendezvous``, which fails after ``rendezvous_timeout_s``
    naming the ranks that never joined. ``collective_timeout_s`` bounds every collective (torch's and megatron's
    groups): a rank whose peer hangs (a node that stopped responding) raises instead of waiting forever, so the
    job ends and can be resubmitted.

    Calling it again with the same sizes returns the same groups; with different sizes it raises
    ValueError (call ``destroy_distributed()`` first).
    """
    le = None if dist.is_initialized() else launch_env()
    world_size = dist.get_world_size() if le is None else le.world_size
    backend = backend or (dist.get_backend() if dist.is_initialized() else
                          "nccl" if torch.cuda.is_available() else "gloo")
    _check_sizes(world_size, tp=tp, pp=pp, ep=ep, etp=etp, vpp=vpp, backend=backend)
    enable_cpu_compat()
    timeout = timedelta(seconds=collective_timeout_s)

    if le is not None:
        if le.distributed and torch.cuda.is_available():
            # Before the first collective: megatron allocates on torch.cuda.current_device().
            torch.cuda.set_device(le.local_rank)
        if le.source == "torchrun":
            dist.init_process_group(backend=backend, timeout=timeout)
        elif le.distributed:
            dist.init_process_group(backend=backend, store=rendezvous(le, rendezvous_timeout_s), rank=le.rank,
                                    world_size=le.world_size, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)

    if mpu.model_parallel_is_initialized():
        current = (
            mpu.get_tensor_model_parallel_world_size(),
            mpu.get_pipeline_model_parallel_world_size(),
            mpu.get_expert_model_parallel_world_size(),
            mpu.get_expert_tensor_parallel_world_size(),
            mpu.get_virtual_pipeline_model_parallel_world_size() or 1,
        )
        if current != (tp, pp, ep, etp, vpp):
            raise ValueError(
                "megatron parallel state is already initialized with tp={}, pp={}, ep={}, etp={}, vpp={}, but "
                "init_distributed was asked for tp={}, pp={}, ep={}, etp={}, vpp={}; call destroy_distributed() "
                "before re-initializing with other sizes.".format(*current, tp, pp, ep, etp, vpp)
            )
    else:
        mpu.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
            distributed_timeout_minutes=collective_timeout_s / 60,
        )

    return ParallelGroups(
        tp=mpu.get_tensor_model_parallel_group(),
        pp=mpu.get_pipeline_model_parallel_group(),
        ep=mpu.get_expert_model_parallel_group(),
        dp=mpu.get_data_parallel_group(),
        edp=mpu.get_expert_data_parallel_group(),
        etp=mpu.get_expert_tensor_parallel_group(),
        tp_dp=mpu.get_tensor_and_data_parallel_group(),
        embd=mpu.get_embedding_group(check_initialized=False),
    )


def destroy_distributed() -> None:
    """Tear down megatron's parallel state and the torch process group, so tests can start over."""
    mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _check_sizes(world_size: int, *, tp: int, pp: int, ep: int, etp: int, vpp: int, backend: str) -> None:
    """Fail early, naming the sizes, where megatron would fail later or less clearly."""
    for name, size in (("tp", tp), ("pp", pp), ("ep", ep), ("etp", etp), ("vpp", vpp)):
        if size < 1:
            raise ValueError(f"{name} must be >= 1, got {name}={size}.")
    if world_size % (tp * pp):
        raise ValueError(
            f"world_size={world_size} is not divisible by tp*pp = {tp}*{pp} = {tp * pp}: launch a "
            f"multiple of {tp * pp} processes (e.g. torchrun --nproc-per-node={tp * pp}) or lower tp/pp."
        )
    # megatron's expert grid: expert-tensor * expert-model * pipeline parallel.
    if world_size % (etp * ep * pp):
        raise ValueError(
            f"world_size={world_size} is not divisible by etp*ep*pp = {etp}*{ep}*{pp} = {etp * ep * pp}: "
            f"launch a multiple of {etp * ep * pp} processes or lower ep/etp."
        )
    if vpp > 1 and pp < 2:
        raise ValueError(f"vpp={vpp} virtual stages need pipeline parallelism: set pp >= 3 (or vpp=1).")
    if vpp > 1 and pp == 2 and backend == "gloo":
        # Measured: with two stages the previous and next stage are the same rank, and gloo pairs the schedule's
        # batched send/recv in posting order, which swaps the interleaved schedule's messages.
        raise ConfigError(
            "parallel.vpp: the interleaved schedule with parallel.pp=2 gives wrong gradients on the gloo backend "
            "(CPU); use parallel.pp>=3 with vpp>1, or parallel.vpp=1 with pp=2, or run on GPUs (NCCL).")
