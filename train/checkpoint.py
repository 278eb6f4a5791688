"""Sharded checkpoints: save, publish, find, verify and load, under any parallel layout.

Format: megatron-core `dist_checkpointing` with its torch_dist backend (PyTorch Distributed Checkpoint files). Every
tensor is stored under its global name and shape (`dsv4.parallel.sharding`), so a checkpoint saved under one
layout (tp, pp, vpp, ep, etp, dp) loads under another. A checkpoint folder holds:

    __<rank>_<n>.distcp, .metadata, common.pt, metadata.json    megatron-core / PyTorch DCP files
    dsv4.json     step, consumed samples, layout, model/data signature, sha256 of every file: the completion mark
    config.yaml   the resolved config of the run that saved it

What a checkpoint holds: the model (parameters, router expert biases, hash tables), the optimizer (AdamW moments
and fp32 master weights of megatron-core's optimizer, distributed or not, as whole per-parameter tensors:
`dsv4.optim.adam_state`; Muon momentum and AdamW moments of `DistributedMuon`), the step (the LR and attention-phase schedules are functions of it), the data loader's
consumed samples, and every rank's RNG state (restored only under the same layout; nothing in training draws
random numbers after init today, it is kept for exactness).

Crash safety: ranks write into `step_<N>.partial/`; when all have finished, each rank hashes the files it wrote,
rank 0 writes dsv4.json, renames the folder to `step_<N>/` and then replaces `latest` atomically. A folder without dsv4.json is never chosen; `run.keep_last` complete checkpoints are kept.
A run holds its folder's lock file (`dsv4.lock`, rank 0) from start-up to exit, so that two runs never write the
same `.partial` folder; holding it, it removes the torn saves of earlier runs. A save that finds the disk full
removes its `.partial` folder and raises one CheckpointError saying what is needed and what is intact. The
processes megatron forks to write (and to save in the background) die with their rank (PR_SET_PDEATHSIG).

Safety on load: loading never unpickles arbitrary objects. DCP's `.metadata` is a pickle that PyTorch reads with an
unrestricted unpickler, so it is first read with an allow-list unpickler (`_SafeUnpickler`); `common.pt` is read
with `torch.load(weights_only=True)`; no pickled objects (ShardedObject) are written or requested. Every file's
sha256 is checked against dsv4.json before any tensor is read (the ranks share the work).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import multiprocessing as mp
import os
import pickle
import re
import shutil
import signal
import socket
import sys
import time
from multiprocessing.managers import SyncManager
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint import CheckpointException
from omegaconf import OmegaConf

from dsv4.optim.adam_state import adam_sharded_state_dict, load_adam_state_dict
from dsv4.optim.distributed import DistributedMuon
from dsv4.parallel.sharding import model_sharded_state_dict, rank_sharded_tensor

FORMAT = 1
"""Version of the dsv4.json record; bumped when the layout of a checkpoint changes."""
MARK = "dsv4.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
# Model fields that only steer training; a checkpoint loads into a model that differs in them.
TRAINING_ONLY = {"bias_update_rate", "seq_aux_loss_coef", "mtp_loss_weight", "indexer_loss_coef",
                 "dense_attention_steps", "indexer_warmup_steps", "init_std"}


class CheckpointError(ValueError):
    """A checkpoint cannot be used: incomplete, corrupt, unsafe, or from an incompatible run. The message names the
    file or the setting and what to do."""


# --- where checkpoints live ------------------------------------------------------------------------------------------

def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def complete_checkpoints(root: str) -> list:
    """(step, path) of the complete checkpoints under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, MARK)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest complete checkpoint under `root`, None when there is none. The `latest` file names it after a
    clean save (for people and scripts); it can lag behind after a crash between the folder rename and its update,
    so it is not what decides."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def resolve_resume(resume: str, run_dir: str) -> Optional[str]:
    """run.resume -> the checkpoint folder to load, or None to start from scratch.

    none: never resume. auto: the latest complete checkpoint of this run folder, if any. Anything else is a path:
    a checkpoint folder, a `checkpoints/` folder, or a run folder (its latest complete checkpoint)."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(checkpoint_root(run_dir))
    path = os.path.abspath(os.path.expanduser(resume))
    if os.path.isfile(os.path.join(path, MARK)):
        return path
    for root in (path, checkpoint_root(path)):
        found = latest_checkpoint(root)
        if found:
            return found
    if not os.path.exists(path):
        raise CheckpointError(f"run.resume={resume}: no such file or folder; give a checkpoint folder "
                              f"(.../checkpoints/step_N), a run folder, or run.resume=auto")
    if _STEP_DIR.match(os.path.basename(path.rstrip("/").removesuffix(".partial"))) or path.endswith(".partial"):
        raise CheckpointError(f"run.resume={resume}: the checkpoint is incomplete (no {MARK}: its save did not "
                              f"finish); resume from an earlier one, e.g. run.resume=auto")
    raise CheckpointError(f"run.resume={resume}: holds no complete dsv4 checkpoint (no {MARK}, no checkpoints/)")


# --- one run per folder ---------------------------------------------------------------------------------------------

LOCK = "dsv4.lock"
"""The run folder's lock file: JSON with the host, pid (and its start time), SLURM job of the run that holds it."""


