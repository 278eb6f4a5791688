"""Every command and snippet in README.md is run by a test: the Python API block is executed verbatim (read from the
README, so an edit there is what runs), each shell command line is validated here cheaply (its config composed and
checked, or the command run with --help / --cfg job) or is listed with the test that runs it. A command added to the
README without an entry here fails `test_every_readme_command_is_accounted_for`."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from dsv4.conf.schema import compose_config

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BIN = os.path.dirname(sys.executable)


def readme() -> str:
    with open(README) as f:
        return f.read()


def shell_commands() -> list[str]:
    """The README's command lines: indented code lines that start with a program, and inline `pip install ...`."""
    programs = ("python3 ", ".venv/bin/", "dsv4-", "torchrun ", "pip ")
    lines = [line.strip() for line in readme().splitlines() if line.startswith("    ")]
    commands = [line for line in lines if line.startswith(programs)]
    return commands + re.findall(r"`((?:\.venv/bin/)?pip install [^`]+)`", readme())


def overrides_of(command: str) -> list[str]:
    """The KEY=VALUE / GROUP=PRESET words of a `dsv4-train` / `torchrun -m dsv4.train` line (comment and `...` off)."""
    words = command.split("#")[0].split()
    return [w for w in words if "=" in w and not w.startswith("-")]


# Validated here: the line's overrides compose and pass every start-up check at the line's world size.
VALIDATED = {
    "dsv4-train optim.lr=1e-3 run.steps=1000 data.seq_length=512 data.global_batch_size=8": 1,
    "dsv4-train precision=fp8 precision.fp8_modules=[attention,indexer,experts] precision.fp8=tensorwise ...": 1,
    "dsv4-train data.prefixes=[data/web,data/code] data.weights=[0.7,0.3] model.vocab_size=32000": 1,
    "torchrun --nproc-per-node=8 -m dsv4.train parallel.tp=2 parallel.pp=2 parallel.ep=2   # dp = 8 / (2*2) = 2": 8,
    "dsv4-train run.output_dir=runs/big ...                # resumes by itself: run.resume=auto is the default": 1,
    "dsv4-train run.resume=runs/big/checkpoints/step_00002000 run.output_dir=runs/big2 ...   # an explicit one": 1,
    "torchrun --nproc-per-node=4 -m dsv4.train parallel.tp=1 run.resume=runs/big ...        # another layout": 4,
    "dsv4-train run.save_interval=500 run.keep_last=3 run.async_save=true                   # writes in background": 1,
}

# Run here as they stand (cheap: they print and exit).
EXECUTED = {
    "dsv4-train --cfg job                        # print the resolved config": ["--cfg", "job"],
    "dsv4-train --help                           # the groups, their presets and the most used keys": ["--help"],
}

