"""The CPU compatibility layer and process-group setup (dsv4.parallel.cpu_compat, dsv4.parallel.state).

Anything that initializes torch.distributed or enables the CPU layer runs in spawned workers
(tests/dist_utils.py), so the pytest process itself stays unpatched.
"""

import logging
import os

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_isolated, run_workers
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    get_cuda_rng_tracker,
    get_data_parallel_rng_tracker_name,
    model_parallel_cuda_manual_seed,
)
from megatron.core.tensor_parallel import random as mp_random
from megatron.core.transformer.moe import moe_utils, token_dispatcher
from torch.autograd.function import BackwardCFunction
from torch.overrides import _get_current_function_mode_stack

from dsv4.parallel.cpu_compat import cpu_compat_active, enable_cpu_compat
from dsv4.parallel.state import destroy_distributed, init_distributed

ATOL = 1e-6


def test_enable_is_a_noop_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda_attrs = dict(vars(torch.cuda))
    patched_elsewhere = {
        "BackwardCFunction.apply": BackwardCFunction.apply,
        "_get_cuda_rng_state": mp_random._get_cuda_rng_state,
        "_set_cuda_rng_state": mp_random._set_cuda_rng_state,
        "moe_utils.maybe_move_tensor_to_cpu": moe_utils.maybe_move_tensor_to_cpu,
        "token_dispatcher.maybe_move_tensor_to_cpu": token_dispatcher.maybe_move_tensor_to_cpu,
    }
    modes = list(_get_current_function_mode_stack())
    active = cpu_compat_active()

    assert enable_cpu_compat() is False

    assert vars(torch.cuda).keys() == cuda_attrs.keys()
    changed = [name for name, value in vars(torch.cuda).items() if value is not cuda_attrs[name]]
    assert changed == [], f"torch.cuda attributes changed: {changed}"
    assert BackwardCFunction.apply is patched_elsewhere["BackwardCFunction.apply"]
    assert mp_random._get_cuda_rng_state is patched_elsewhere["_get_cuda_rng_state"]
    assert mp_random._set_cuda_rng_state is patched_elsewhere["_set_cuda_rng_state"]
    assert moe_utils.maybe_move_tensor_to_cpu is patched_elsewhere["moe_utils.maybe_move_tensor_to_cpu"]
    assert (
        token_dispatcher.maybe_move_tensor_to_cpu
        is patched_elsewhere["token_dispatcher.maybe_move_tensor_to_cpu"]
    )
    assert list(_get_current_function_mode_stack()) == modes
    assert cpu_compat_active() is active


def test_tensor_parallel_on_two_ranks():
    run_workers(_tensor_parallel_worker, 2)


def test_single_process_init_and_size_errors():
    run_isolated(_single_process_worker)


def test_cuda_requests_land_on_cpu():
    run_isolated(_device_rewrite_worker)


# --- workers (module level: spawned processes import them by name) ---------------------------


def _tensor_parallel_worker(rank, world_size):
    groups = init_distributed(tp=2)
    assert cpu_compat_active()
    assert (groups.tp_size, groups.tp_rank) == (2, rank)
    assert (groups.pp_size, groups.ep_size, groups.dp_size) == (1, 1, 1)
    assert (groups.pp_rank, groups.ep_rank, groups.dp_rank) == (0, 0, 0)
    assert init_distributed(tp=2) == groups

    _check_column_and_row_parallel_linear(groups)
    _check_rng_tracker(groups)

    with pytest.raises(ValueError, match=r"already initialized with tp=2, pp=1, ep=1.*destroy_distributed"):
        init_distributed(tp=1)
    destroy_distributed()


