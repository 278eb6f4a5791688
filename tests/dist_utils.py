"""Multi-process helpers for tests: run a function on N gloo ranks and turn any rank's failure into
a test failure that shows that rank's traceback.

Workers are started with the ``forkserver`` method, so the function must be defined at module level in
an importable module (a test module is fine), and each worker starts from a clean interpreter:
nothing a test did in the pytest process (process groups, the CPU compatibility layer) leaks in. The fork server
is a fresh interpreter that has only imported torch, megatron-core and dsv4 (5-8 s per process on the CI machine,
paid once instead of once per rank); it holds no threads, process groups or patches when it forks a worker.
"""

import os
import socket
import time
import traceback

import pytest
import torch.multiprocessing as mp

_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")

# Imported once by the fork server; every worker forks from it with these modules loaded and nothing run.
_PRELOAD = ["torch", "dsv4.conf.schema", "dsv4.model.transformer", "dsv4.train.loop"]

# Once one rank has failed, the others are usually blocked in a collective that will never
# complete (gloo waits 30 minutes); give them this long to finish on their own, then kill them.
_GRACE_AFTER_FAILURE_S = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(fn, world_size: int, *args, timeout: float = 120.0) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes set up as torchrun would
    (MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK), and fail the test if any rank raises,
    exits abnormally or is still running after ``timeout`` seconds."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world_size)}
    jobs = [
        ({**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, (rank, world_size, *args))
        for rank in range(world_size)
    ]
    _launch(fn, jobs, timeout)


def run_isolated(fn, *args, timeout: float = 120.0) -> None:
    """Run ``fn(*args)`` in one fresh process with no launcher environment, and fail the test if it
    raises: for code that changes process-wide state, like ``init_distributed()``'s single-process
    path or ``enable_cpu_compat()``."""
    _launch(fn, [({}, args)], timeout)


def _launch(fn, jobs, timeout):
    """Start one process per ``(env, args)`` job, wait, and report every failed process."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # takes effect when the fork server starts (the first launch)
    results = ctx.SimpleQueue()
    # Not daemonic: ranks may start processes of their own (megatron-core's checkpoint writers fork); `finally`
    # below kills whatever is left when the wait is interrupted.
    procs = [
        ctx.Process(target=_worker, args=(index, env, results, fn, args), daemon=False)
        for index, (env, args) in enumerate(jobs)
    ]
    try:
        for proc in procs:
            proc.start()
        _wait(procs, results, timeout)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()


def _wait(procs, results, timeout):
    """Wait for the processes, collect their tracebacks, and fail the test on any failure."""
    failures = {}

    def collect():
        # Drained while waiting: a child blocks on a full pipe until its traceback is read.
        while not results.empty():
            index, error = results.get()
            if error is not None:
                failures[index] = error

    deadline = time.monotonic() + timeout
    while any(proc.is_alive() for proc in procs) and time.monotonic() < deadline:
        collect()
        if failures:
            deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE_S)
        time.sleep(0.05)
    collect()

    for index, proc in enumerate(procs):
        if proc.is_alive():
            proc.kill()
            proc.join()
            failures.setdefault(index, f"still running after {timeout:.0f} s or a peer's failure; killed")
        elif proc.exitcode != 0:
            failures.setdefault(index, f"exited with code {proc.exitcode}")
    if failures:
        report = "\n".join(f"--- rank {index} ---\n{error}" for index, error in sorted(failures.items()))
        pytest.fail(f"{len(failures)} of {len(procs)} worker(s) failed:\n{report}", pytrace=False)


def _worker(index, env, results, fn, args):
    for name in _LAUNCH_ENV:
        os.environ.pop(name, None)
    os.environ.update(env)
    try:
        fn(*args)
    except BaseException:
        results.put((index, traceback.format_exc()))
        raise SystemExit(1)
    results.put((index, None))