# Run by another test, named with the reason.
ELSEWHERE = {
    'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/dsv4-train':
        "the set-up is the environment this suite runs in; `.venv/bin/dsv4-train` (the default 300-step debug run) is "
        "tests/test_train.py::test_main_command_trains_and_writes_its_run_folder with run.steps=6",
    'python3 -m venv .venv && .venv/bin/pip install -q -e ".[test]" && .venv/bin/python -m pytest -q':
        "this is .ci/run, the command that runs this suite",
    ".venv/bin/tensorboard --logdir runs":
        "tensorboard's own command; the events it reads: tests/test_train.py::"
        "test_run_folder_holds_config_versions_and_tensorboard",
    "dsv4-train -m optim.lr=1e-3,3e-3            # multirun: one run folder per job under run.output_dir":
        "tests/test_train.py::test_multirun_gives_each_job_its_own_run_folder (the same sweep, 2 steps)",
    "dsv4-preprocess --output-prefix data/web --train-tokenizer --vocab-size 32000 --workers 8 corpus/":
        "tests/test_data.py::test_preprocess_round_trip (--train-tokenizer) and "
        "test_preprocess_jsonl_key_and_workers (--workers)",
    "dsv4-export --out hf/ --checkpoint runs/big                                            # to Hugging Face":
        "tests/test_checkpoint.py::test_export_reads_a_sharded_checkpoint",
    "dsv4-train [GROUP=PRESET ...] [KEY=VALUE ...] [--cfg job] [-m]":
        "a synopsis; its forms are the lines above; presets and keys: tests/test_config.py",
    "torchrun --nproc-per-node=N -m dsv4.train parallel.tp=T parallel.pp=P parallel.ep=E [KEY=VALUE ...]   # several "
    "ranks": "a synopsis; tests/test_launch.py::test_torchrun_two_ranks_train_with_the_defaults runs torchrun",
    "dsv4-preprocess --output-prefix P (--tokenizer tokenizer.json | --train-tokenizer --vocab-size N) FILES/DIRS":
        "a synopsis; tests/test_data.py::test_preprocess_round_trip and test_preprocess_jsonl_key_and_workers",
    "dsv4-export --out DIR [--model debug|flash|pro] [--weights state.pt | --hf DIR | --checkpoint CKPT] [--dtype "
    "bfloat16] [model.KEY=VALUE ...]":
        "a synopsis; tests/test_train.py::test_export_command_writes_a_loadable_directory, "
        "test_export_command_from_a_state_dict_file, tests/test_checkpoint.py::test_export_reads_a_sharded_checkpoint",
    "dsv4-submit cluster=slurm cluster.nodes=N cluster.gpus_per_node=G [--dry-run] [--chain K] [KEY=VALUE ...]   # "
    "SLURM (slurm/README.md)":
        "a synopsis; tests/test_slurm_submit.py (--dry-run rendering, --chain) and tests/test_slurm_cluster.py",
    "dsv4-train -m hydra/launcher=dsv4_slurm cluster=slurm cluster.nodes=N optim.lr=1e-3,3e-3 [KEY=VALUE ...]   # a "
    "sweep, one SLURM job per point": "a synopsis; tests/test_slurm_cluster.py::test_multirun_sweep_through_submitit",
    ".venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu":
        "an installation step on machines without the local wheel; not run (it downloads)",
    'pip install -e ".[gpu]"': "GPU machines only (TransformerEngine needs CUDA); not run on CPU",
}


def test_every_readme_command_is_accounted_for():
    listed = set(VALIDATED) | set(EXECUTED) | set(ELSEWHERE)
    found = shell_commands()
    assert len(found) == len(set(found)), "a command appears twice in the README"
    assert set(found) - listed == set(), "README commands no test runs: add them to tests/test_readme.py"
    assert listed - set(found) == set(), "tests/test_readme.py lists commands the README no longer has"


@pytest.mark.parametrize("command", list(VALIDATED))
def test_readme_command_validates(command, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = compose_config("debug", overrides_of(command), world_size=VALIDATED[command])
    for override in overrides_of(command):
        key, value = override.split("=", 1)
        if "." in key and "[" not in value:
            group, name = key.split(".")
            got = getattr(getattr(cfg, group), name)
            same = float(got) == float(value) if isinstance(got, (int, float)) and not isinstance(got, bool) \
                else str(got).lower() == value.lower()
            assert same, (override, got)


@pytest.mark.parametrize("command", list(EXECUTED))
def test_readme_command_runs(command, tmp_path):
    proc = subprocess.run([os.path.join(BIN, "dsv4-train"), *EXECUTED[command]], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model:" in proc.stdout and "optim:" in proc.stdout or "most used keys:" in proc.stdout


def python_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", readme(), re.S)
    assert len(blocks) == 1, "the README's Python API block"
    return blocks[0]


def test_readme_python_api_block_runs_verbatim(tmp_path, monkeypatch, groups):
    """The block as written (in this process's single-rank world), then what its comments promise."""
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(python_block(), "README.md", "exec"), scope)
    model, ids, back = scope["model"], scope["ids"], scope["back"]
    assert scope["logits"].shape == (1, 128, model.cfg.vocab_size)
    assert scope["out"].loss is not None and scope["out"].mtp_losses
    assert torch.equal(scope["logits"], back(ids).logits)  # "and back, bit for bit"
    assert scope["cfg"].sliding_window == 256 and scope["cfg"].num_layers == 43
    assert (tmp_path / "hf_out" / "config.json").exists()
