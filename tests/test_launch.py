"""The launch environment and the rendezvous (dsv4.parallel.launch): ranks from torchrun, from RANK/WORLD_SIZE or
from an srun job step; missing or wrong launcher variables, ranks that never join and a rank that stops responding
mid-run end with a message naming the problem and the fix, within the configured timeouts, instead of hanging."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from dist_utils import free_port as _free_port
from run_logs import metrics_rows

from dsv4.model.config import ConfigError
from dsv4.parallel.launch import LaunchEnv, default_master_port, launch_env, launch_world_size

_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
               "ROLE_RANK", "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", **{k: str(v) for k, v in extra.items()})
    return env


STEP = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "12345", "SLURM_NTASKS": "4", "MASTER_ADDR": "10.0.0.7"}


def test_torchrun_and_plain_launchers():
    assert launch_env({}) == LaunchEnv(0, 1, 0, "single")
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "x",
                "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    assert launch_env(torchrun) == LaunchEnv(1, 2, 1, "torchrun")
    plain = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    assert launch_env(plain) == LaunchEnv(1, 2, 0, "env", "h", 29500)
    # RANK/WORLD_SIZE win over SLURM's variables (torchrun or dsv4-submit's script inside an srun step).
    assert launch_env({**STEP, **plain}).source == "env"


def test_srun_step_gives_the_ranks():
    le = launch_env(STEP)
    assert le == LaunchEnv(3, 4, 1, "slurm", "10.0.0.7", default_master_port(12345))
    assert default_master_port(12345) == 20000 + 12345 % 20000
    assert launch_env({**STEP, "MASTER_PORT": "31000"}).master_port == 31000
    # A one-task step is a single process; so is a batch script (no step), with a note when it has more tasks.
    assert launch_env({**STEP, "SLURM_STEP_NUM_TASKS": "1"}).source == "single"


def test_world_size_for_config_checks():
    """What the config's layout checks use before anything starts: no address lookups, no full validation."""
    assert launch_world_size({}) == 1
    assert launch_world_size({"WORLD_SIZE": "8"}) == 8
    assert launch_world_size({k: v for k, v in STEP.items() if k != "MASTER_ADDR"}) == 4
    assert launch_world_size({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}) == 1  # a batch script: one process


def test_batch_script_of_a_multi_task_job_runs_one_process_with_a_note(capsys):
    assert launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}).source == "single"
    assert "start one rank per task with srun" in capsys.readouterr().err