def _process_start(pid: int) -> Optional[int]:
    """Start time of process `pid` in clock ticks since boot (Linux /proc), None where unknown: with the pid it
    tells a live holder from an unrelated process that got the pid later."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _holder_gone(holder: dict, me: dict) -> Optional[str]:
    """Why the run recorded in a lock file has certainly ended (so its lock is stale), or None."""
    if holder.get("slurm_job") and holder["slurm_job"] == me["slurm_job"] \
            and holder.get("slurm_restart") != me["slurm_restart"]:
        return f"this SLURM job ({me['slurm_job']}) was requeued; its earlier run has ended"
    if holder.get("host") != me["host"]:
        return None  # another machine: its processes cannot be seen from here
    pid = int(holder.get("pid", 0))
    if pid == me["pid"]:
        return "it was left by this process"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"its process {pid} no longer exists"
    except PermissionError:  # alive, another user's
        pass
    started = _process_start(pid)
    if holder.get("pid_start") is not None and started is not None and started != holder["pid_start"]:
        return f"pid {pid} now belongs to another process"
    return None


class RunLock:
    """The lock of a run folder held by this process (rank 0): taken by `claim_run_dir`, removed by `release`."""

    def __init__(self, path: str, owner: dict):
        self.path, self.owner = path, owner

    def release(self) -> None:
        """Remove the lock file if it still records this process (it may have been deleted by hand)."""
        try:
            with open(self.path) as f:
                if json.load(f) != self.owner:
                    return
            os.remove(self.path)
        except (OSError, ValueError):
            pass


def take_run_lock(run_dir: str) -> tuple:
    """Take the lock of `run_dir` (created if needed) for this process: returns (RunLock, notice), the notice
    saying whose stale lock was taken over ("" if none). Raises CheckpointError naming the run that holds it."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK)
    me = _this_process()
    notice = ""
    for _ in range(3):  # a stale lock is removed, then taken like a free one (another run may win the race)
        tmp = f"{path}.{me['host']}.{me['pid']}.tmp"
        with open(tmp, "w") as f:
            json.dump(me, f)
        try:
            os.link(tmp, path)  # atomic: the lock file appears complete, or not at all when it exists
            return RunLock(path, me), notice
        except FileExistsError:
            pass
        finally:
            os.remove(tmp)
        try:
            with open(path) as f:
                holder = json.load(f)
        except FileNotFoundError:
            continue  # released meanwhile
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable lock file ({e}); if no other run uses run.output_dir="
                                  f"{run_dir}, delete {path} and start again") from None
        who = f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}" + (
            f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else "")
        gone = _holder_gone(holder, me)
        if gone is None:
            where = "it may still be running there (this host cannot check)" if holder.get("host") != me["host"] \
                else "that process is alive"
            raise CheckpointError(
                f"run.output_dir={run_dir} is in use by another run ({who}): {where}. Two runs in one folder would "
                f"write the same checkpoints; wait for it to end or set another run.output_dir. If that run has "
                f"ended (e.g. its node died), delete {path} and start again.")
        notice = f"took over the stale lock {path} of {who}: {gone}"
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    raise CheckpointError(f"{path}: could not take the lock (other runs are starting in run.output_dir={run_dir} "
                          f"at the same time); start one run per folder")


