"""`dsv4-train`: the training job. Hydra composes conf/config.yaml with presets and command-line overrides.

    dsv4-train                                        # the debug model on the embedded corpus
    dsv4-train model=flash data.prefixes=[/data/web] data.seq_length=4096 optim.lr=2.7e-4 run.steps=100000
    dsv4-train --cfg job                              # print the resolved config and exit
    dsv4-train -m optim.lr=1e-3,3e-3                  # a multirun: one run folder per value

Bad configuration fails before any process group or data is touched, with a message naming the key and the fix.
"""

from __future__ import annotations

import logging
import signal
import sys
import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dsv4.conf.schema import register_configs, to_config
from dsv4.model.config import ConfigError

# megatron-core warns once per module that TransformerEngine/apex are absent; on CPU that is expected. Its
# collectives use torch names torch 2.13 deprecates, and it recommends a CUDA setting on every SP layer.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="Apex is not installed")
warnings.filterwarnings("ignore", message=r"`torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                                          "deprecated")
warnings.filterwarnings("ignore", message="When using sequence parallelism it is recommended to set the environment")
warnings.filterwarnings("ignore", message="full scope is deprecated")
# megatron-core 0.16.1's checkpoint loader calls a DCP function torch 2.13 deprecates.
warnings.filterwarnings("ignore", message="`load_state_dict` is deprecated and will be removed")
# The distributed optimizer's zero_grad sets `.grad = None` on its shard views (harmless; megatron-core 0.16.1).
warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf Tensor is being accessed")


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
    except ConfigError as e:  # a layout the launch cannot run (e.g. interleaved pp=2 on gloo)
        print(f"dsv4-train: {e}", file=sys.stderr)
        sys.exit(2)
    except (NonFiniteLossError, FileNotFoundError, ValueError) as e:
        print(f"dsv4-train: {e}", file=sys.stderr)
        sys.exit(1)
    if result.stopped_by:  # stopped early by a signal, with a checkpoint: not finished, resumable
        sys.exit(128 + int(getattr(signal, result.stopped_by)))
    return result.valid_loss  # what a Hydra sweeper would optimise


def main() -> None:
    register_configs()
    _run()


if __name__ == "__main__":
    main()
