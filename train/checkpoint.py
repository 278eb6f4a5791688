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

Safety on load: loading never unpickles arbitrary objects. DCP's `.metadata` is a pickle that PyTorch reads with an
unrestricted unpickler, so it is first read with an allow-list unpickler (`_SafeUnpickler`); `common.pt` is read
with `torch.load(weights_only=True)`; no pickled objects (ShardedObject) are written or requested. Every file's
sha256 is checked against dsv4.json before any tensor is read (the ranks share the work).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import pickle
import re
import shutil
import signal
import sys
from multiprocessing.managers import SyncManager
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling
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


def _exit_with_parent() -> None:
    """Runs in the Manager's server process: ask Linux to terminate it when the rank that started it dies."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the server then outlives a killed rank
        pass


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

    def publish():
        _publish(root, partial, final, record, config_yaml, cfg.run.keep_last)

    if async_queue is None:
        dist_checkpointing.save(state, partial, validate_access_integrity=True)
        publish()
    else:
        request = dist_checkpointing.save(state, partial, validate_access_integrity=True, async_sharded_save=True)
        request.add_finalize_fn(publish)
        async_queue.schedule_async_request(request)
    return final


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
    if rank == 0:
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
        for _, old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


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
