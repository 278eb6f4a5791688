"""Process groups, built once and handed down.

megatron-core keeps its process groups in module globals (``megatron.core.parallel_state``). The
project reads them in exactly one place, ``init_distributed``, and passes the resulting
``ParallelGroups`` to whatever needs them, so every module states its parallel dependencies in its
signature and can be tested with groups of its choosing.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu

from .cpu_compat import enable_cpu_compat

__all__ = ["ParallelGroups", "init_distributed", "destroy_distributed"]


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups this rank belongs to: tensor (tp), pipeline (pp), expert (ep) and data
    (dp) parallel."""

    tp: dist.ProcessGroup
    pp: dist.ProcessGroup
    ep: dist.ProcessGroup
    dp: dist.ProcessGroup
    edp: dist.ProcessGroup
    """Expert data parallel: the ranks holding the same experts (dp / ep of them)."""

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
    def dp_size(self) -> int:
        return dist.get_world_size(self.dp)

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp)


def init_distributed(tp: int = 1, pp: int = 1, ep: int = 1, backend: str | None = None) -> ParallelGroups:
    """Initialize torch.distributed and megatron's parallel state (if not done yet); return the groups.

    Under torchrun (``RANK``/``WORLD_SIZE`` set) the process group comes from the environment.
    Without them, a single-process world is created on an in-memory store, so notebooks and tests
    need no launcher. ``backend`` defaults to nccl with CUDA and gloo without; on a machine without
    CUDA the CPU compatibility layer is enabled (it is a no-op when CUDA is available).

    Calling it again with the same sizes returns the same groups; with different sizes it raises
    ValueError (call ``destroy_distributed()`` first).
    """
    world_size = _world_size()
    _check_sizes(world_size, tp=tp, pp=pp, ep=ep)
    enable_cpu_compat()

    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if _launched_by_torchrun():
            if torch.cuda.is_available():
                # Before the first collective: megatron allocates on torch.cuda.current_device().
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)

    if mpu.model_parallel_is_initialized():
        current = (
            mpu.get_tensor_model_parallel_world_size(),
            mpu.get_pipeline_model_parallel_world_size(),
            mpu.get_expert_model_parallel_world_size(),
        )
        if current != (tp, pp, ep):
            raise ValueError(
                "megatron parallel state is already initialized with tp={}, pp={}, ep={}, but "
                "init_distributed was asked for tp={}, pp={}, ep={}; call destroy_distributed() "
                "before re-initializing with other sizes.".format(*current, tp, pp, ep)
            )
    else:
        mpu.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
        )

    return ParallelGroups(
        tp=mpu.get_tensor_model_parallel_group(),
        pp=mpu.get_pipeline_model_parallel_group(),
        ep=mpu.get_expert_model_parallel_group(),
        dp=mpu.get_data_parallel_group(),
        edp=mpu.get_expert_data_parallel_group(),
    )


def destroy_distributed() -> None:
    """Tear down megatron's parallel state and the torch process group, so tests can start over."""
    mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _launched_by_torchrun() -> bool:
    """Whether a launcher set up this process's rank; half an environment is a launcher bug."""
    present = [name for name in ("RANK", "WORLD_SIZE") if name in os.environ]
    if len(present) == 1:
        raise ValueError(
            f"only {present[0]} is set in the environment; set both RANK and WORLD_SIZE (torchrun "
            "does) or neither for a single-process run."
        )
    return bool(present)


def _world_size() -> int:
    """The world size init_distributed will run in, known before anything is initialized."""
    if dist.is_initialized():
        return dist.get_world_size()
    if _launched_by_torchrun():
        return int(os.environ["WORLD_SIZE"])
    return 1


def _check_sizes(world_size: int, *, tp: int, pp: int, ep: int) -> None:
    """Fail early, naming the sizes, where megatron would fail later or less clearly."""
    for name, size in (("tp", tp), ("pp", pp), ("ep", ep)):
        if size < 1:
            raise ValueError(f"{name} must be >= 1, got {name}={size}.")
    if world_size % (tp * pp):
        raise ValueError(
            f"world_size={world_size} is not divisible by tp*pp = {tp}*{pp} = {tp * pp}: launch a "
            f"multiple of {tp * pp} processes (e.g. torchrun --nproc-per-node={tp * pp}) or lower tp/pp."
        )
    # megatron's expert grid: expert-tensor (= tp here) * expert-model * pipeline parallel.
    if world_size % (tp * ep * pp):
        raise ValueError(
            f"world_size={world_size} is not divisible by tp*ep*pp = {tp}*{ep}*{pp} = {tp * ep * pp}: "
            f"launch a multiple of {tp * ep * pp} processes or lower ep."
        )
