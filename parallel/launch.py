"""How a process learns its rank and meets the others: the launch environment and the rendezvous.

Launchers, in the order they are recognised:
- `torchrun` (or torch elastic): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT and the agent's own store. Its
  rendezvous and its timeouts (`--rdzv-conf timeout=...`) are torchrun's; the process group uses `env://`.
- any launcher that sets RANK and WORLD_SIZE (dsv4-submit's sbatch script does, from SLURM_PROCID / SLURM_NTASKS),
  with MASTER_ADDR and MASTER_PORT;
- a SLURM job step (`srun`, e.g. the hydra-submitit-launcher): the rank is SLURM_PROCID, the world
  SLURM_STEP_NUM_TASKS, the local rank SLURM_LOCALID; MASTER_ADDR defaults to the step's first node (its NodeAddr,
  from scontrol) and MASTER_PORT to 20000 + job id % 20000, as in dsv4-submit's script;
- nothing: one process.

Without torchrun, dsv4 runs the rendezvous itself (`rendezvous`): rank 0 opens a TCP store on MASTER_ADDR:PORT,
every rank registers there, and rank 0 waits at most `cluster.rendezvous_timeout_s` for all of them. A rank that
cannot reach rank 0, or a rendezvous some ranks never join (a node that never started, a wrong address), ends with
a `RendezvousError` that names the address, the missing ranks and what to check, instead of torch's bare timeout
after 30 minutes.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch.distributed as dist

from dsv4.model.config import ConfigError

__all__ = ["LaunchEnv", "RendezvousError", "launch_env", "launch_world_size", "rendezvous", "default_master_port"]


class RendezvousError(RuntimeError):
    """The ranks of a job could not meet: names who is missing and what to check."""


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    source: str
    """single | torchrun | env (RANK/WORLD_SIZE from another launcher) | slurm (an srun job step)."""
    master_addr: str = ""
    master_port: int = 0

    @property
    def distributed(self) -> bool:
        return self.source != "single"


def default_master_port(job_id: int) -> int:
    """The rendezvous port of a SLURM job: 20000 + job id % 20000 (dsv4-submit's script uses the same), so jobs
    sharing a first node do not collide and a requeued job (same id) uses its own port again."""
    return 20000 + job_id % 20000


def launch_world_size(environ: Optional[Mapping[str, str]] = None) -> int:
    """The world size the launcher announces (WORLD_SIZE, else an srun step's task count, else 1), for checking a
    layout before anything starts; `launch_env` checks the rest of the environment when the job starts."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:
        return _int(env, "WORLD_SIZE")
    if "SLURM_STEP_ID" in env and "SLURM_STEP_NUM_TASKS" in env:
        return _int(env, "SLURM_STEP_NUM_TASKS")
    return 1


def launch_env(environ: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Read this process's rank, world size and rendezvous address from the launcher's environment."""
    env = os.environ if environ is None else environ
    present = [name for name in ("RANK", "WORLD_SIZE") if name in env]
    if len(present) == 1:
        raise ConfigError(f"only {present[0]} is set in the environment; set both RANK and WORLD_SIZE (torchrun "
                          "does) or neither for a single-process run.")
    if present:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        if not 0 <= rank < world:
            raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world}: the launcher's environment is wrong.")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        if "TORCHELASTIC_RUN_ID" in env:
            return LaunchEnv(rank, world, local_rank, "torchrun")
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing and world > 1:
            raise ConfigError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} is not: export the address "
                              "and a free port of rank 0's host (dsv4-submit's script does), or launch with torchrun.")
        if world == 1:
            return LaunchEnv(0, 1, local_rank, "single")
        return LaunchEnv(rank, world, local_rank, "env", env["MASTER_ADDR"], _int(env, "MASTER_PORT"))

    if "SLURM_STEP_ID" in env:  # inside an srun job step: one task per rank
        needed = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_JOB_ID")
        missing = [k for k in needed if k not in env]
        if missing:
            raise ConfigError(f"this is a SLURM job step (SLURM_STEP_ID={env['SLURM_STEP_ID']}) but "
                              f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: start the ranks "
                              "with srun (one task per rank), or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT.")
        world = _int(env, "SLURM_STEP_NUM_TASKS")
        if world > 1:
            addr = env.get("MASTER_ADDR") or _first_node_address(env)
            port = _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else default_master_port(_int(env,
                                                                                                   "SLURM_JOB_ID"))
            return LaunchEnv(_int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID"), "slurm", addr, port)
    elif "SLURM_NTASKS" in env and _int(env, "SLURM_NTASKS") > 1:
        print(f"dsv4: note: running as one process in the batch script of a {env['SLURM_NTASKS']}-task SLURM job; "
              "start one rank per task with srun (dsv4-submit does).", file=sys.stderr)
    return LaunchEnv(0, 1, 0, "single")


def rendezvous(le: LaunchEnv, timeout_s: float) -> dist.Store:
    """Meet every rank of the job on rank 0's TCP store, or fail within `timeout_s` naming who is missing.

    Returns the store; `torch.distributed.init_process_group` builds the process group on it."""
    where = f"{le.master_addr}:{le.master_port}"
    timeout = timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(le.master_addr, le.master_port, is_master=le.rank == 0, timeout=timeout,
                              wait_for_workers=False)
    except (RuntimeError, OSError) as e:  # DistNetworkError and DistStoreError are RuntimeErrors
        if le.rank == 0:
            raise RendezvousError(
                f"rank 0 could not open the rendezvous on {where}: {_first_line(e)}. The port is probably taken "
                "(another job or a leftover process on this node): pick another with MASTER_PORT.") from None
        raise RendezvousError(
            f"rank {le.rank} on {socket.gethostname()} could not reach the rendezvous at {where} within "
            f"{timeout_s:g} s: rank 0 never opened it. Check that rank 0's node started (its log), that "
            f"{le.master_addr} is this job's first node and reachable from here, or raise "
            "cluster.rendezvous_timeout_s for slow starts.") from None

    store.set(f"dsv4/rendezvous/rank{le.rank}", socket.gethostname())
    store.add("dsv4/rendezvous/joined", 1)
    if le.rank == 0:
        deadline = time.monotonic() + timeout_s
        while store.add("dsv4/rendezvous/joined", 0) < le.world_size and time.monotonic() < deadline:
            time.sleep(0.05)
        missing = [r for r in range(le.world_size) if not store.check([f"dsv4/rendezvous/rank{r}"])]
        verdict = "ok" if not missing else (
            f"{len(missing)} of {le.world_size} ranks never joined the rendezvous at {where} within {timeout_s:g} s: "
            f"ranks {_ranges(missing)}. Check that every node of the job started (one rank per task: srun), that "
            f"{le.master_addr} is reachable from every node, that WORLD_SIZE/the task count matches what was "
            "launched, or raise cluster.rendezvous_timeout_s for slow starts.")
        store.set("dsv4/rendezvous/verdict", verdict)
        if missing:  # keep the store up until the ranks that did join have read why they stop (at most 10 s)
            joined, until = le.world_size - len(missing), time.monotonic() + 10
            while store.add("dsv4/rendezvous/read", 0) < joined - 1 and time.monotonic() < until:
                time.sleep(0.05)
    else:
        try:
            # Rank 0 gives its verdict up to timeout_s after this rank joined (its deadline started when it opened
            # the store, before any rank could join, but a loaded machine delays it): wait for that with a margin.
            store.wait(["dsv4/rendezvous/verdict"], timedelta(seconds=timeout_s + max(10.0, 0.1 * timeout_s)))
            verdict = store.get("dsv4/rendezvous/verdict").decode()
            store.add("dsv4/rendezvous/read", 1)
        except (RuntimeError, OSError):
            raise RendezvousError(f"rank {le.rank} joined the rendezvous at {where} but rank 0 gave no verdict within "
                                  f"the {timeout_s:g} s timeout (rank 0 died or hangs): see rank 0's log.") from None
    if verdict != "ok":
        raise RendezvousError(verdict if le.rank == 0 else f"rank 0 reports: {verdict}")
    return store


def _first_node_address(env: Mapping[str, str]) -> str:
    """The address of the job step's first node: scontrol's NodeAddr of the first host in the step's node list."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise ConfigError("cannot tell rank 0's node: SLURM_STEP_NODELIST/SLURM_JOB_NODELIST are not set; export "
                          "MASTER_ADDR (cluster.master_addr with dsv4-submit).")
    try:
        first = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               check=True, timeout=60).stdout.split()[0]
        node = subprocess.run(["scontrol", "show", "node", first], capture_output=True, text=True, check=True,
                              timeout=60).stdout
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        raise ConfigError(f"cannot find rank 0's node address from the node list {nodelist!r} with scontrol "
                          f"({_first_line(e)}): export MASTER_ADDR (cluster.master_addr with dsv4-submit).") from None
    found = re.search(r"\bNodeAddr=(\S+)", node)
    return found.group(1) if found else first


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ConfigError(f"{key}={env[key]!r} in the environment is not an integer: the launcher's environment "
                          "is wrong.") from None


def _ranges(ranks: list) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ", ".join(parts)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
