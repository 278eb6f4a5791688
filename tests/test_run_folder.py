"""One run per run folder, and a full disk during a save (dsv4.train.checkpoint: take_run_lock, claim_run_dir,
save_checkpoint's disk-full handling).

A second run started in a folder that a live run holds is refused, naming that run (host, pid); a lock left by a run
that has ended (dead pid, or the earlier incarnation of a requeued SLURM job) is taken over with a notice, and torn
`.partial` saves are removed at start-up. A save that fills the disk removes its torn folder, says which folder, how
much a checkpoint needs and what is intact, and the same command then resumes from the last complete checkpoint.
"""

import errno
import json
import os
import socket
import subprocess
import sys
import pytest
from test_checkpoint_faults import _complete_steps

from dsv4.train.checkpoint import LOCK, CheckpointError, _process_start, take_run_lock

DSV4_TRAIN = os.path.join(os.path.dirname(sys.executable), "dsv4-train")
TINY = ["run.progress_bar=false", "run.eval_interval=0", "run.eval_iters=1", "optim.warmup_steps=1",
        "data.seq_length=128", "data.micro_batch_size=2", "data.global_batch_size=4"]


def _write_lock(run_dir, **holder):
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid_start": None, "slurm_job": None, "slurm_restart": "0",
              "since": "2024-01-01 00:00:00", **holder}
    (run_dir / LOCK).write_text(json.dumps(record))
    return run_dir / LOCK


@pytest.fixture()
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_holder_refuses_the_lock_and_a_dead_one_is_taken_over(tmp_path, sleeper, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    run_dir = tmp_path / "run"
    _write_lock(run_dir, pid=sleeper.pid, pid_start=_process_start(sleeper.pid))
    with pytest.raises(CheckpointError, match=rf"in use by another run \(pid {sleeper.pid} on host "
                                              rf"{socket.gethostname()}.*delete .*{LOCK}"):
        take_run_lock(str(run_dir))

    dead = _dead_pid()
    _write_lock(run_dir, pid=dead)
    lock, notice = take_run_lock(str(run_dir))
    assert "took over the stale lock" in notice and f"process {dead} no longer exists" in notice
    assert json.loads((run_dir / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run_dir / LOCK).exists()

    # A recycled pid (alive, but started after the lock was written) is not the holder.
    _write_lock(run_dir, pid=sleeper.pid, pid_start=(_process_start(sleeper.pid) or 0) + 1)
    lock, notice = take_run_lock(str(run_dir))
    assert f"pid {sleeper.pid} now belongs to another process" in notice
    lock.release()

    # Another host: cannot be checked from here, refused with how to override.
    _write_lock(run_dir, host="node-elsewhere", pid=sleeper.pid)
    with pytest.raises(CheckpointError, match="host node-elsewhere.*may still be running there.*delete"):
        take_run_lock(str(run_dir))


def test_a_requeued_slurm_job_takes_its_own_lock_from_another_host(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _write_lock(run_dir, host="node-before-requeue", pid=1234, slurm_job="77", slurm_restart="0")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock, notice = take_run_lock(str(run_dir))
    assert "this SLURM job (77) was requeued" in notice
    lock.release()
    _write_lock(run_dir, host="node-elsewhere", pid=1234, slurm_job="78", slurm_restart="0")
    with pytest.raises(CheckpointError, match="SLURM job 78"):  # another job: refused
        take_run_lock(str(run_dir))


def test_a_second_dsv4_train_in_a_held_folder_is_refused(cache_dir, tmp_path, sleeper):
    """The command line: one message naming the holder, exit 1, no traceback, nothing written by the second run."""
    run_dir = tmp_path / "run"
    _write_lock(run_dir, pid=sleeper.pid, pid_start=_process_start(sleeper.pid))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([DSV4_TRAIN, f"data.cache_dir={cache_dir}", f"run.output_dir={run_dir}", "run.steps=2",
                           *TINY], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"is in use by another run (pid {sleeper.pid} on host {socket.gethostname()}" in done.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
    assert json.loads((run_dir / LOCK).read_text())["pid"] == sleeper.pid  # the holder's lock is left alone


@pytest.mark.parametrize("async_save", [False, True], ids=["sync-save", "async-save"])
def test_disk_full_during_a_save_then_the_rerun_resumes(cache_dir, tmp_path, monkeypatch, capsys, groups,
                                                        async_save):
    """The writers of step 4's save get ENOSPC (injected into megatron's file writer, in the processes it forks):
    train() raises one CheckpointError naming the folder, the space a checkpoint needs and the intact step 2; the
    torn folder is gone and the lock released. The rerun (after a crash left a torn folder and a stale lock too)
    removes both, resumes at step 2 and finishes."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from dsv4.conf.schema import compose_config
    from dsv4.train import loop

    run_dir = tmp_path / "run"
    cfg = compose_config("debug", [f"data.cache_dir={cache_dir}", f"run.output_dir={run_dir}", "run.steps=4",
                                   "run.save_interval=2", f"run.async_save={str(async_save).lower()}", *TINY])
    write_item = filesystem_async._write_item

    def disk_full_at_step_4(*args, serialization_format, **kwargs):  # megatron passes what the signature names
        stream = next(a for a in args if hasattr(a, "write") and hasattr(a, "name"))
        if "step_00000004.partial" in stream.name:
            stream.write(b"\0" * 4096)  # what fit on the disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_item(*args, serialization_format=serialization_format, **kwargs)

    monkeypatch.setattr(filesystem_async, "_write_item", disk_full_at_step_4)
    with pytest.raises(CheckpointError) as failure:
        loop.train(cfg)
    message = str(failure.value)
    partial = run_dir / "checkpoints" / "step_00000004.partial"
    assert f"disk full while saving step 4 into {partial} (" in message and "No space left on device" in message
    assert "a checkpoint of this run needs about" in message and "GiB are free there" in message
    assert "The complete checkpoints are intact (step_00000002); the same command resumes from step_00000002" \
        in message
    assert "\n" not in message
    assert not partial.exists() and _complete_steps(run_dir) == [2]
    assert not (run_dir / LOCK).exists()
    monkeypatch.undo()

    torn = run_dir / "checkpoints" / "step_00000003.partial"  # as a run killed during a save leaves it
    torn.mkdir()
    (torn / "__0_0.distcp").write_bytes(b"\0" * 1024)
    _write_lock(run_dir, pid=_dead_pid())
    result = loop.train(compose_config("debug", [f"data.cache_dir={cache_dir}", f"run.output_dir={run_dir}",
                                                 "run.steps=4", "run.save_interval=2", *TINY]))
    out = capsys.readouterr().out
    assert "took over the stale lock" in out and f"removed the torn save {torn}" in out
    assert "resumed at step 2 " in out and len(result.history) == 2  # steps 3 and 4
    assert not torn.exists() and _complete_steps(run_dir) == [2, 4]
    assert not (run_dir / LOCK).exists()
