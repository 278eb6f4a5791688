"""Stopping on a signal without losing work: finish the step, save a checkpoint, requeue the SLURM job, exit.

SLURM warns a job before its time limit or a preemption with the signal of `--signal=USR1@<seconds>` (it can come
up to 60 s early), and ends it with SIGTERM (then SIGKILL after KillWait). USR1 is handled by default; TERM only
when listed in run.stop_signals, since a handled SIGTERM stops ending a rank at once (torchrun and SLURM send it
to clean up after a failure, and to end the old step after a requeue). The handlers are installed when
training starts and only record the signal; the training loop asks after every step whether any rank got one
(one small all-reduce, since SLURM does not signal all ranks at the same instant), and if so all ranks save the
step they have finished and stop together. Inside a SLURM job, a stop by a signal of `run.requeue_on` requeues the
job (`scontrol requeue`); the requeued job resumes from that checkpoint (run.resume=auto).

Ctrl-C (SIGINT) is always handled the same way, whatever run.stop_signals lists: the run finishes its step, saves
it and exits with 130, as a shell reports an interrupted command. Under torchrun the terminal's Ctrl-C reaches the
launcher, which passes SIGINT on to every rank (and kills them after its shutdown timeout, 30 s by default). A
Ctrl-C during start-up stops the run before its first step, without a checkpoint (nothing was trained). The first
Ctrl-C puts the default action back, so a second one ends the process at once, as users expect: the steps since
the last checkpoint are lost, and a torn `.partial` save is cleared by the next start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["StopRequest", "requeue_slurm_job", "signal_number"]


def signal_number(name: str) -> int:
    """USR1 / SIGUSR1 / TERM ... -> the signal's number (ValueError for an unknown name)."""
    key = name.upper()
    key = key if key.startswith("SIG") else "SIG" + key
    if not hasattr(signal, key) or not isinstance(getattr(signal, key), signal.Signals):
        raise ValueError(f"unknown signal {name!r}")
    return int(getattr(signal, key))


class StopRequest:
    """Signal handlers that record a stop request (installed from the main thread; elsewhere a no-op): the signals
    `names` and SIGINT (Ctrl-C), which is always handled."""

    def __init__(self, names):
        self.received: Optional[int] = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for number in dict.fromkeys([*map(signal_number, names), int(signal.SIGINT)]):
            self._previous[number] = signal.signal(number, self._record)

    def _record(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends the process at once
            if os.environ.get("RANK", "0") == "0":  # one notice per job; os.write: a print could re-enter stderr
                os.write(2, b"\ndsv4-train: Ctrl-C: stopping after this step with a checkpoint (exit 130); press "
                            b"Ctrl-C again to abort at once, losing the steps since the last checkpoint\n")
        if self.received is None:
            self.received = signum

    def agreed(self, device) -> Optional[int]:
        """The signal any rank has received so far (the same answer on every rank), or None."""
        flag = torch.tensor([float(self.received or 0)], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def restore(self) -> None:
        """Put the handlers back as they were before training started."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}


def requeue_slurm_job() -> str:
    """Requeue this SLURM job (`scontrol requeue $SLURM_JOB_ID`); returns what happened, for the log."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not in a SLURM job: nothing to requeue; run the same command again to resume"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol requeue {job} failed ({e}); resubmit the job to resume"
    if done.returncode:
        return f"scontrol requeue {job} failed ({done.stderr.strip()}); resubmit the job to resume"
    return f"requeued SLURM job {job}; it resumes from the checkpoint"
