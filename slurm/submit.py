"""`dsv4-submit`: render an sbatch script from the composed config and submit it as a SLURM job (or a chain).

    dsv4-submit cluster=slurm cluster.nodes=4 cluster.gpus_per_node=8 model=flash parallel.tp=4 ... --dry-run
    dsv4-submit cluster=slurm cluster.nodes=4 cluster.partition=train cluster.time=04:00:00 --chain 5 ...

Every argument that is not an option is a Hydra override; they are validated here for the job's world size
(cluster.nodes x ranks per node) and passed unchanged to `python -m dsv4.train` inside the job.

How the job runs: `srun` starts one task per rank (ranks from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, the
rendezvous on the first node). We use SLURM's own tasks rather than torchrun on each node: SLURM already starts,
signals and cleans up every rank (`--kill-on-bad-exit` ends the step when one rank fails instead of leaving the
others hanging in a collective), and its USR1 warning reaches the ranks directly, with no agent in between.

The run folder is <cluster.runs_root>/<cluster.job_name>-<job id> (or run.output_dir when given): the job is
submitted held, the folder is made and receives the rendered script and the resolved config, then the job is
released. A requeued job keeps its id, so it finds its checkpoints (run.resume=auto); the jobs of a --chain (each
starting after the previous one ends, --dependency=afterany) all use the first job's folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

from omegaconf import OmegaConf

__all__ = ["render", "main"]


def _split_model(overrides: list) -> tuple[str, list]:
    """model=<preset> goes to compose_config's model argument; the rest stay overrides."""
    model, rest = "debug", []
    for o in overrides:
        if o.startswith("model="):
            model = o.split("=", 1)[1]
        else:
            rest.append(o)
    return model, rest


def _explicit_output_dir(overrides: list) -> str | None:
    for o in overrides:
        if o.startswith(("run.output_dir=", "+run.output_dir=", "++run.output_dir=")):
            return os.path.abspath(o.split("=", 1)[1])
    return None


def render(cfg, overrides: list, python: str = sys.executable) -> str:
    """The sbatch script for `cfg` (a validated DSV4Config with cluster.kind=slurm) and the user's overrides."""
    c = cfg.cluster
    runs_root = os.path.abspath(c.runs_root)
    explicit = _explicit_output_dir(overrides)
    default_dir = explicit or f"{runs_root}/{c.job_name}-${{SLURM_JOB_ID}}"
    out_path = f"{explicit}/slurm-%j.out" if explicit else f"{runs_root}/{c.job_name}-%j/slurm-%j.out"
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={c.job_name}",
             f"#SBATCH --nodes={c.nodes}",
             f"#SBATCH --ntasks-per-node={c.ranks_per_node}"]
    if c.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={c.gpus_per_node}")
    lines += [f"#SBATCH --cpus-per-task={c.cpus_per_task}",
              f"#SBATCH --time={c.time}"]
    lines += [f"#SBATCH --{key}={getattr(c, key)}" for key in ("partition", "account", "qos") if getattr(c, key)]
    lines += [f"#SBATCH --signal=USR1@{c.signal_lead_s}",  # to every task: checkpoint, then scontrol requeue
              "#SBATCH --requeue",
              "#SBATCH --open-mode=append",  # a requeued run appends to the same log
              f"#SBATCH --output={out_path}"]
    lines += [f"#SBATCH {line}" for line in c.extra_sbatch]
    cmd = " ".join(shlex.quote(o) for o in ["-m", "dsv4.train", *overrides])
    lines += ["",
              "# Rendered by dsv4-submit; the Hydra overrides below are the ones given on its command line.",
              "set -euo pipefail",
              ': "${SLURM_JOB_ID:?submit this script with sbatch (SLURM_JOB_ID is not set)}"',
              *c.setup,
              f'RUN_DIR="${{DSV4_RUN_DIR:-{default_dir}}}"  # a chained job gets the first job\'s folder',
              'mkdir -p "$RUN_DIR"',
              "export MASTER_ADDR=" + (shlex.quote(c.master_addr) if c.master_addr else
                                       '"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'),
              "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
              'echo "dsv4: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, '
              '$SLURM_NTASKS ranks, rendezvous $MASTER_ADDR:$MASTER_PORT, run folder $RUN_DIR"',
              # One task per rank; a rank that fails ends the step (no hang), --wait bounds the others' exit.
              "srun --kill-on-bad-exit=1 --wait=120 bash -c "
              "'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID "
              "LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE; exec \"$0\" \"$@\"' "
              f'{shlex.quote(python)} {cmd} "run.output_dir=$RUN_DIR"',
              ""]
    return "\n".join(lines)


