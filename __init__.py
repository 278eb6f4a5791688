"""dsv4: pre-training DeepSeek-V4-style language models, Megatron-style, on megatron-core.

Sub-packages: `dsv4.model` (the architecture), `dsv4.parallel` (process groups, parallel layers, CPU
compatibility), `dsv4.optim`, `dsv4.train`, `dsv4.conf` (Hydra configs). The notebook API is re-exported here.
"""

import warnings

__version__ = "0.1.0"

# megatron-core warns once per module at import that TransformerEngine/apex are absent and it falls back to torch;
# that is the expected set-up on CPU (and with apex, which is not on PyPI, never installed), so it says nothing.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="Apex is not installed")

_API = ("model_config", "build_model", "load_hf", "load_weights", "logits", "export_hf")


def __getattr__(name):
    # Lazy, so `import dsv4` stays cheap and does not import torch/megatron until the API is used.
    if name in _API:
        from .model import api

        return getattr(api, name)
    raise AttributeError(f"module 'dsv4' has no attribute {name!r}")


__all__ = list(_API)