def remove_stale_partials(run_dir: str) -> list:
    """Remove the `step_N.partial/` folders of saves that died (call it holding the run's lock, so no save of
    another run is in progress); returns the folders removed."""
    root = checkpoint_root(run_dir)
    removed = []
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            if name.endswith(".partial") and _STEP_DIR.match(name.removesuffix(".partial")):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                removed.append(os.path.join(root, name))
    return removed


@contextlib.contextmanager
def claim_run_dir(run_dir: str, notify=print):
    """All ranks: rank 0 takes the run folder's lock (`take_run_lock`) and removes torn saves of earlier runs,
    before anything else of the run is written there; the lock is released when the block ends (also on an
    exception). A folder held by another run raises CheckpointError on every rank."""
    lock, outcome = None, [None, ""]
    if dist.get_rank() == 0:
        try:
            lock, notice = take_run_lock(run_dir)
            removed = remove_stale_partials(run_dir)
            outcome[1] = "\n".join(filter(None, [notice] + [f"removed the torn save {p}" for p in removed]))
        except CheckpointError as e:
            outcome[0] = str(e)
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[0]:
        raise CheckpointError(outcome[0])
    if outcome[1] and lock is not None:
        notify(f"dsv4-train: {outcome[1]}")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


# --- what goes into a checkpoint -------------------------------------------------------------------------------------

def _layout(cfg, groups) -> dict:
    p = cfg.parallel
    return {"world": dist.get_world_size(), "tp": p.tp, "pp": p.pp, "vpp": p.vpp, "ep": p.ep, "etp": p.etp,
            "dp": groups.dp_size, "pp_layers": list(p.pp_layers) if p.pp_layers else None}


def _data_signature(cfg) -> dict:
    """What fixes the order of training samples: resuming with a different one would not continue the data."""
    d = cfg.data
    return {"prefixes": list(d.prefixes), "weights": list(d.weights), "split": d.split,
            "seq_length": d.seq_length, "seed": cfg.run.seed, "train_samples": cfg.run.steps * d.global_batch_size}


def _optimizer_kind(cfg) -> str:
    if cfg.optim.name == "muon":
        return "muon"
    return "adamw-distributed" if cfg.parallel.distributed_optimizer else "adamw"


def _rng_states() -> dict:
    states = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["rng.torch_cuda"] = torch.cuda.get_rng_state()
    return states


def sharded_state(chunks, optimizer, cfg, groups, step: int, consumed_samples: int, is_loading: bool,
                  available: Optional[set] = None, with_rng: bool = True) -> dict:
    """The sharded state dict of this rank: model, optimizer, counters, RNG."""
    model = model_sharded_state_dict(chunks, groups)
    state = {"model": model, "step": step, "consumed_samples": consumed_samples}
    if optimizer is not None:
        if isinstance(optimizer, DistributedMuon):
            state["optimizer"] = optimizer.sharded_state_dict(model, is_loading, available)
        else:
            state["optimizer"] = adam_sharded_state_dict(optimizer, model, is_loading, available)
    if with_rng:
        state["rng"] = {k: rank_sharded_tensor(k, v.clone() if is_loading else v) for k, v in _rng_states().items()}
    return state


# --- save --------------------------------------------------------------------------------------------------------------

_WRITER_RESULTS = None  # the Manager serving megatron's writer-results queue, kept alive with this process


def _die_with_parent(signum: int) -> bool:
    """Ask Linux to send `signum` to this process when the thread that forked it ends (PR_SET_PDEATHSIG); False
    where that is not available (not Linux: the process then outlives a killed rank)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(1, signum) == 0  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def _exit_with_parent() -> None:
    """Runs in the Manager's server process: ask Linux to terminate it when the rank that started it dies."""
    _die_with_parent(signal.SIGTERM)


# megatron forks during a save: the background process of an async save (TemporalAsyncCaller) and, in it or in the
# rank itself, one writer process per file (FileSystemWriterAsync.write_preloaded_data_multiproc). A rank killed
# with SIGKILL cannot stop them: they were left as orphans holding the checkpoint in memory and waiting on queues
# whose other end died (measured: ~510 MiB each, for up to 26 minutes). So every process forked while dsv4 has a
# save in megatron's hands is told to die with its parent: a fork hook, inherited by the forked processes, that
# is active only inside `_forks_die_with_parent` (the flag is copied into a child at its fork, so the background
# process of an async save passes it on to the writers it forks later).
_FORKS_DIE = False
_FORKING_PID = 0


