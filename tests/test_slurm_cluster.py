"""dsv4-submit against a real SLURM cluster brought up on this machine (slurm/testcluster.sh: slurmctld and two
slurmd "nodes"). The jobs train the debug model on 2 nodes x 2 ranks (tp2 x dp2) and must log the losses of the same
run under plain torchrun; a job warned with USR1 (as --signal=USR1@N does) checkpoints, requeues itself, resumes
and ends at the same loss. When SLURM cannot be brought up here the tests skip with the reason."""

import contextlib
import json
import os
import re
import subprocess
import sys
import time

import psutil
import pytest
from run_logs import logged_losses as _losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
STEPS = 8
TRAIN = ["parallel.tp=2", "data.micro_batch_size=2", "data.global_batch_size=4", "data.seq_length=128",
         f"run.steps={STEPS}", "run.save_interval=2", "run.eval_interval=0", "run.eval_iters=1",
         "optim.warmup_steps=2", "run.progress_bar=false"]
CLUSTER = ["cluster=slurm", "cluster.nodes=2", "cluster.gpus_per_node=0", "cluster.tasks_per_node=2",
           "cluster.cpus_per_task=1", "cluster.time=00:15:00", "cluster.master_addr=127.0.0.1"]
JOB_TIMEOUT_S = 600
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The environment that reaches the test cluster (SLURM_CONF), or a skip that says why there is none."""
    state = tmp_path_factory.mktemp("slurm") / "cluster"
    script = os.path.join(REPO, "slurm", "testcluster.sh")
    up = subprocess.run([script, "up", str(state)], capture_output=True, text=True, timeout=300)
    if up.returncode:
        print(f"SLURM test cluster unavailable: {up.stderr.strip()}")
        pytest.skip(f"SLURM cannot be brought up on this machine: {up.stderr.strip()}")
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
    env.update(SLURM_CONF=str(state / "slurm.conf"), OMP_NUM_THREADS="1")
    try:
        yield env
    finally:
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True)
        subprocess.run([script, "down", str(state)], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def torchrun_losses(cache_dir, tmp_path_factory, slurm):
    """The same training under plain torchrun, 4 ranks on this machine."""
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    done = subprocess.run([TORCHRUN, "--nproc-per-node", "4", "-m", "dsv4.train", f"data.cache_dir={cache_dir}",
                           f"run.output_dir={run_dir}", *TRAIN], env=slurm, capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S, cwd=str(run_dir.parent))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return _losses(run_dir)


def _submit(slurm, cwd, cache_dir, extra=()) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-m", "dsv4.slurm.submit", *CLUSTER, *TRAIN, f"data.cache_dir={cache_dir}",
                           *extra], env=slurm, capture_output=True, text=True, timeout=120, cwd=str(cwd))
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r"submitted jobs? (\d+); run folder (\S+);", done.stdout)
    assert found, done.stdout
    return found.group(1), found.group(2)


def _squeue_state(slurm, job) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=slurm, capture_output=True,
                          text=True).stdout.strip()


def _wait_gone(slurm, job, log) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while _squeue_state(slurm, job):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], env=slurm)
            pytest.fail(f"job {job} still queued or running after {JOB_TIMEOUT_S} s\n{_tail(log)}")
        time.sleep(1)


def _tail(path, chars=4000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError as e:
        return str(e)


def _job_record(slurm, job) -> str:
    return subprocess.run(["scontrol", "show", "job", job], env=slurm, capture_output=True, text=True).stdout


def test_sbatch_job_on_two_nodes_trains_like_torchrun(slurm, torchrun_losses, cache_dir, tmp_path):
    job, run_dir = _submit(slurm, tmp_path, cache_dir)
    log = os.path.join(run_dir, f"slurm-{job}.out")
    _wait_gone(slurm, job, log)
    assert "JobState=COMPLETED" in _job_record(slurm, job), _tail(log)
    text = _tail(log, 100000)
    assert "on n[1-2], 4 ranks" in text and "tp=2 pp=1 vpp=1 ep=1 etp=1 dp=2" in text, _tail(log)
    assert _losses(run_dir) == torchrun_losses
    assert {"checkpoints", "config.yaml", "sbatch.sh", "submit.json", f"slurm-{job}.out"} <= set(os.listdir(run_dir))


def test_usr1_warning_checkpoints_requeues_and_resumes(slurm, torchrun_losses, cache_dir, tmp_path):
    job, run_dir = _submit(slurm, tmp_path, cache_dir)
    log = os.path.join(run_dir, f"slurm-{job}.out")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3):
        assert time.monotonic() < deadline, _tail(log)
        assert _squeue_state(slurm, job), f"the job ended before it was warned\n{_tail(log)}"
        time.sleep(0.2)
    # What --signal=USR1@N does before the time limit: USR1 to every task of the job step.
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)
    _wait_gone(slurm, job, log)
    text = _tail(log, 100000)
    record = _job_record(slurm, job)
    assert "JobState=COMPLETED" in record and "Restarts=1" in record, text[-4000:]
    stopped = re.findall(r"step (\d+): stopping on SIGUSR1, checkpoint .*requeued SLURM job " + job, text)
    assert len(stopped) == 1, text[-4000:]
    assert f"job {job} (restart 1)" in text
    assert re.search(rf"resumed at step {stopped[0]} ", text), text[-4000:]
    assert _losses(run_dir)[STEPS] == torchrun_losses[STEPS]


def _job_processes(job, node):
    """The processes of SLURM job `job`'s training ranks on test-cluster node `node` (ranks and their children)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if (env.get("SLURM_JOB_ID") == job and env.get("SLURMD_NODENAME") == node
                and "dsv4.train" in " ".join(proc.info["cmdline"] or [])):
            found.append(proc)
    return found