@pytest.mark.parametrize("env, needle", [
    ({"RANK": "0"}, "only RANK is set"),
    ({"WORLD_SIZE": "2"}, "only WORLD_SIZE is set"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK=2 is outside WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "MASTER_ADDR is not"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' in the environment is not an integer"),
    ({k: v for k, v in STEP.items() if k != "SLURM_PROCID"}, "SLURM_PROCID is not set"),
    ({k: v for k, v in STEP.items() if k not in ("SLURM_LOCALID", "SLURM_JOB_ID")},
     "SLURM_LOCALID, SLURM_JOB_ID are not set"),
    ({k: v for k, v in STEP.items() if k != "MASTER_ADDR"}, "SLURM_STEP_NODELIST/SLURM_JOB_NODELIST are not set"),
])
def test_bad_launcher_environment_is_named(env, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        launch_env(env)


def test_first_node_address_needs_scontrol(tmp_path):
    """Without MASTER_ADDR a step asks scontrol for its first node's NodeAddr; without scontrol the error says to
    export MASTER_ADDR."""
    fake = tmp_path / "scontrol"
    fake.write_text(textwrap.dedent("""\
        #!/bin/sh
        if [ "$2" = hostnames ]; then printf 'gpu017\\ngpu018\\n'; else echo "NodeName=$3 Arch=x86_64 NodeAddr=10.1.2.17 NodeHostName=$3"; fi
        """))
    fake.chmod(0o755)
    step = {**{k: v for k, v in STEP.items() if k != "MASTER_ADDR"}, "SLURM_STEP_NODELIST": "gpu[017-018]"}
    code = ("import json; from dsv4.parallel.launch import launch_env; "
            f"print(launch_env({step!r}).master_addr)")
    run = lambda path: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      env=_clean_env(PATH=path))
    found = run(f"{tmp_path}:{os.environ['PATH']}")
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "10.1.2.17"
    missing = run(str(tmp_path / "empty"))
    assert missing.returncode != 0 and "export MASTER_ADDR" in missing.stderr


_RDZV = """
import sys
from dsv4.parallel.launch import RendezvousError, launch_env, rendezvous
try:
    le = launch_env()
    store = rendezvous(le, {timeout})
    store.add("left", 1)  # rank 0 keeps the store open until everyone has read the verdict
    while le.rank == 0 and store.add("left", 0) < le.world_size:
        pass
    print("joined")
except RendezvousError as e:
    print(e, file=sys.stderr)
    sys.exit(3)
"""


def _rendezvous_ranks(ranks, world, timeout=3, port=None):
    port = port or _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _RDZV.format(timeout=timeout)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=_clean_env(RANK=r, WORLD_SIZE=world, MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in ranks]
    return [(p.wait(timeout=60), *p.communicate()) for p in procs]


def test_rendezvous_all_ranks_join():
    assert [(rc, out.strip()) for rc, out, _ in _rendezvous_ranks([0, 1, 2], 3)] == [(0, "joined")] * 3


def test_ranks_that_never_join_are_named():
    start = time.monotonic()
    (rc0, _, err0), (rc1, _, err1) = _rendezvous_ranks([0, 1], 4, timeout=3)
    assert time.monotonic() - start < 30
    assert rc0 == rc1 == 3
    assert "2 of 4 ranks never joined the rendezvous at 127.0.0.1:" in err0 and "ranks 2-3" in err0
    assert "cluster.rendezvous_timeout_s" in err0
    assert err1.startswith("rank 0 reports: 2 of 4 ranks never joined")


def test_rank_without_rank_0_fails_in_time():
    start = time.monotonic()
    [(rc, _, err)] = _rendezvous_ranks([1], 2, timeout=3)
    assert time.monotonic() - start < 30
    assert rc == 3
    assert "rank 1 on" in err and "could not reach the rendezvous at 127.0.0.1:" in err and "within 3 s" in err


def test_rendezvous_port_taken_is_named():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        [(rc, _, err)] = _rendezvous_ranks([0], 2, timeout=3, port=sock.getsockname()[1])
    assert rc == 3 and "rank 0 could not open the rendezvous" in err and "MASTER_PORT" in err


TRAIN = ["run.progress_bar=false", "run.steps=20", "run.save_interval=2", "run.eval_interval=0",
         "optim.warmup_steps=2", "data.seq_length=64", "data.micro_batch_size=1", "data.global_batch_size=2"]


def _train(rank, world, port, run_dir, cache_dir, *extra, log):
    return subprocess.Popen([sys.executable, "-m", "dsv4.train", f"run.output_dir={run_dir}",
                             f"data.cache_dir={cache_dir}", *TRAIN, *extra], stdout=log, stderr=subprocess.STDOUT,
                            env=_clean_env(RANK=rank, WORLD_SIZE=world, MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                            cwd=str(run_dir.parent))


def test_training_with_a_missing_rank_fails_naming_it(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    with open(tmp_path / "rank0.log", "w") as log:
        proc = _train(0, 2, _free_port(), run_dir, cache_dir, "cluster.rendezvous_timeout_s=3", log=log)
        rc = proc.wait(timeout=120)
    text = (tmp_path / "rank0.log").read_text()
    assert rc == 1, text[-3000:]
    assert "dsv4-train: 1 of 2 ranks never joined the rendezvous" in text and "ranks 1." in text, text[-3000:]


def test_a_rank_that_stops_responding_ends_the_run_not_hangs(tmp_path, cache_dir):
    """A rank frozen mid-run (SIGSTOP: as a node that hangs) makes the other rank fail after the collective
    timeout with a message saying how to resume; the relaunch resumes from the newest complete checkpoint."""
    run_dir, port = tmp_path / "run", _free_port()
    logs = [open(tmp_path / f"rank{r}.log", "w") for r in range(2)]
    procs = [_train(r, 2, port, run_dir, cache_dir, "cluster.collective_timeout_s=10", log=logs[r])
             for r in range(2)]
    try:
        deadline = time.monotonic() + 180
        while len(metrics_rows(str(run_dir)) if (run_dir / "metrics.jsonl").exists() else []) < 4:
            assert time.monotonic() < deadline and procs[0].poll() is None, (tmp_path / "rank0.log").read_text()
            time.sleep(0.2)
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        rc = procs[0].wait(timeout=120)
        waited = time.monotonic() - stopped
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for log in logs:
            log.close()
    text = (tmp_path / "rank0.log").read_text()
    assert rc == 1, text[-3000:]
    assert waited < 60, f"rank 0 took {waited:.0f} s to give up (collective timeout 10 s)"
    assert "another rank stopped responding" in text and "collective_timeout_s=10" in text, text[-3000:]
    assert f"run.output_dir={run_dir}" in text
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_")
                   and not p.name.endswith(".partial"))
    assert saved, "no checkpoint was saved before the stop"
    # The relaunch (both ranks, same folder) resumes and finishes.
    port = _free_port()
    logs = [open(tmp_path / f"again{r}.log", "w") for r in range(2)]
    procs = [_train(r, 2, port, run_dir, cache_dir, log=logs[r]) for r in range(2)]
    try:
        rcs = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
        for log in logs:
            log.close()
    again = (tmp_path / "again0.log").read_text()
    assert rcs == [0, 0], again[-3000:]
    assert "resum" in again.lower(), again[-3000:]


# --- the command line as a user meets it: dsv4-train and torchrun subprocesses --------------------------------------

BIN = os.path.dirname(sys.executable)


def _command(*args, cwd, timeout=300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=_clean_env(**env))


def test_help_lists_the_groups_presets_and_keys(tmp_path):
    proc = _command(os.path.join(BIN, "dsv4-train"), "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "_schema" not in out and "model      [debug] flash pro" in out and "optim      [adamw] muon" in out
    assert "  run.steps" in out and "Optimizer steps." in out and "Peak learning rate." in out
    assert all(len(line) <= 120 for line in out.splitlines()), "one line per key"
    assert not list(tmp_path.iterdir()), "--help made a folder"


@pytest.mark.parametrize("override, message", [
    ("model=flsh", "dsv4-train: model=flsh: no such preset; choose one of ['debug', 'flash', 'pro']"),
    ("optim.learning_rate=1e-3", "dsv4-train: optim.learning_rate: no such key; did you mean 'lr'?"),
    ("optim.min_lr=1", "dsv4-train: optim.min_lr: must be in [0, optim.lr"),
    ("run.seed=-1", "dsv4-train: run.seed: must be >= 0, got -1"),
])
def test_refused_command_line_names_the_key_and_leaves_no_run_folder(tmp_path, override, message):
    run_dir = tmp_path / "run"
    proc = _command(os.path.join(BIN, "dsv4-train"), override, f"run.output_dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[0]], proc.stderr  # one line
    assert proc.stderr.startswith(message), proc.stderr
    assert "model_schema" not in proc.stderr and "+optim" not in proc.stderr
    assert not run_dir.exists() and not list(tmp_path.iterdir())


def test_output_folder_under_a_file_is_refused_naming_the_key(tmp_path):
    (tmp_path / "a_file").write_text("")
    proc = _command(os.path.join(BIN, "dsv4-train"), f"run.output_dir={tmp_path / 'a_file' / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("dsv4-train: run.output_dir: ") and "is a file" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_importing_dsv4_prints_no_transformer_engine_or_apex_warnings(tmp_path):
    proc = _command(sys.executable, "-c", "import dsv4, dsv4.train.loop, dsv4.model.api, dsv4.train.main, "
                    "dsv4.train.export, dsv4.conf.schema", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr


def test_torchrun_config_error_is_reported_once_as_the_root_cause(tmp_path):
    """torchrun ends every failed launch with its ChildFailedError banner (nothing a rank does comes after it): the
    dsv4 message appears once, as the banner's root cause, its last entry; no dsv4 traceback; no run folder."""
    run_dir = tmp_path / "run"
    proc = _command(os.path.join(BIN, "torchrun"), "--nproc-per-node=2", f"--master-port={_free_port()}", "-m",
                    "dsv4.train", "optim.lr=-1", f"run.output_dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]  # torchrun's own code for a failed child
    message = "dsv4-train: optim.lr: must be > 0, got -1.0"
    assert proc.stderr.count("optim.lr: must be > 0") == 1, proc.stderr[-3000:]
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-2] == f"traceback : {message}" and set(lines[-1]) == {"="}, proc.stderr[-3000:]
    root = proc.stderr.rindex("Root Cause")
    assert "exitcode  : 2" in proc.stderr[root:] and "rank      : 0" in proc.stderr[root:]
    assert "dsv4/" not in proc.stderr and not run_dir.exists()


def test_torchrun_two_ranks_train_with_the_defaults(tmp_path, cache_dir):
    """The debug preset's defaults on 2 ranks (global batch derived: 4 x 2; a 3-step run's warm-up clipped), and
    main.log holds dsv4's own lines, without megatron's gradient-bucket listings."""
    run_dir = tmp_path / "run"
    proc = _command(os.path.join(BIN, "torchrun"), "--nproc-per-node=2", f"--master-port={_free_port()}", "-m",
                    "dsv4.train", "run.steps=3", f"run.output_dir={run_dir}", f"data.cache_dir={cache_dir}",
                    cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "step      3/3 loss" in proc.stdout
    assert proc.stdout.count("data.global_batch_size: unset, so micro_batch_size x data-parallel ranks = 4 x 2 = 8") \
        == 1  # from rank 0 only
    assert proc.stdout.count("optim.warmup_steps: unset, so 0 warm-up steps") == 1
    log = (run_dir / "main.log").read_text()
    for line in ("parameters on rank 0", "3 steps of 8 x 256 tokens", "step 3/3 loss", "step 3: checkpoint"):
        assert line in log, line
    assert "Params for bucket" not in log and "Number of buckets" not in log