def _note_forking_pid() -> None:
    global _FORKING_PID
    _FORKING_PID = os.getpid()


def _child_dies_with_parent() -> None:
    if not _FORKS_DIE:
        return
    _die_with_parent(signal.SIGKILL)
    if os.getppid() != _FORKING_PID:  # the parent died between the fork and the prctl: no signal will come
        os._exit(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_note_forking_pid, after_in_child=_child_dies_with_parent)


@contextlib.contextmanager
def _forks_die_with_parent():
    """Processes forked inside the block (megatron's checkpoint writers) get SIGKILL when their parent dies."""
    global _FORKS_DIE
    _FORKS_DIE = True
    try:
        yield
    finally:
        _FORKS_DIE = False


def _writer_results_queue() -> None:
    """megatron-core's checkpoint writers (forked per save) report through a queue served by a multiprocessing
    Manager that megatron starts with the spawn method: ~5 s to re-import the trainer's `__main__` in every rank,
    and a ~270 MB server left behind by every rank that is killed. dsv4 hands megatron a queue from a Manager
    started by fork (the server runs no torch code) that exits with its rank."""
    global _WRITER_RESULTS
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None and "fork" in mp.get_all_start_methods():
        _WRITER_RESULTS = SyncManager(ctx=mp.get_context("fork"))
        _WRITER_RESULTS.start(initializer=_exit_with_parent)
        filesystem_async._results_queue = _WRITER_RESULTS.Queue()


def save_checkpoint(run_dir: str, step: int, chunks, optimizer, loader, cfg, groups, async_queue=None) -> str:
    """Save this rank's shards of step `step` (all ranks call it) and publish the checkpoint once every rank has
    written. With `async_queue` (megatron's AsyncCallsQueue) the writes run in the background and the checkpoint is
    published when the queue finalizes them. Returns the final folder."""
    root = checkpoint_root(run_dir)
    final = step_dir(root, step)
    partial = final + ".partial"
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # a save of this step that died earlier
        os.makedirs(partial)
    dist.barrier()
    _writer_results_queue()
    state = sharded_state(chunks, optimizer, cfg, groups, step, loader.consumed_samples, is_loading=False)
    record = {"format": FORMAT, "step": step, "consumed_samples": loader.consumed_samples,
              "layout": _layout(cfg, groups), "optimizer": _optimizer_kind(cfg),
              "model": dataclasses.asdict(cfg.model), "data": _data_signature(cfg)}
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(dataclasses.asdict(cfg)))

    # This rank's tensor bytes x ranks: what a first save needs at most (replicated tensors are written once).
    estimate = dist.get_world_size() * sum(t.data.numel() * t.data.element_size() for t in nested_values(state)
                                           if isinstance(t, ShardedTensor))

    def publish():
        _publish(root, partial, final, record, config_yaml, cfg.run.keep_last)

    def failed(e: BaseException):
        _raise_if_disk_full(e, root, partial, step, estimate, cfg.run.keep_last)

    try:
        if async_queue is None:
            with _forks_die_with_parent():
                dist_checkpointing.save(state, partial, validate_access_integrity=True)
            publish()
        else:
            request = dist_checkpointing.save(state, partial, validate_access_integrity=True, async_sharded_save=True)
            request.add_finalize_fn(publish)
            request = request._replace(finalize_fns=[_guarded(list(request.finalize_fns), failed)])
            with _forks_die_with_parent():
                async_queue.schedule_async_request(request)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - a full disk becomes a CheckpointError, the rest
        failed(e)                                     # goes on (DCP's CheckpointException is a BaseException)
        raise
    return final


def _guarded(finalize_fns: list, failed):
    """One finalize function of an async save: megatron's (and the publish), with a failure passed to `failed`."""
    def finalize():
        try:
            for fn in finalize_fns:
                fn()
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            failed(e)
            raise
    return finalize


class _PublishFailed(RuntimeError):
    """Rank 0 could not publish a checkpoint (raised on every rank)."""


