"""Stop signals (dsv4.train.preemption): handlers record, the loop agrees across ranks, SLURM jobs are requeued.
The end-to-end runs (USR1 to one rank, SIGTERM to all; save, exit, resume) are in test_checkpoint_faults.py."""

import os
import signal

import pytest

from dsv4.train.preemption import StopRequest, requeue_slurm_job, signal_number


def test_signal_names():
    assert signal_number("USR1") == signal_number("SIGUSR1") == signal.SIGUSR1
    assert signal_number("term") == signal.SIGTERM
    with pytest.raises(ValueError, match="unknown signal"):
        signal_number("NOPE")


def test_handlers_record_the_first_signal_and_are_restored(groups):
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopRequest(["USR1", "USR2"])
    try:
        assert stop.agreed("cpu") is None
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.agreed("cpu") == signal.SIGUSR2  # the process is still alive: handled, not fatal
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_requeue_outside_and_inside_slurm(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert "not in a SLURM job" in requeue_slurm_job()
    calls = tmp_path / "calls"
    fake = tmp_path / "scontrol"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert requeue_slurm_job() == "requeued SLURM job 77; it resumes from the checkpoint"
    assert calls.read_text().split() == ["requeue", "77"]
    fake.write_text("#!/bin/sh\necho 'Invalid job id' >&2\nexit 1\n")
    assert "failed (Invalid job id); resubmit the job" in requeue_slurm_job()


def test_signal_config_is_checked():
    from dsv4.conf.schema import compose_config
    from dsv4.model.config import ConfigError

    with pytest.raises(ConfigError, match="run.stop_signals: unknown signal 'FOO'"):
        compose_config("debug", ["run.stop_signals=[FOO]"])
    with pytest.raises(ConfigError, match="run.requeue_on"):
        compose_config("debug", ["run.stop_signals=[TERM]", "run.requeue_on=[USR1]"])
