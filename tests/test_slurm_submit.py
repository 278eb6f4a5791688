"""`dsv4-submit` (dsv4.slurm.submit): the sbatch script rendered from the config, checked without a cluster, and the
submission sequence (held submit, run folder, release, chain) against fake sbatch/scontrol commands."""

import json
import os

import pytest

from dsv4.slurm.submit import main

FLASH_16_NODES = ["cluster=slurm", "model=flash", "cluster.nodes=16", "cluster.gpus_per_node=8", "parallel.tp=8",
                  "parallel.pp=4", "parallel.ep=8", "data.seq_length=4096", "data.micro_batch_size=1",
                  "data.global_batch_size=256", "cluster.partition=train", "cluster.account=proj",
                  "cluster.qos=high", "cluster.time=2-00:00:00", "cluster.signal_lead_s=300",
                  "cluster.extra_sbatch=['--exclusive','--mem=0']",
                  "cluster.setup=['source /opt/venv/bin/activate']", "optim=muon"]


def _dry_run(capsys, args):
    assert main([*args, "--dry-run"]) == 0
    return capsys.readouterr().out


def test_flash_on_16_nodes_renders_a_complete_sbatch_script(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = _dry_run(capsys, FLASH_16_NODES)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    header = [line for line in lines if line.startswith("#SBATCH")]
    assert header == ["#SBATCH --job-name=dsv4", "#SBATCH --nodes=16", "#SBATCH --ntasks-per-node=8",
                      "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=8", "#SBATCH --time=2-00:00:00",
                      "#SBATCH --partition=train", "#SBATCH --account=proj", "#SBATCH --qos=high",
                      "#SBATCH --signal=USR1@300", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                      f"#SBATCH --output={tmp_path}/runs/dsv4-%j/slurm-%j.out", "#SBATCH --exclusive",
                      "#SBATCH --mem=0"]
    assert "source /opt/venv/bin/activate" in lines
    srun = next(line for line in lines if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun
    assert "RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID" in srun
    # the overrides reach the trainer unchanged, then the run folder keyed by the job id
    assert "-m dsv4.train cluster=slurm model=flash cluster.nodes=16" in srun
    assert srun.endswith('"run.output_dir=$RUN_DIR"')
    assert f'RUN_DIR="${{DSV4_RUN_DIR:-{tmp_path}/runs/dsv4-${{SLURM_JOB_ID}}}}"' in script
    assert ': "${SLURM_JOB_ID:?submit this script with sbatch' in script


def test_cpu_job_and_explicit_run_folder(capsys, tmp_path):
    out = str(tmp_path / "myrun")
    script = _dry_run(capsys, ["cluster=slurm", "cluster.nodes=2", "cluster.gpus_per_node=0",
                               "cluster.tasks_per_node=2", "parallel.tp=2", "data.micro_batch_size=2",
                               f"run.output_dir={out}", "cluster.master_addr=127.0.0.1"])
    assert "#SBATCH --ntasks-per-node=2" in script and "--gpus-per-node" not in script
    assert "--partition" not in script and "--account" not in script
    assert f"#SBATCH --output={out}/slurm-%j.out" in script
    assert "export MASTER_ADDR=127.0.0.1" in script


@pytest.mark.parametrize("args,message", [
    (["parallel.tp=2"], "cluster.kind is local"),
    (["cluster=slurm", "cluster.nodes=1", "cluster.gpus_per_node=8", "parallel.tp=3"], "parallel.tp"),
    (["cluster=slurm", "cluster.time=4h"], "cluster.time"),
    (["cluster=slurm", "cluster.kind=pbs"], "cluster.kind"),
    (["cluster=slurm", "cluster.extra_sbatch=[exclusive]"], "cluster.extra_sbatch"),
    (["cluster=slurm", "cluster.nodes=0"], "cluster.nodes"),
])
def test_bad_submissions_name_the_key(capsys, args, message):
    assert main([*args, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def _fake_slurm(tmp_path, monkeypatch):
    """sbatch / scontrol stand-ins on PATH: sbatch prints job ids 100, 101, ...; both record their arguments."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\necho "sbatch $*" >> {log}\nn=$(grep -c "^sbatch" {log})\necho $((99 + n))\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "scontrol $*" >> {log}\n')
    for tool in ("sbatch", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return log


def test_submit_holds_fills_the_run_folder_releases_and_chains(capsys, tmp_path, monkeypatch):
    log = _fake_slurm(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert main(["cluster=slurm", "cluster.gpus_per_node=0", "cluster.tasks_per_node=1", "--chain", "3"]) == 0
    run_dir = tmp_path / "runs" / "dsv4-100"
    calls = log.read_text().splitlines()
    assert calls[0].startswith("sbatch --parsable --hold ")
    assert calls[1] == "scontrol release 100"
    assert calls[2].startswith(f"sbatch --parsable --dependency=afterany:100 --output={run_dir}/slurm-%j.out "
                               f"--export=ALL,DSV4_RUN_DIR={run_dir} ")
    assert calls[3].startswith("sbatch --parsable --dependency=afterany:101 ")
    assert (run_dir / "sbatch.sh").read_text().startswith("#!/bin/bash")
    assert "kind: slurm" in (run_dir / "config.yaml").read_text()
    assert json.loads((run_dir / "submit.json").read_text())["jobs"] == ["100", "101", "102"]
    assert "submitted jobs 100 -> 101 -> 102" in capsys.readouterr().out


def test_submit_without_sbatch_says_where_to_run(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["cluster=slurm", "cluster.gpus_per_node=0"]) == 1
    assert "sbatch not found" in capsys.readouterr().err
