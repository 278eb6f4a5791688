"""Run megatron-core 0.16.1 on a CPU-only torch (gloo): the project's one CPU compatibility layer.

Why this exists: megatron-core assumes CUDA throughout its hot paths (``torch.cuda.current_device()``,
``device="cuda"`` buffers, ``torch.cuda.synchronize()``, CUDA streams and events, the CUDA RNG
tracker). The development and CI machines have no GPU, so without this layer sequence parallelism,
the RNG tracker, pipeline schedules, DDP + DistributedOptimizer, dist_checkpointing and MoE fail there
(measured in shared/notes/megatron-core-on-cpu.md). ``enable_cpu_compat()`` installs, once:

* ``torch.cuda`` replacements (``_patch_torch_cuda``): ``current_device`` returns the CPU device;
  ``synchronize``/``set_device``/``reset_peak_memory_stats`` do nothing; ``Stream``/``Event``/
  ``stream``/``current_stream``/``default_stream`` are inert stand-ins; ``get_rng_state``/
  ``set_rng_state``/``manual_seed``/``manual_seed_all`` act on the CPU generator, which plays the
  role of "the CUDA generator" here. Functions that already answer sensibly on a CPU-only torch
  (``device_count`` -> 0, ``memory_allocated`` and the other memory statistics -> 0,
  ``empty_cache``) are left alone. ``torch.cuda.is_available()`` stays False.
* a ``TorchFunctionMode`` (``_CudaToCpu``) that rewrites ``device="cuda"`` (and integer device
  indices) in factory calls and ``Tensor.to`` to CPU, makes ``Tensor.cuda``/``Tensor.pin_memory``
  return the tensor itself, drops ``pin_memory=True`` and ``Tensor.record_stream``, and makes
  ``Tensor.type()`` report ``torch.cuda.*`` names (megatron's optimizers whitelist those). Modes
  are not active inside custom ``autograd.Function.backward``, so the mode is re-entered there by
  wrapping ``BackwardCFunction.apply``. The mode is per thread: it is entered on the thread that
  calls ``enable_cpu_compat()``; call it again on any other thread that runs megatron code.
* megatron patches (``_patch_megatron``), applied when ``enable_cpu_compat()`` runs, never at
  import (``import megatron.core`` works on CPU as installed):
  ``tensor_parallel.random._get_cuda_rng_state``/``_set_cuda_rng_state`` use the CPU generator
  (they reach into ``torch.cuda.default_generators``, which a CPU build does not have), and the
  RNG tracker's "CPU RNG state changed within GPU RNG context" warning is filtered, because on CPU
  both generators are the same one and every random op inside ``fork()`` would trigger it;
  ``transformer.moe.moe_utils`` gets the ``fused_*``/``te_general_gemm`` names set to None (0.16.1
  only defines them when TransformerEngine imports, then reads them unconditionally);
  ``maybe_move_tensor_to_cpu`` returns numpy split sizes for the all-to-all dispatcher (the
  original converts only CUDA tensors, and gloo's ``all_to_all_single`` rejects tensor splits).
  megatron-core is otherwise used unpatched.

A GPU run never enters any of this: ``enable_cpu_compat()`` returns False without touching anything
when ``torch.cuda.is_available()`` is True.
"""

import contextlib
import logging
import threading

import torch
from torch.autograd.function import BackwardCFunction
from torch.overrides import TorchFunctionMode

__all__ = ["enable_cpu_compat", "cpu_compat_active"]

_CPU = torch.device("cpu")

# Names megatron-core 0.16.1's moe_utils imports from TransformerEngine inside a try block and
# later reads as globals; without TE they are never bound.
_MOE_TE_NAMES = (
    "fused_compute_score_for_moe_aux_loss",
    "fused_moe_aux_loss",
    "fused_permute",
    "fused_permute_with_probs",
    "fused_sort_chunks_by_index",
    "fused_sort_chunks_by_index_with_probs",
    "fused_topk_with_score_function",
    "fused_unpermute",
    "te_general_gemm",
)

_install_lock = threading.Lock()
_installed = False  # process-wide patches are in place
_thread_state = threading.local()  # .mode: the _CudaToCpu entered on this thread


def enable_cpu_compat() -> bool:
    """Make megatron-core's CUDA assumptions land on the CPU, for this process and calling thread.

    Returns False, changing nothing, when CUDA is available. Otherwise installs the process-wide
    patches (once) and enters the device-rewriting mode on the calling thread (once per thread),
    and returns True. Safe to call any number of times. Call it outside any ``with`` block of
    another TorchFunctionMode (such as ``with torch.device(...)``): the mode it enters stays on the
    thread's mode stack, below anything pushed later.
    """
    global _installed
    if torch.cuda.is_available():
        return False
    with _install_lock:
        if not _installed:
            _patch_torch_cuda()
            _patch_autograd_backward()
            _patch_megatron()
            _installed = True
    if getattr(_thread_state, "mode", None) is None:
        mode = _CudaToCpu()
        mode.__enter__()  # stays on this thread's mode stack for the life of the thread
        _thread_state.mode = mode
    return True