def _disk_full(e: BaseException, seen=None) -> str:
    """The operating system's words if `e` (or what caused it, or a failure megatron collected from a rank or a
    writer process) is a full disk or quota, else ""."""
    seen = seen if seen is not None else set()
    if e is None or id(e) in seen:
        return ""
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"[Errno {e.errno}] {e.strerror}"
    for cause in (e.__cause__, e.__context__,
                  *(f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values())):
        if isinstance(cause, BaseException) and (found := _disk_full(cause, seen)):
            return found
    text = str(e)
    return next((words for words in ("No space left on device", "Disk quota exceeded") if words in text), "")


def _raise_if_disk_full(e: BaseException, root: str, partial: str, step: int, estimate: int, keep_last: int):
    """A save failed with `e`. On a full disk: remove the torn `partial` folder and raise a CheckpointError that says
    which folder, how much the checkpoint needs and what is intact. Failures megatron raises on every rank (its
    write results are gathered) and publishing failures are decided together, so that every rank raises the same."""
    words = _disk_full(e)
    world = dist.get_world_size()
    if world > 1 and isinstance(e, (CheckpointException, _PublishFailed)):
        everyone = [None] * world
        dist.all_gather_object(everyone, words)
        words = next((w for w in everyone if w), "")
    if not words:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    complete = complete_checkpoints(root)
    if complete:
        with open(os.path.join(complete[-1][1], MARK)) as f:
            needed = sum(v["bytes"] for v in json.load(f)["files"].values())
        intact = (f"the complete checkpoints are intact ({', '.join(os.path.basename(p) for _, p in complete)}); "
                  f"the same command resumes from {os.path.basename(complete[-1][1])}")
    else:
        needed = estimate
        intact = "no checkpoint of this run was complete yet: the same command starts from step 0"
    free = shutil.disk_usage(root).free if os.path.isdir(root) else 0
    raise CheckpointError(
        f"disk full while saving step {step} into {partial} ({words}): a checkpoint of this run needs about "
        f"{needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB are free there now that the torn save is removed. "
        f"{intact[0].upper() + intact[1:]} once space is freed (delete other files, lower run.keep_last={keep_last}, "
        f"or move run.output_dir to a larger disk).") from e


def _file_digests(folder: str, names: list) -> dict:
    out = {}
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = {"sha256": hashlib.file_digest(f, "sha256").hexdigest(),
                         "bytes": os.path.getsize(os.path.join(folder, name))}
    return out


def _publish(root: str, partial: str, final: str, record: dict, config_yaml: str, keep_last: int) -> None:
    """All ranks: hash the files this rank wrote; rank 0: record them, make the folder visible, move `latest`."""
    rank = dist.get_rank()
    mine = sorted(n for n in os.listdir(partial) if n.startswith(f"__{rank}_") and n.endswith(".distcp"))
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, _file_digests(partial, mine))
    failure, cause = [""], None
    if rank == 0:
        try:
            shared = [n for n in os.listdir(partial) if not n.endswith(".distcp")]
            files = _file_digests(partial, sorted(shared))
            for d in digests:
                files.update(d)
            _write_synced(os.path.join(partial, "config.yaml"), config_yaml)
            _write_synced(os.path.join(partial, MARK), json.dumps({**record, "files": files}, indent=1))
            if os.path.exists(final):  # this step was saved before a crash and is saved again: replace it
                shutil.rmtree(final)
            os.rename(partial, final)
            _write_synced(os.path.join(root, LATEST + ".tmp"), os.path.basename(final))
            os.replace(os.path.join(root, LATEST + ".tmp"), os.path.join(root, LATEST))
            _fsync_dir(root)
        except OSError as e:
            failure, cause = [f"publishing {final} failed: {e}"], e
        else:
            for _, old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    dist.broadcast_object_list(failure, src=0)  # every rank learns the outcome (and waits for the publish)
    if failure[0]:
        raise _PublishFailed(failure[0]) from cause