def _check_column_and_row_parallel_linear(groups):
    """Sharded megatron linears built from a full nn.Linear's weights reproduce it, forward and
    backward: ColumnParallelLinear(gather_output) then RowParallelLinear(input_is_parallel)."""
    tp, rank = groups.tp_size, groups.tp_rank
    seq, batch, d_in, d_hidden, d_out = 3, 2, 6, 8, 5
    shard = slice(rank * d_hidden // tp, (rank + 1) * d_hidden // tp)
    torch.manual_seed(0)  # identical full weights, inputs and output grads on every rank
    full_col, full_row = torch.nn.Linear(d_in, d_hidden), torch.nn.Linear(d_hidden, d_out)
    x = torch.randn(seq, batch, d_in)
    h = torch.randn(seq, batch, d_hidden)
    grad_col, grad_row = torch.randn(seq, batch, d_hidden), torch.randn(seq, batch, d_out)

    config = ModelParallelConfig(
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        perform_initialization=False,  # weights are copied in from the full layers below
    )
    common = dict(config=config, init_method=torch.nn.init.zeros_, bias=True, tp_group=groups.tp)
    col = ColumnParallelLinear(d_in, d_hidden, gather_output=True, **common)
    row = RowParallelLinear(d_hidden, d_out, input_is_parallel=True, skip_bias_add=False, **common)
    with torch.no_grad():
        col.weight.copy_(full_col.weight[shard])
        col.bias.copy_(full_col.bias[shard])
        row.weight.copy_(full_row.weight[:, shard])
        row.bias.copy_(full_row.bias)

    x_ref, x_tp = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = full_col(x_ref)
    y_tp, _ = col(x_tp)
    y_ref.backward(grad_col)
    y_tp.backward(grad_col)
    torch.testing.assert_close(y_tp, y_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(x_tp.grad, x_ref.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(col.weight.grad, full_col.weight.grad[shard], atol=ATOL, rtol=0)

    h_ref, h_tp = h.clone().requires_grad_(), h[..., shard].clone().requires_grad_()
    z_ref = full_row(h_ref)
    z_tp, _ = row(h_tp)
    z_ref.backward(grad_row)
    z_tp.backward(grad_row)
    torch.testing.assert_close(z_tp, z_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(h_tp.grad, h_ref.grad[..., shard], atol=ATOL, rtol=0)
    torch.testing.assert_close(row.weight.grad, full_row.weight.grad[:, shard], atol=ATOL, rtol=0)


def _check_rng_tracker(groups):
    """megatron's RNG tracker drives the CPU generator: the model-parallel stream differs between
    tp ranks, the data-parallel one agrees, fork() restores the default stream and continues its
    own, and megatron's "CPU RNG state changed" warning is not logged for it."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger(mp_random.__name__).addHandler(handler)

    model_parallel_cuda_manual_seed(1234)
    tracker = get_cuda_rng_tracker()
    outside = torch.get_rng_state()
    with tracker.fork():
        tp_draw = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outside)
    with tracker.fork(get_data_parallel_rng_tracker_name()):
        dp_draw = torch.rand(4)
    with tracker.fork():
        tp_draw_again = torch.rand(4)
    assert not torch.equal(tp_draw, tp_draw_again)

    tp_draws = [torch.empty(4) for _ in range(groups.tp_size)]
    dp_draws = [torch.empty(4) for _ in range(groups.tp_size)]
    dist.all_gather(tp_draws, tp_draw, group=groups.tp)
    dist.all_gather(dp_draws, dp_draw, group=groups.tp)
    assert not torch.equal(tp_draws[0], tp_draws[1])
    assert torch.equal(dp_draws[0], dp_draws[1])
    assert records == []


def _single_process_worker():
    assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ
    for _ in range(2):
        groups = init_distributed()
        assert dist.get_world_size() == 1 and dist.get_backend() == "gloo"
        assert (groups.tp_size, groups.pp_size, groups.ep_size, groups.dp_size) == (1, 1, 1, 1)
        assert (groups.tp_rank, groups.pp_rank, groups.ep_rank, groups.dp_rank) == (0, 0, 0, 0)
        destroy_distributed()
        assert not dist.is_initialized()

    with pytest.raises(ValueError, match=r"world_size=1 is not divisible by tp\*pp = 2\*1 = 2"):
        init_distributed(tp=2)
    with pytest.raises(ValueError, match=r"world_size=1 is not divisible by etp\*ep\*pp = 1\*2\*1 = 2"):
        init_distributed(ep=2)
    with pytest.raises(ValueError, match=r"world_size=1 is not divisible by etp\*ep\*pp = 2\*1\*1 = 2"):
        init_distributed(etp=2)
    assert not dist.is_initialized()  # sizes are checked before anything is set up


def test_interleaved_two_stage_pipeline_is_rejected_on_gloo_only():
    """Interleaving with pp=2 gives wrong gradients on gloo (measured): a clear error there, allowed on NCCL."""
    from dsv4.model.config import ConfigError
    from dsv4.parallel.state import _check_sizes

    with pytest.raises(ConfigError, match=r"parallel.vpp: .*pp=2 gives wrong gradients on the gloo backend"):
        _check_sizes(4, tp=1, pp=2, ep=1, etp=1, vpp=2, backend="gloo")
    _check_sizes(4, tp=1, pp=2, ep=1, etp=1, vpp=2, backend="nccl")
    _check_sizes(6, tp=1, pp=3, ep=1, etp=1, vpp=2, backend="gloo")
    with pytest.raises(ValueError, match=r"vpp=2 virtual stages need pipeline parallelism"):
        _check_sizes(2, tp=1, pp=1, ep=1, etp=1, vpp=2, backend="gloo")


class _AllocatesOnCudaInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * torch.full(grad.shape, 2.0, device="cuda")


def _device_rewrite_worker():
    assert enable_cpu_compat() is True
    assert enable_cpu_compat() is True  # idempotent
    assert cpu_compat_active()
    assert not torch.cuda.is_available()

    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(2, device=torch.cuda.current_device(), pin_memory=True).device.type == "cpu"
    t = torch.ones(2)
    assert t.cuda() is t and t.to("cuda:0") is t and t.pin_memory() is t
    assert t.to(0, torch.float64).dtype == torch.float64
    t.record_stream(torch.cuda.current_stream())
    assert t.type() == "torch.cuda.FloatTensor"
    assert t.type("torch.cuda.DoubleTensor").dtype == torch.float64

    x = torch.ones(3, requires_grad=True)
    _AllocatesOnCudaInBackward.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        end.record()
    torch.cuda.synchronize()
    assert start.elapsed_time(end) == 0.0

    torch.cuda.manual_seed(7)
    assert torch.equal(torch.cuda.get_rng_state(), torch.manual_seed(7).get_state())

    assert moe_utils.te_general_gemm is None and moe_utils.fused_permute is None
    splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
    assert splits.tolist() == [3, 1] and not torch.is_tensor(splits)