def cpu_compat_active() -> bool:
    """Whether the CPU layer is in effect on the calling thread."""
    return getattr(_thread_state, "mode", None) is not None


def _is_cuda_device(device) -> bool:
    """True for anything torch would read as a CUDA device: "cuda[:n]", a cuda torch.device, or an
    int index (bool is excluded: it is an int, but never a device)."""
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpu(TorchFunctionMode):
    """Rewrite CUDA placement requests in torch calls to the CPU.

    ``Tensor.cuda()`` and ``Tensor.to("cuda")`` return the tensor itself, as they do on a GPU for a
    tensor already there: on this machine the CPU is "the" device. ``Tensor.type()`` answers
    ``torch.cuda.FloatTensor`` & co. because megatron's DistributedOptimizer/Float16Optimizer accept
    only those names; the reverse rename lets ``x.type(y.type())`` keep working.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        if func is torch.Tensor.type:
            return _tensor_type(args, kwargs)
        if _is_cuda_device(kwargs.get("device")):
            kwargs = {**kwargs, "device": _CPU}
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


def _tensor_type(args, kwargs):
    """``Tensor.type`` under the mode: report CUDA type names, accept them as conversion targets."""
    if len(args) == 1 and not kwargs:
        name = torch.Tensor.type(args[0])
        return name.replace("torch.", "torch.cuda.", 1)
    if len(args) > 1 and isinstance(args[1], str):
        args = (args[0], args[1].replace("torch.cuda.", "torch.", 1), *args[2:])
    return torch.Tensor.type(*args, **kwargs)


class _CpuStream(torch.Stream):
    """Inert CUDA stream: on CPU every op is synchronous, so there is nothing to order or wait on.

    A real ``torch.Stream`` (on the CPU device) so that torch's argument parser accepts it, e.g. in
    ``Tensor.record_stream``, which then reaches the mode; ``query``/``synchronize`` are torch's.
    """

    def __new__(cls, device=None, priority=0, **kwargs):
        return super().__new__(cls, device=_CPU)

    def __init__(self, device=None, priority=0, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _CpuEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CpuEvent:
    """Inert CUDA event: always complete; timings read 0 ms."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end_event):
        return 0.0


_CPU_STREAM = _CpuStream()


def _seed_cpu_generator(seed):
    # torch.manual_seed itself calls torch.cuda.manual_seed_all, so this must not go through it.
    torch.default_generator.manual_seed(int(seed))


def _patch_torch_cuda():
    """Replace the ``torch.cuda`` functions megatron calls that raise on a CPU-only torch (or, for the
    RNG, silently do nothing) with CPU equivalents."""
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.reset_peak_memory_stats = lambda device=None: None
    cuda.Stream = _CpuStream
    cuda.Event = _CpuEvent
    cuda.current_stream = lambda device=None: _CPU_STREAM
    cuda.default_stream = lambda device=None: _CPU_STREAM
    cuda.stream = lambda stream: contextlib.nullcontext(stream)
    # The CPU generator stands in for the CUDA one: seeding/forking "CUDA" randomness (the RNG
    # tracker, dropout in tensor-parallel regions) must change what CPU random ops draw.
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.manual_seed = _seed_cpu_generator
    cuda.manual_seed_all = _seed_cpu_generator


def _patch_autograd_backward():
    """Re-enter the device mode inside custom ``autograd.Function.backward``, where torch function
    modes are not active (megatron allocates ``device="cuda"`` buffers in several backwards)."""
    original_apply = BackwardCFunction.apply

    def apply(self, *args):
        with _CudaToCpu():
            return original_apply(self, *args)

    BackwardCFunction.apply = apply


class _DropForkCpuRngWarning(logging.Filter):
    """Drop megatron's "CPU RNG state changed within GPU RNG context": on CPU the two are the same
    generator, so any random op inside ``get_cuda_rng_tracker().fork()`` would log it."""

    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_megatron():
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def get_cuda_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()  # already a fresh copy, so `clone` needs no extra work

    def set_cuda_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mp_random._get_cuda_rng_state = get_cuda_rng_state
    mp_random._set_cuda_rng_state = set_cuda_rng_state
    logging.getLogger(mp_random.__name__).addFilter(_DropForkCpuRngWarning())

    for name in _MOE_TE_NAMES:
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor):
            return tensor.detach().numpy()
        return tensor

    # token_dispatcher imported the function by name, so both bindings are replaced.
    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
