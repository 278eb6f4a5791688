"""`dsv4-train`: the training job. Hydra composes conf/config.yaml with presets and command-line overrides.

    dsv4-train                                        # the debug model on the embedded corpus
    dsv4-train model=flash data.prefixes=[/data/web] data.seq_length=4096 optim.lr=2.7e-4 run.steps=100000
    dsv4-train --cfg job                              # print the resolved config and exit
    dsv4-train -m optim.lr=1e-3,3e-3                  # a multirun: one run folder per value

Bad configuration fails before any process group or data is touched, with a message naming the key and the fix.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from dsv4.conf.schema import compose_overrides, register_configs, to_config
from dsv4.model.config import ConfigError
from dsv4.parallel.launch import RendezvousError, launch_env

# (dsv4/__init__.py silences megatron-core's TransformerEngine/apex notices.) Its collectives use torch names
# torch 2.13 deprecates, and it recommends a CUDA setting on every SP layer.
warnings.filterwarnings("ignore", message=r"`torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                                          "deprecated")
warnings.filterwarnings("ignore", message="When using sequence parallelism it is recommended to set the environment")
warnings.filterwarnings("ignore", message="full scope is deprecated")
# megatron-core 0.16.1's checkpoint loader calls a DCP function torch 2.13 deprecates.
warnings.filterwarnings("ignore", message="`load_state_dict` is deprecated and will be removed")
# The distributed optimizer's zero_grad sets `.grad = None` on its shard views (harmless; megatron-core 0.16.1).
warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf Tensor is being accessed")


class JobFailed(RuntimeError):
    """A failed job of a multirun: Hydra's launchers (and submitit's, which writes it to the job's result file) record
    an exception, whereas an exit would end the whole sweep or leave the submitting side waiting."""


def _fail(message: str, code: int):
    print(f"dsv4-train: {message}", file=sys.stderr)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise JobFailed(message)
    sys.exit(code)


def _refuse(message: str) -> None:
    """A configuration error: every rank finds the same one (each validates the same config before any process
    group exists), so rank 0 alone reports it and every rank exits with 2.

    Under torchrun the report goes into the rank's error file (TORCHELASTIC_ERROR_FILE) instead of stderr:
    torchrun always ends a failed launch with its ChildFailedError banner, and with the file it shows the message
    once, as the banner's root cause (its last entry), where it would otherwise print a link to its docs. torchrun
    stops the other ranks as soon as one exits, so the others wait a moment for rank 0 to exit first (and report
    themselves if it does not)."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        if _launch_rank() != 0:
            time.sleep(3)
        with open(error_file, "w") as f:
            json.dump({"message": f"dsv4-train: {message}", "timestamp": int(time.time())}, f)
    elif _launch_rank() == 0:
        print(f"dsv4-train: {message}", file=sys.stderr)
    sys.exit(2)


def _launch_rank() -> int:
    """This process's rank as the launcher announces it (0 without one, or when the environment is malformed:
    the job's start-up then names what is wrong)."""
    try:
        return launch_env().rank
    except ConfigError:
        return 0


def _check_before_hydra(args: list[str]) -> None:
    """Compose and validate a plain run's config before Hydra does: Hydra creates the run folder before calling
    the job and reports an unknown key with its own hint (prefix `+`), where dsv4 names the key it meant. A
    refused run thus leaves no folder behind. Runs with Hydra's flags (--cfg, -m, --config-dir, ...) are Hydra's
    to compose: they are checked by `_run` as before."""
    if any(a.startswith("-") for a in args):
        return
    try:
        to_config(compose_overrides([a for a in args if not a.startswith("hydra")]))
    except ConfigError as e:
        _refuse(str(e))


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def _run(dcfg: DictConfig) -> float | None:
    if _launch_rank() != 0:  # the notices of derived values (batch, warm-up): once, from rank 0
        logging.getLogger("dsv4").setLevel(logging.WARNING)
    try:
        cfg = to_config(dcfg)  # type checks and every cross-field check, before anything else happens
    except ConfigError as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            _fail(str(e), 2)
        _refuse(str(e))
    # megatron-core's dataset builders log every index they build at INFO; keep them in main.log, not the console.
    # dsv4's own lines (start-up summary, steps, checkpoints) are printed and logged at INFO: main.log holds them.
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
        handler.addFilter(_demote_megatron_buffers)
    from .loop import NonFiniteLossError, train

    run_dir = HydraConfig.get().runtime.output_dir
    try:
        result = train(cfg, run_dir=run_dir)
    except RendezvousError as e:
        _fail(str(e), 1)
    except ConfigError as e:  # a layout the launch cannot run (e.g. interleaved pp=2 on gloo)
        _fail(str(e), 2)
    except (NonFiniteLossError, FileNotFoundError, ValueError) as e:
        _fail(str(e), 1)
    except RuntimeError as e:
        lost = _lost_peer(e)
        if lost is None:
            raise
        _fail(f"{lost} (cluster.collective_timeout_s={cfg.cluster.collective_timeout_s:g}); this rank stops so the "
              f"job ends. Nothing saved is lost: run the same command with run.output_dir={run_dir} (a requeued or "
              f"chained SLURM job does) to resume from its newest complete checkpoint.\n"
              f"  cause: {str(e).strip().splitlines()[0]}", 1)
    if result.stopped_by:  # stopped early by a signal, with a checkpoint: not finished, resumable
        code = 128 + int(getattr(signal, result.stopped_by))
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise JobFailed(f"stopped by {result.stopped_by} after a checkpoint; rerun with run.output_dir={run_dir} "
                            "to resume")
        sys.exit(code)
    return result.valid_loss  # what a Hydra sweeper would optimise


def _demote_megatron_buffers(record: logging.LogRecord) -> bool:
    """megatron-core's DDP set-up logs its gradient buckets (every parameter's name) and FSDP notices at INFO:
    demoted to DEBUG, shown only when the root logger is at DEBUG (e.g. `hydra.verbose=true`)."""
    if record.name.startswith("megatron.core.distributed") and record.levelno == logging.INFO:
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)
    return True


def _lost_peer(e: RuntimeError) -> str | None:
    """What a collective's error says about the other ranks, or None when it is not about them."""
    text = str(e)
    if "Timed out" in text or "timed out" in text or "Timeout" in text:
        return "a collective timed out: another rank stopped responding (its node failed or hangs)"
    if "Connection closed by peer" in text or "Connection reset by peer" in text or "Broken pipe" in text:
        return "another rank's connection closed: that rank or its node died"
    return None


def main() -> None:
    register_configs()
    args = sys.argv[1:]
    if "--help" in args or "-h" in args:
        from .help import usage

        print(usage())
        return
    try:
        _check_before_hydra(args)
        _run()
    except KeyboardInterrupt:  # Ctrl-C before training installs its handler (composing, imports) or after it
        print("dsv4-train: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
