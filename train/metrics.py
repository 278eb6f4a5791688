"""What a run shows and keeps: the run folder, TensorBoard scalars and a rank-0 progress line.

The run folder holds `config.yaml` (the resolved config), `versions.json` (git revision, Python and package
versions) and `tb/` (TensorBoard events: `tensorboard --logdir <run folder>`). Only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from typing import Callable

from omegaconf import OmegaConf

_log = logging.getLogger(__name__)

PACKAGES = ("torch", "megatron-core", "hydra-core", "omegaconf", "transformers", "tokenizers", "tensorboard",
            "safetensors", "numpy", "dsv4")


def git_revision(path: str) -> str:
    """`<sha>` or `<sha>+dirty` of the checkout holding `path`, or 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def write_run_record(run_dir: str, cfg) -> None:
    """The resolved config and the software it ran with, for reproducing the run."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.structured(dataclasses.asdict(cfg))))
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    record = {"git": git_revision(os.path.dirname(os.path.abspath(__file__))), "python": sys.version.split()[0],
              "platform": platform.platform(), "argv": sys.argv, "packages": versions}
    with open(os.path.join(run_dir, "versions.json"), "w") as f:
        json.dump(record, f, indent=1)


class Monitor:
    """TensorBoard scalars plus a progress line with ETA, on rank 0; a no-op elsewhere.

    `start_step`: the step this process starts from (a resumed run's checkpoint step). The ETA is the rate of the
    steps this process ran times the steps left: the resumed steps took no time here and must not count as done
    fast. `clock`: seconds (time.perf_counter; a fake one in tests)."""

    def __init__(self, run_dir: str, total_steps: int, enabled: bool, progress_bar: bool, start_step: int = 0,
                 clock: Callable[[], float] = time.perf_counter):
        self.enabled, self.total, self.start_step, self.clock = enabled, total_steps, start_step, clock
        self.writer = None
        self.log = None
        self.bar = None
        self.start = clock()
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(run_dir, "tb"))
        # Every step's metrics at full precision, appended (a resumed run adds the steps it redoes again).
        self.log = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        if progress_bar and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                # initial: tqdm's rate and ETA count only the steps after it ((n - initial) / elapsed).
                self.bar = tqdm(total=total_steps, initial=start_step, desc="dsv4-train", unit="step",
                                dynamic_ncols=True)
            except ImportError:  # tqdm is optional: plain lines instead
                self.bar = None

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def record(self, step: int, metrics: dict) -> None:
        """One line of metrics.jsonl: {"step": step, **metrics} (numbers and flags only)."""
        if self.log is not None:
            row = {"step": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))}}
            self.log.write(json.dumps(row) + "\n")
            self.log.flush()

    def progress(self, step: int, line: str, loss: float | None = None) -> None:
        """After optimizer step `step` (1-based): update the bar, or print a line with the ETA."""
        if not self.enabled:
            return
        _log.info("step %d/%d %s", step, self.total, line)  # main.log (dsv4-train shows INFO only there)
        if self.bar is not None:
            self.bar.n = step
            if loss is not None:
                self.bar.set_postfix_str(f"loss={loss:.4f}")
            self.bar.refresh()
            return
        elapsed = self.clock() - self.start
        eta = elapsed / max(step - self.start_step, 1) * (self.total - step)  # this process's rate
        print(f"step {step:>6}/{self.total} {line} eta {_fmt_time(eta)}", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        _log.info(text)
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