def _run(cmd: list) -> str:
    """Run a SLURM command; its stdout, or SystemExit(1) with its error."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        print(f"dsv4-submit: {cmd[0]} not found: run dsv4-submit on a SLURM login node (or use --dry-run to see "
              f"the script)", file=sys.stderr)
        raise SystemExit(1)
    if done.returncode:
        print(f"dsv4-submit: {' '.join(cmd)} failed: {done.stderr.strip() or done.stdout.strip()}", file=sys.stderr)
        raise SystemExit(1)
    return done.stdout.strip()


def submit(cfg, overrides: list, script: str, chain: int = 1) -> tuple[list, str]:
    """Submit the script (held), make the run folder with the script and resolved config, release; then the rest
    of the chain. Returns (job ids, run folder)."""
    explicit = _explicit_output_dir(overrides)
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as f:
        f.write(script)
        path = f.name
    try:
        if explicit:
            os.makedirs(explicit, exist_ok=True)
        first = _run(["sbatch", "--parsable", "--hold", path]).split(";")[0]
        run_dir = explicit or os.path.join(os.path.abspath(cfg.cluster.runs_root), f"{cfg.cluster.job_name}-{first}")
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "sbatch.sh"), "w") as out:
            out.write(script)
        with open(os.path.join(run_dir, "config.yaml"), "w") as out:
            out.write(OmegaConf.to_yaml(OmegaConf.structured(dataclasses.asdict(cfg))))
        jobs = [first]
        _run(["scontrol", "release", first])
        for _ in range(chain - 1):
            jobs.append(_run(["sbatch", "--parsable", f"--dependency=afterany:{jobs[-1]}",
                              f"--output={run_dir}/slurm-%j.out", f"--export=ALL,DSV4_RUN_DIR={run_dir}",
                              path]).split(";")[0])
        with open(os.path.join(run_dir, "submit.json"), "w") as out:
            json.dump({"jobs": jobs, "argv": sys.argv, "overrides": overrides}, out, indent=1)
    finally:
        os.unlink(path)
    return jobs, run_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dsv4-submit", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and submit nothing")
    p.add_argument("--chain", type=int, default=1, help="submit N jobs, each starting after the previous ends")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. cluster=slurm cluster.nodes=4 model=flash")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from dsv4.conf.schema import compose_config, compose_raw
    from dsv4.model.config import ConfigError

    if args.chain < 1:
        print("dsv4-submit: --chain must be >= 1", file=sys.stderr)
        return 2
    model, rest = _split_model(args.overrides)
    try:
        raw = compose_raw(model, rest).cluster  # the cluster sets the world size the layout is checked against
        if raw.kind == "local":
            print("dsv4-submit: cluster.kind is local; add cluster=slurm (and cluster.nodes=..., "
                  "cluster.gpus_per_node=...)", file=sys.stderr)
            return 2
        nodes, per_node = int(raw.nodes), int(raw.gpus_per_node) or int(raw.tasks_per_node)
        cfg = compose_config(model, rest, world_size=max(nodes * per_node, 1))
    except (ConfigError, ValueError) as e:
        print(f"dsv4-submit: {e}", file=sys.stderr)
        return 2
    script = render(cfg, args.overrides)
    if args.dry_run:
        print(script, end="")
        return 0
    if shutil.which("sbatch") is None:
        print("dsv4-submit: sbatch not found: run dsv4-submit on a SLURM login node (or --dry-run to see the "
              "script)", file=sys.stderr)
        return 1
    jobs, run_dir = submit(cfg, args.overrides, script, args.chain)
    print(f"dsv4-submit: submitted job{'s' if len(jobs) > 1 else ''} {' -> '.join(jobs)}; run folder {run_dir}; "
          f"log {run_dir}/slurm-{jobs[0]}.out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