def test_node_that_hangs_ends_the_job_and_resubmission_resumes(slurm, torchrun_losses, cache_dir, tmp_path):
    """Node n2's ranks freeze mid-run (SIGSTOP: a node that stops responding). The ranks on n1 give up after
    cluster.collective_timeout_s, srun ends the step (--kill-on-bad-exit), the job ends FAILED instead of hanging;
    a new submission into the same run folder resumes from the last complete checkpoint and ends at the loss of an
    uninterrupted run."""
    job, run_dir = _submit(slurm, tmp_path, cache_dir, ["cluster.collective_timeout_s=15"])
    log = os.path.join(run_dir, f"slurm-{job}.out")
    first_save = os.path.join(run_dir, "checkpoints", "step_00000002", "dsv4.json")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not os.path.exists(first_save):
        assert time.monotonic() < deadline, _tail(log)
        assert _squeue_state(slurm, job), f"the job ended early\n{_tail(log)}"
        time.sleep(0.2)
    frozen = _job_processes(job, "n2")  # the ranks and the processes they forked (checkpoint writers' servers)
    ranks = [p for p in frozen if p.ppid() not in {q.pid for q in frozen}]
    assert len(ranks) == 2, f"expected n2's 2 ranks, found {ranks}"
    for proc in frozen:
        proc.suspend()
    stopped = time.monotonic()
    try:
        _wait_gone(slurm, job, log)
    finally:
        for proc in frozen:
            with contextlib.suppress(psutil.Error):
                proc.kill()
    ended_after = time.monotonic() - stopped
    text = _tail(log, 100000)
    assert "JobState=FAILED" in _job_record(slurm, job), text[-4000:]
    assert ended_after < 120, f"the job took {ended_after:.0f} s to end (collective timeout 15 s)"
    assert "another rank stopped responding" in text and f"run.output_dir={run_dir}" in text, text[-4000:]
    assert STEPS not in _losses(run_dir), "the run finished before the freeze"

    again, again_dir = _submit(slurm, tmp_path, cache_dir, [f"run.output_dir={run_dir}"])
    assert again_dir == run_dir
    log = os.path.join(run_dir, f"slurm-{again}.out")
    _wait_gone(slurm, again, log)
    assert "JobState=COMPLETED" in _job_record(slurm, again), _tail(log)
    assert re.search(r"resumed at step \d+ ", _tail(log, 100000)), _tail(log)
    assert _losses(run_dir)[STEPS] == torchrun_losses[STEPS]


def test_multirun_sweep_through_submitit(slurm, cache_dir, tmp_path):
    """`dsv4-train -m hydra/launcher=dsv4_slurm ...`: two points of an optim.lr sweep as two SLURM jobs of one node x
    2 ranks each (ranks from the srun step). Both finish; each trained with its own learning rate from the same
    initial model and data (equal first loss, different later ones) on dp=2."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="hydra-submitit-launcher is not installed (pip install -e '.[slurm]')")
    sweep = tmp_path / "sweep"
    done = subprocess.run([sys.executable, "-m", "dsv4.train", "-m", "hydra/launcher=dsv4_slurm", "cluster=slurm",
                           "cluster.nodes=1", "cluster.gpus_per_node=0", "cluster.tasks_per_node=2",
                           "cluster.cpus_per_task=1", "cluster.time=00:10:00", "optim.lr=1e-3,3e-3",
                           f"run.output_dir={sweep}", f"data.cache_dir={cache_dir}", "run.steps=4",
                           "optim.warmup_steps=1", "run.eval_interval=0", "run.progress_bar=false",
                           "data.seq_length=64", "data.micro_batch_size=1", "data.global_batch_size=2"],
                          env=slurm, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    losses = {}
    for point, lr in (("0", 1e-3), ("1", 3e-3)):
        run = sweep / point
        mark = json.loads((run / "checkpoints" / "step_00000004" / "dsv4.json").read_text())
        assert mark["layout"]["world"] == 2 and mark["layout"]["dp"] == 2, mark["layout"]
        assert f"lr: {lr}" in (run / "config.yaml").read_text()
        losses[point] = _losses(str(run))
        assert sorted(losses[point]) == [1, 2, 3, 4]
    assert losses["0"][1] == losses["1"][1]
    assert losses["0"][4] != losses["1"][4]
