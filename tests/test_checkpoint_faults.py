"""Faults and stop signals: real `torchrun` runs of dsv4-train on two gloo ranks (dp2), killed with SIGKILL or
stopped with SLURM's signals (USR1 warning, SIGTERM).

Kill one rank mid-run: the launch fails, a relaunch (run.resume=auto) resumes from the latest complete checkpoint and
logs the same losses, bit for bit, as an uninterrupted run (CPU training is deterministic). Kill during a save: the
torn `step_N.partial/` folder is never chosen, the relaunch resumes from the previous complete checkpoint and again
ends at the same loss. Each is repeated with kill points drawn from fixed seeds; every process started is killed
on the way out. Checkpoint contents, resharding and damaged files are tested in test_checkpoint.py.
"""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from run_logs import logged_losses, metrics_rows as _metrics

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
STEPS = 12
SAVE_INTERVAL = 2
OVERRIDES = ["run.progress_bar=false", f"run.steps={STEPS}", f"run.save_interval={SAVE_INTERVAL}",
             "run.eval_interval=0", "run.eval_iters=1", "optim.warmup_steps=2", "data.seq_length=128",
             "data.micro_batch_size=2", "data.global_batch_size=4"]
REPEATS = 2  # of each scenario, with other kill points; about a minute each on 2 idle cores
RUN_TIMEOUT_S = 300  # one launch, start to finish (about 20 s alone on 2 cores; CI machines are shared)
EXIT_TIMEOUT_S = 60  # torchrun's exit after a worker died (it stops the others with SIGTERM, then SIGKILL at 30 s)
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
               "ROLE_RANK", "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Launch:
    """`torchrun --nproc-per-node 2 -m dsv4.train` in its own session, output to a log file. Tracks the worker
    processes (each in a session of its own: torchrun starts them with start_new_session) so that `cleanup` can
    kill every process of the launch, whatever happened."""

    def __init__(self, cache_dir: str, run_dir: str, log_path: str, extra_env: dict | None = None,
                 extra_overrides: tuple = ()):
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
        env["OMP_NUM_THREADS"] = "1"
        env.update(extra_env or {})
        self.run_arg = f"run.output_dir={run_dir}"
        self.cmd = [TORCHRUN, "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "dsv4.train",
                    f"data.cache_dir={cache_dir}", self.run_arg, *OVERRIDES, *extra_overrides]
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=os.path.dirname(run_dir), start_new_session=True)
        self.known: dict = {}  # pid -> psutil.Process of torchrun and everything it started
        self.ranks: dict = {}  # rank -> psutil.Process of the worker
        self._track()

    def _track(self) -> None:
        try:
            root = psutil.Process(self.proc.pid)
            self.known.setdefault(root.pid, root)
            for child in root.children(recursive=True):
                if child.pid in self.known:
                    continue
                self.known[child.pid] = child
        except psutil.NoSuchProcess:
            return
        for pid, p in list(self.known.items()):
            if pid == self.proc.pid or p in self.ranks.values():
                continue
            try:
                rank = p.environ().get("RANK")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if rank is not None and p.ppid() == self.proc.pid:
                self.ranks[int(rank)] = p

    def workers(self, deadline: float) -> dict:
        """rank -> worker process, once both are up."""
        while time.monotonic() < deadline:
            self._track()
            if len(self.ranks) == 2:
                return dict(self.ranks)
            self.check_running()
            time.sleep(0.05)
        pytest.fail(f"the two workers did not appear in time\n{self.tail()}")

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"the run exited early with {self.proc.returncode}\n{self.tail()}")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.cleanup()
            pytest.fail(f"torchrun still running after {timeout:.0f} s; killed\n{self.tail()}")

    def wait_workers_gone(self, timeout: float = 30.0) -> None:
        """After torchrun exited: every process it started is gone (killed if needed) before the relaunch."""
        _, alive = psutil.wait_procs([p for pid, p in self.known.items() if pid != self.proc.pid], timeout=timeout)
        for p in alive:
            _kill(p)
        self.assert_nothing_left()

    def assert_nothing_left(self, timeout: float = 15.0) -> None:
        """No process of this launch survives it, including what the ranks started themselves (the checkpoint
        writers' results server is a fork of its rank and must exit with it, not linger as an orphan)."""
        deadline = time.monotonic() + timeout
        while True:
            left = []
            for p in psutil.process_iter(["cmdline"]):
                if self.run_arg in (p.info["cmdline"] or []) and p.pid != os.getpid():
                    left.append(p)
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for p in left:
            _kill(p)
        assert not left, f"processes of the killed run left behind: {[p.pid for p in left]}\n{self.tail()}"

    def output(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def tail(self, chars: int = 6000) -> str:
        return f"--- {' '.join(self.cmd)}\n--- output (tail):\n{self.output()[-chars:]}"

    def cleanup(self) -> None:
        self._track()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.known.values():
            _kill(p)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def _kill(p: psutil.Process) -> None:
    """SIGKILL one process (psutil checks that it is still the process we saw, not a reused pid)."""
    try:
        if p.is_running():
            p.kill()
    except psutil.NoSuchProcess:
        pass


def _complete_steps(run_dir) -> list:
    """Steps of the complete checkpoints (step_N/ with its completion mark dsv4.json), oldest first."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for m in map(_STEP_DIR.match, os.listdir(root))
                  if m and os.path.isfile(os.path.join(root, m.group(0), "dsv4.json")))


def _step_path(run_dir, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step:08d}")


@pytest.fixture(scope="module")
def reference(cache_dir, tmp_path_factory):
    """step -> loss of one uninterrupted run."""
    base = tmp_path_factory.mktemp("reference")
    run = Launch(cache_dir, str(base / "run"), str(base / "out.log"))
    try:
        rc = run.wait(RUN_TIMEOUT_S)
        assert rc == 0, f"the uninterrupted run failed ({rc})\n{run.tail()}"
    finally:
        run.cleanup()
    losses = logged_losses(base / "run")
    assert sorted(losses) == list(range(1, STEPS + 1)), run.tail()
    return losses


def _wait_for_step(run: Launch, run_dir, step: int) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        rows = _metrics(run_dir)
        if rows and rows[-1]["step"] >= step:
            return
        run.check_running()
        time.sleep(0.02)
    pytest.fail(f"step {step} not reached in {RUN_TIMEOUT_S} s\n{run.tail()}")


def _killed_launch_fails(run: Launch, what: str) -> None:
    rc = run.wait(EXIT_TIMEOUT_S)
    assert rc != 0, f"{what}: torchrun exited with 0 after a worker was killed\n{run.tail()}"
    run.wait_workers_gone()


def _relaunch_and_check(cache_dir, base, run_dir, reference, expected_start: int, what: str) -> None:
    """Relaunch with run.resume=auto: it resumes at `expected_start`, logs every later step with the loss of the
    uninterrupted run, and ends with a complete checkpoint of the last step and no torn folder."""
    logged_before = len(_metrics(run_dir))
    run = Launch(cache_dir, str(run_dir), str(base / "relaunch.log"))
    try:
        rc = run.wait(RUN_TIMEOUT_S)
        assert rc == 0, f"{what}: the relaunch failed ({rc})\n{run.tail()}"
        run.assert_nothing_left()
        found = re.findall(r"resumed at step (\d+) ", run.output())
        assert found == [str(expected_start)], \
            f"{what}: resumed at {found}, the latest complete checkpoint was step {expected_start}\n{run.tail()}"
        rows = _metrics(run_dir)
        resumed = rows[logged_before:]
        assert [r["step"] for r in resumed] == list(range(expected_start + 1, STEPS + 1)), (what, resumed)
        for r in resumed:
            assert r["loss"] == reference[r["step"]], \
                f"{what}: step {r['step']} loss {r['loss']!r} after the resume, {reference[r['step']]!r} " \
                f"uninterrupted\n{run.tail()}"
        assert {r["step"]: r["loss"] for r in rows}[STEPS] == reference[STEPS], what
        assert _complete_steps(run_dir)[-1] == STEPS, what
        leftovers = [n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.endswith(".partial")]
        assert not leftovers, f"{what}: torn folders left after a clean finish: {leftovers}"
    finally:
        run.cleanup()


def test_kill_one_rank_mid_run_then_resume_reaches_the_same_loss(cache_dir, tmp_path, reference):
    """SIGKILL one worker at a random step after the first checkpoint: torchrun fails, the relaunch resumes at the
    latest complete checkpoint (whatever the kill interrupted, a save included) and logs the same losses."""
    rng = random.Random(20240611)
    for rep in range(REPEATS):
        kill_after = rng.randint(SAVE_INTERVAL + 2, STEPS - 1)  # a metrics line of this step is seen first
        victim = rep % 2
        what = f"repetition {rep}: SIGKILL rank {victim} once step {kill_after} is logged"
        base = tmp_path / f"rep{rep}"
        base.mkdir()
        run_dir = base / "run"
        run = Launch(cache_dir, str(run_dir), str(base / "killed.log"))
        try:
            workers = run.workers(time.monotonic() + RUN_TIMEOUT_S)
            _wait_for_step(run, run_dir, kill_after)
            workers[victim].send_signal(signal.SIGKILL)
            _killed_launch_fails(run, what)
        finally:
            run.cleanup()
        before = logged_losses(run_dir)
        assert max(before) >= kill_after, what
        for step, loss in before.items():  # the killed run followed the uninterrupted one while it lasted
            assert loss == reference[step], (what, step)
        complete = _complete_steps(run_dir)  # saves are synchronous: those before step kill_after had finished
        assert complete and complete[-1] >= (kill_after - 1) // SAVE_INTERVAL * SAVE_INTERVAL, (what, complete)
        _relaunch_and_check(cache_dir, base, run_dir, reference, complete[-1], what)


def test_kill_during_a_save_resumes_from_the_previous_checkpoint(cache_dir, tmp_path, reference):
    """SIGKILL as soon as the `step_N.partial/` folder of a chosen save appears (after a random delay of up to
    50 ms): the torn folder is left without its completion mark, the relaunch resumes from step N - save_interval
    and logs the same losses. A save that finished before the kill landed must resume from step N instead."""
    rng = random.Random(7_3_2024)
    cases = []
    for rep in range(REPEATS):
        target = rng.randrange(2 * SAVE_INTERVAL, STEPS + 1, SAVE_INTERVAL)
        delay = rng.uniform(0.0, 0.05)
        victims = [[0, 1], [1], [0]][rep % 3]  # the whole node, the rank that does not publish, the one that does
        what = f"repetition {rep}: SIGKILL rank(s) {victims} {delay * 1000:.0f} ms into the save of step {target}"
        base = tmp_path / f"rep{rep}"
        base.mkdir()
        run_dir = base / "run"
        partial, final = _step_path(run_dir, target) + ".partial", _step_path(run_dir, target)
        run = Launch(cache_dir, str(run_dir), str(base / "killed.log"))
        try:
            workers = run.workers(time.monotonic() + RUN_TIMEOUT_S)
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while not os.path.isdir(partial) and not os.path.isfile(os.path.join(final, "dsv4.json")):
                run.check_running()
                assert time.monotonic() < deadline, f"{what}: the save never started\n{run.tail()}"
                time.sleep(0.005)
            time.sleep(delay)
            for rank in victims:
                workers[rank].send_signal(signal.SIGKILL)
            _killed_launch_fails(run, what)
        finally:
            run.cleanup()
        complete = _complete_steps(run_dir)
        torn = target not in complete
        cases.append("torn" if torn else "finished")
        if torn:
            assert os.path.isdir(partial) and not os.path.exists(os.path.join(partial, "dsv4.json")), what
            assert complete[-1] == target - SAVE_INTERVAL, (what, complete)
            with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
                assert f.read().strip() == os.path.basename(_step_path(run_dir, target - SAVE_INTERVAL)), what
        else:
            assert complete[-1] == target, (what, complete)
        _relaunch_and_check(cache_dir, base, run_dir, reference, complete[-1], f"{what} ({cases[-1]})")
    print(f"kill during a save: {cases}")
    assert "torn" in cases, f"no kill landed inside a save: {cases}"


def test_crash_between_rename_and_marker_update_resumes_from_the_newest(tmp_path):
    """rank 0 died after renaming step_N.partial/ to step_N/ (complete) and before replacing `latest`: the marker
    still names step_N-2, and run.resume=auto must load step_N, the latest complete checkpoint."""
    from dsv4.train.checkpoint import resolve_resume

    root = tmp_path / "run" / "checkpoints"
    for step in (2, 4):
        folder = root / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "dsv4.json").write_text(json.dumps({"format": 1, "step": step}))
    (root / "latest").write_text("step_00000002")
    assert resolve_resume("auto", str(tmp_path / "run")) == str(root / "step_00000004")


@pytest.mark.parametrize("signame,victims", [("SIGUSR1", [1]), ("SIGTERM", [0, 1])],
                         ids=["usr1-to-one-rank-requeues", "term-to-all-ranks"])
def test_stop_signal_saves_the_step_and_the_relaunch_continues(cache_dir, tmp_path, reference, signame, victims):
    """SLURM's warning (USR1, here reaching one rank only) or its SIGTERM: every rank finishes the same step, that
    step is saved, and the run exits with 128 + the signal. Inside a SLURM job (faked: SLURM_JOB_ID and an
    `scontrol` on PATH that records its arguments) a USR1 stop requeues the job; SIGTERM does not. The relaunch
    resumes at that step with the losses of the uninterrupted run."""
    run_dir = tmp_path / "run"
    fake_bin, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (fake_bin / "scontrol").chmod(0o755)
    env = {"PATH": f"{fake_bin}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    run = Launch(cache_dir, str(run_dir), str(tmp_path / "stopped.log"), extra_env=env,
                 extra_overrides=("run.stop_signals=[USR1,TERM]",))  # TERM is opt-in
    try:
        workers = run.workers(time.monotonic() + RUN_TIMEOUT_S)
        _wait_for_step(run, run_dir, 5)
        for rank in victims:
            workers[rank].send_signal(getattr(signal, signame))
        rc = run.wait(RUN_TIMEOUT_S)
        run.assert_nothing_left()
    finally:
        run.cleanup()
    out = run.output()
    assert rc != 0, f"a stopped run must not report success\n{run.tail()}"
    assert f"exitcode  : {128 + getattr(signal, signame)}" in out, run.tail()
    stopped = [int(s) for s in re.findall(rf"step (\d+): stopping on {signame}, checkpoint", out)]
    assert len(stopped) == 1 and 5 <= stopped[0] < STEPS, run.tail()
    assert _complete_steps(run_dir)[-1] == stopped[0]
    assert _metrics(run_dir)[-1]["step"] == stopped[0]  # nothing trained after the stop
    if signame == "SIGUSR1":
        assert calls.read_text().split() == ["requeue", "4242"]
        assert "requeued SLURM job 4242" in out
    else:
        assert not calls.exists()
    _relaunch_and_check(cache_dir, tmp_path, run_dir, reference, stopped[0], signame)


# A dsv4-train run whose checkpoint writers (the processes megatron forks to write a rank's files) record their pid
# and then hang, as a writer stuck on a lock or a slow file system does. The patch is megatron's, in this script only.
_HANGING_WRITERS = """
import os, sys, time
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

PIDS = sys.argv.pop(1)  # the folder the writers note their pids in

def hang(*args, **kwargs):
    open(os.path.join(PIDS, str(os.getpid())), "w").close()
    time.sleep(3600)

FileSystemWriterAsync.write_preloaded_data = staticmethod(hang)
sys.argv[0] = "dsv4-train"
from dsv4.train.main import main
main()
"""


@pytest.mark.parametrize("async_save", [False, True], ids=["sync-save", "async-save"])
def test_writers_die_with_a_rank_killed_during_a_save(cache_dir, tmp_path, async_save):
    """SIGKILL a rank while megatron's forked checkpoint writers are busy (here: hanging): every process the save
    forked (the writers, and with run.async_save the background process that forks them) dies with the rank within
    a few seconds instead of lingering as an orphan (PR_SET_PDEATHSIG, set in each forked child)."""
    pids_dir = tmp_path / "writers"
    pids_dir.mkdir()
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-c", _HANGING_WRITERS, str(pids_dir), f"data.cache_dir={cache_dir}",
           f"run.output_dir={run_dir}", *OVERRIDES, f"run.async_save={str(async_save).lower()}"]
    rank = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path),
                            start_new_session=True)
    seen: dict = {}
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while len(os.listdir(pids_dir)) < 1:
            assert rank.poll() is None, f"the run exited with {rank.returncode}:\n{rank.stdout.read().decode()}"
            assert time.monotonic() < deadline, "no checkpoint writer started"
            time.sleep(0.05)
        time.sleep(0.5)  # let every writer of the save start
        rank_proc = psutil.Process(rank.pid)
        seen = {p.pid: p for p in rank_proc.children(recursive=True)}
        writers = {int(n) for n in os.listdir(pids_dir)}
        assert writers <= set(seen), (writers, seen)
        rank.kill()
        rank.wait(10)
        _, alive = psutil.wait_procs(list(seen.values()), timeout=5)
        assert not alive, f"processes forked by the killed rank still run: {[p.pid for p in alive]} (writers {writers})"
    finally:
        if rank.poll() is None:
            rank.kill()
        for p in seen.values():
            _kill(p)
