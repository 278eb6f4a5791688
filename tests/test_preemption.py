"""Stop signals (dsv4.train.preemption): handlers record, the loop agrees across ranks, SLURM jobs are requeued.
The end-to-end runs (USR1 to one rank, SIGTERM to all; save, exit, resume) are in test_checkpoint_faults.py."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from run_logs import metrics_rows
from test_checkpoint_faults import _complete_steps

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


# --- Ctrl-C of a single-process dsv4-train ---------------------------------------------------------------------------

DSV4_TRAIN = os.path.join(os.path.dirname(sys.executable), "dsv4-train")
CTRL_C_STEPS = 8
CTRL_C_OVERRIDES = ["run.progress_bar=false", f"run.steps={CTRL_C_STEPS}", "run.save_interval=1000",
                    "run.eval_interval=0", "run.eval_iters=1", "optim.warmup_steps=2", "data.seq_length=128",
                    "data.micro_batch_size=2", "data.global_batch_size=4"]


def _start(cache_dir, run_dir, tmp_path, name):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    log = open(tmp_path / f"{name}.err", "w")
    proc = subprocess.Popen([DSV4_TRAIN, f"data.cache_dir={cache_dir}", f"run.output_dir={run_dir}",
                             *CTRL_C_OVERRIDES], stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                            cwd=str(tmp_path))
    return proc, tmp_path / f"{name}.err"


def _wait_until(proc, ready, what, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run exited with {proc.returncode} before {what}"
        assert time.monotonic() < deadline, f"{what}: not reached in {timeout:.0f} s"
        time.sleep(0.02)


def _ctrl_c_when(proc, err, ready, what: str) -> tuple:
    """SIGINT to `proc` once `ready()`; it must exit with 130 and print no traceback. Returns (stdout, stderr)."""
    try:
        _wait_until(proc, ready, what)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = err.read_text()
    assert proc.returncode == 130, f"exit {proc.returncode}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    return out, stderr


def test_ctrl_c_saves_the_step_exits_130_and_the_rerun_resumes(cache_dir, tmp_path):
    """SIGINT (Ctrl-C) with no periodic checkpoint due (run.save_interval=1000): the run finishes its step, saves it,
    exits with 130 and prints no traceback; the same command again resumes from that step and finishes."""
    run_dir = tmp_path / "run"
    proc, err = _start(cache_dir, run_dir, tmp_path, "interrupted")
    out, stderr = _ctrl_c_when(proc, err, lambda: len(metrics_rows(run_dir)) >= 3, "step 3")
    assert "Ctrl-C: stopping after this step with a checkpoint" in stderr, stderr[-3000:]
    stopped = [int(s) for s in re.findall(r"step (\d+): stopping on SIGINT, checkpoint", out)]
    assert len(stopped) == 1 and 3 <= stopped[0] < CTRL_C_STEPS, out
    assert _complete_steps(run_dir) == stopped, "the step reached must be saved (and no other: none was due)"
    assert metrics_rows(run_dir)[-1]["step"] == stopped[0]  # nothing trained after the stop

    proc, err = _start(cache_dir, run_dir, tmp_path, "rerun")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.read_text()[-3000:]
    assert f"resumed at step {stopped[0]} " in out, out
    assert [r["step"] for r in metrics_rows(run_dir)][-(CTRL_C_STEPS - stopped[0]):] == \
        list(range(stopped[0] + 1, CTRL_C_STEPS + 1))


def test_ctrl_c_during_start_up_exits_130_quietly(cache_dir, tmp_path):
    """SIGINT once Hydra has made the run folder, before any step: exit 130, no traceback, nothing trained or saved
    (whether it lands before train() installs its handler or after)."""
    run_dir = tmp_path / "run"
    proc, err = _start(cache_dir, run_dir, tmp_path, "start-up")
    _ctrl_c_when(proc, err, lambda: (run_dir / ".hydra").is_dir(), "the run folder")
    assert not metrics_rows(run_dir) and not _complete_steps(run_dir)


def test_ctrl_c_inside_train_start_up_stops_before_the_first_step(cache_dir, tmp_path, monkeypatch, groups):
    """A Ctrl-C that reaches train() while it builds (here: during the data build) is recorded, and the run stops
    before its first step: nothing trained, nothing saved, stopped_by SIGINT (dsv4-train exits 130)."""
    from dsv4.conf.schema import compose_config
    from dsv4.train import loop

    build_data = loop.build_data

    def interrupted_build(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return build_data(*args, **kwargs)

    monkeypatch.setattr(loop, "build_data", interrupted_build)
    before = signal.getsignal(signal.SIGINT)
    cfg = compose_config("debug", [f"data.cache_dir={cache_dir}", f"run.output_dir={tmp_path / 'run'}",
                                   *CTRL_C_OVERRIDES])
    result = loop.train(cfg)
    assert result.stopped_by == "SIGINT" and result.history == []
    assert not _complete_steps(tmp_path / "run")
    assert signal.getsignal(signal.SIGINT) is before  # Python's KeyboardInterrupt handler is back