def _write_synced(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- verify ------------------------------------------------------------------------------------------------------------

class _SafeUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata: the classes defined in PyTorch's checkpoint metadata modules (and megatron's), torch
    sizes, dtypes and layouts, and plain containers; refuses anything else, so a planted pickle cannot call a
    function (a dotted name such as `module.os.system` is refused too)."""

    CLASS_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                     "torch.distributed.checkpoint.planner", "megatron.core.dist_checkpointing.strategies.torch")
    ALLOWED = {("torch", "Size"), ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
               ("torch.serialization", "_get_layout")}  # the last: torch.layout by name, from a fixed table

    def find_class(self, module: str, name: str):
        if "." not in name:
            if (module, name) in self.ALLOWED:
                return super().find_class(module, name)
            obj = getattr(sys.modules.get(module), name, None)
            if module == "torch" and isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
            if module in self.CLASS_MODULES and isinstance(obj, type) and obj.__module__ == module:
                return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def read_record(path: str) -> dict:
    """dsv4.json of a checkpoint folder, checked to be a complete dsv4 checkpoint of a known format."""
    mark = os.path.join(path, MARK)
    if not os.path.isfile(mark):
        raise CheckpointError(f"{path}: not a complete dsv4 checkpoint (no {MARK}; its save did not finish); "
                              f"resume from an earlier one (run.resume=auto picks the latest complete one)")
    try:
        with open(mark) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{mark}: unreadable ({e}); the checkpoint is damaged, use an earlier one") from None
    if record.get("format") != FORMAT:
        raise CheckpointError(f"{mark}: checkpoint format {record.get('format')!r}, this dsv4 reads format {FORMAT}")
    return record


def verify_files(path: str, record: dict) -> None:
    """Every file the record lists is present, of its size and sha256 (the ranks split the hashing), and the DCP
    metadata unpickles with the allow-list. Raises CheckpointError naming the first bad file, on every rank."""
    names = sorted(record["files"])
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    problem = ""
    for name in names[rank::world]:
        expected, file = record["files"][name], os.path.join(path, name)
        if not os.path.isfile(file):
            problem = f"{file}: missing (the checkpoint lists it)"
        elif os.path.getsize(file) != expected["bytes"]:
            problem = f"{file}: {os.path.getsize(file)} bytes, the checkpoint recorded {expected['bytes']} (truncated?)"
        elif _file_digests(path, [name])[name]["sha256"] != expected["sha256"]:
            problem = f"{file}: contents differ from the recorded sha256 (corrupted)"
        if problem:
            break
    if not problem:
        problem = _check_pickles(path)
    problems = [None] * world
    if world > 1:
        dist.all_gather_object(problems, problem)
    else:
        problems = [problem]
    bad = next((p for p in problems if p), "")
    if bad:
        raise CheckpointError(f"{bad}; the checkpoint cannot be loaded, resume from another one "
                              f"(run.resume=<path to an earlier step_N>)")


def _check_pickles(path: str) -> str:
    """The two pickled files a load reads, checked without executing anything they might contain."""
    try:
        with open(os.path.join(path, ".metadata"), "rb") as f:
            _SafeUnpickler(f).load()
    except FileNotFoundError:
        return f"{os.path.join(path, '.metadata')}: missing"
    except Exception as e:  # noqa: BLE001 - any failure to unpickle safely is a bad checkpoint
        return f"{os.path.join(path, '.metadata')}: refused ({type(e).__name__}: {e})"
    try:
        torch.load(os.path.join(path, "common.pt"), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return f"{os.path.join(path, 'common.pt')}: missing"
    except Exception as e:  # noqa: BLE001
        return f"{os.path.join(path, 'common.pt')}: refused ({type(e).__name__}: {str(e).splitlines()[0]})"
    return ""


def check_compatible(path: str, record: dict, cfg) -> None:
    """The checkpoint's model, optimizer and data order match this run's config (the layout may differ)."""
    saved, now = record["model"], dataclasses.asdict(cfg.model)
    diff = [k for k in sorted(set(saved) | set(now)) if k not in TRAINING_ONLY and saved.get(k) != now.get(k)]
    if diff:
        pairs = ", ".join(f"model.{k}: checkpoint {saved.get(k)!r}, this run {now.get(k)!r}" for k in diff[:6])
        raise CheckpointError(f"{path}: saved from a different model ({pairs}); use the checkpoint's model config "
                              f"(its config.yaml) or another run.output_dir / run.resume")
    if record["optimizer"] != _optimizer_kind(cfg):
        raise CheckpointError(f"{path}: saved with optimizer {record['optimizer']}, this run uses "
                              f"{_optimizer_kind(cfg)}; set optim.name / parallel.distributed_optimizer as the "
                              f"checkpoint's config.yaml has them")
    data = _data_signature(cfg)
    diff = [k for k in data if record["data"].get(k) != data[k]]
    if diff:
        pairs = ", ".join(f"{k}: checkpoint {record['data'].get(k)!r}, this run {data[k]!r}" for k in diff)
        raise CheckpointError(f"{path}: the training data order differs ({pairs}); train_samples is run.steps x "
                              f"data.global_batch_size. Resume with the checkpoint's data, run.seed and run.steps "
                              f"so every sample is seen exactly once")


# --- load --------------------------------------------------------------------------------------------------------------

def load_checkpoint(path: str, chunks, optimizer, loader, cfg, groups) -> int:
    """Load a checkpoint into this rank's model chunks, optimizer and loader, under this run's layout. Returns the
    step it was saved at. Raises CheckpointError (on every rank) for an incomplete, corrupt, unsafe or incompatible
    checkpoint; nothing in the run folder is written."""
    record = read_record(path)
    check_compatible(path, record, cfg)
    verify_files(path, record)
    same_layout = record["layout"] == _layout(cfg, groups)
    available = set(dist_checkpointing.load_tensors_metadata(path).keys())
    state = sharded_state(chunks, optimizer, cfg, groups, record["step"], record["consumed_samples"],
                          is_loading=True, available=available, with_rng=same_layout)
    keys = {id(sh.data): key.removeprefix("model.") for key, sh in state["model"].items()}
    loaded = _load(state, path)
    if isinstance(optimizer, DistributedMuon):
        optimizer.load_state_dict(loaded["optimizer"])
    elif optimizer is not None:
        load_adam_state_dict(optimizer, keys, loaded["optimizer"])
    if same_layout:
        torch.set_rng_state(loaded["rng"]["rng.torch_cpu"].reshape(-1))
        if "rng.torch_cuda" in loaded["rng"]:
            torch.cuda.set_rng_state(loaded["rng"]["rng.torch_cuda"].reshape(-1))
    loader.load_state_dict({"consumed_samples": int(loaded["consumed_samples"])})
    return int(loaded["step"])


@torch.no_grad()
def _load(state: dict, path: str) -> dict:
    """dist_checkpointing.load of `state` (with its "model" part) from `path`, the model filled in place; returns
    the loaded dict. Any failure becomes a CheckpointError naming the checkpoint and the cause."""
    # The load replaces the ShardedTensors in `state` by tensors: note which parameters they stood for first.
    targets = {key: sh.data for key, sh in state["model"].items()}
    try:
        # Loading reads any slice, from any replica: the access check is for saves (one writer per slice).
        loaded = dist_checkpointing.load(state, path, strict=StrictHandling.RAISE_UNEXPECTED,
                                         validate_access_integrity=False)
    except Exception as e:  # noqa: BLE001 - DCP/megatron raise many kinds; name the checkpoint and the cause
        raise CheckpointError(f"{path}: loading failed ({type(e).__name__}: {str(e).splitlines()[0][:400]}); "
                              f"the checkpoint does not fit this model or is damaged") from e
    for key, target in targets.items():  # torch_dist reads into the parameters; copy where it did not
        if loaded["model"][key].data_ptr() != target.data_ptr():
            target.copy_(loaded["model"][key])
    return loaded


def model_config_of(path: str):
    """The ModelConfig a checkpoint was saved with (from its dsv4.json)."""
    from dsv4.model.config import ModelConfig

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    saved = read_record(path)["model"]
    unknown = sorted(set(saved) - fields)
    if unknown:
        raise CheckpointError(f"{os.path.join(path, MARK)}: model fields {unknown} are unknown to this dsv4; "
                              f"use the dsv4 version that saved it (its versions.json in the run folder)")
    return ModelConfig(**saved)


def load_model_weights(path: str, model, groups) -> None:
    """Only the model tensors of a checkpoint into `model` (a whole DSV4Model, or this rank's part under `groups`):
    for export and evaluation. The model must have the checkpoint's config (`model_config_of`)."""
    record = read_record(path)
    verify_files(path, record)
    _load({"model": model_sharded_state_dict([model], groups)}, path)
