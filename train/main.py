"""`dsv4-train`: the training job. Hydra composes conf/config.yaml with presets and command-line overrides.

    dsv4-train                                        # the debug model on the embedded corpus
    dsv4-train model=flash data.prefixes=[/data/web] data.seq_length=4096 optim.lr=2.7e-4 run.steps=100000
    dsv4-train --cfg job                              # print the resolved config and exit
    dsv4-train -m optim.lr=1e-3,3e-3                  # a multirun: one run folder per value

Bad configuration fails before any process group or data is touched, with a message naming the key and the fix.
"""

from __future__ import annotations

import logging
import sys
import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dsv4.conf.schema import register_configs, to_config
from dsv4.model.config import ConfigError

# megatron-core warns once per module that TransformerEngine/apex are absent; on CPU that is expected.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def _run(dcfg: DictConfig) -> float | None:
    try:
        cfg = to_config(dcfg)  # type checks and every cross-field check, before anything else happens
    except ConfigError as e:
        print(f"dsv4-train: {e}", file=sys.stderr)
        sys.exit(2)
    # megatron-core's dataset builders log every index they build at INFO; keep them in main.log, not the console.
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    from .loop import NonFiniteLossError, train

    try:
        result = train(cfg, run_dir=HydraConfig.get().runtime.output_dir)
    except (NonFiniteLossError, FileNotFoundError, ValueError) as e:
        print(f"dsv4-train: {e}", file=sys.stderr)
        sys.exit(1)
    return result.valid_loss  # what a Hydra sweeper would optimise


def main() -> None:
    register_configs()
    _run()


if __name__ == "__main__":
    main()
