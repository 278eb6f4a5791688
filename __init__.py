"""dsv4: pre-training DeepSeek-V4-style language models, Megatron-style, on megatron-core.

Sub-packages: `dsv4.model` (the architecture), `dsv4.parallel` (process groups, parallel layers, CPU
compatibility), `dsv4.optim`, `dsv4.train`, `dsv4.conf` (Hydra configs). The notebook API is re-exported here.
"""

__version__ = "0.1.0"

_API = ("model_config", "build_model", "load_hf", "load_weights", "logits", "export_hf")


def __getattr__(name):
    # Lazy, so `import dsv4` stays cheap and does not import torch/megatron until the API is used.
    if name in _API:
        from .model import api

        return getattr(api, name)
    raise AttributeError(f"module 'dsv4' has no attribute {name!r}")


__all__ = list(_API)
