"""The notebook API: build a model from a preset, load weights, get logits, export.

    import dsv4
    model = dsv4.build_model("debug", ["model.num_layers=4", "model.compress_ratios=[0,4,16,4,0]"])
    logits = dsv4.logits(model, token_ids)          # [b, s, vocab]
    dsv4.export_hf(model, "out/hf")                   # loads in transformers' DeepseekV4ForCausalLM
    model2 = dsv4.load_hf("out/hf")                   # and back

Everything here runs in one process: the first call sets up a single-process world (gloo on CPU, NCCL on GPU)
through `dsv4.parallel.state.init_distributed`, so no launcher is needed.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from dsv4.parallel.state import ParallelGroups, init_distributed

from .config import ModelConfig
from .hf_interop import from_hf_config, load_hf_into, read_hf_config, read_hf_weights, save_hf
from .transformer import DSV4Model


def model_config(preset: str = "debug", overrides: Sequence[str] = ()) -> ModelConfig:
    """The validated ModelConfig of a preset (debug, flash, pro) plus Hydra-style overrides
    (`"model.hidden_size=128"`; the `model.` prefix may be left out; other groups' keys, such as
    `data.seq_length=4096`, take part in the validation)."""
    from dsv4.conf.schema import _GROUPS, compose_config

    def qualified(o: str) -> str:
        return o if o.lstrip("+~").split(".")[0].split("=")[0] in _GROUPS else f"model.{o}"

    # A model config does not depend on the launch: check the layout for one rank, not $WORLD_SIZE.
    return compose_config(preset, [qualified(o) for o in overrides], world_size=1).model


def build_model(preset: str | ModelConfig = "debug", overrides: Sequence[str] = (), seed: int = 0,
                groups: Optional[ParallelGroups] = None, dtype: torch.dtype = torch.float32) -> DSV4Model:
    """A freshly initialised model (deterministic for `seed`; on this rank's GPU if there is one), in eval mode."""
    cfg = preset if isinstance(preset, ModelConfig) else model_config(preset, overrides)
    groups = groups or init_distributed()
    return DSV4Model(cfg, groups.tp, params_dtype=dtype, seed=seed).eval()


def load_hf(path: str, groups: Optional[ParallelGroups] = None, dtype: torch.dtype = torch.float32,
            **config_overrides) -> DSV4Model:
    """A model built from a Hugging Face `deepseek_v4` directory's config.json and weights."""
    cfg = from_hf_config(read_hf_config(path), **config_overrides)
    model = build_model(cfg, groups=groups, dtype=dtype)
    load_hf_into(model, read_hf_weights(path))
    return model


def load_weights(model: DSV4Model, path: str) -> DSV4Model:
    """Load a Hugging Face `deepseek_v4` directory's weights into an existing model of the same config."""
    load_hf_into(model, read_hf_weights(path))
    return model


@torch.no_grad()
def logits(model: DSV4Model, token_ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits [b, s, vocab] for token ids [b, s] (or [s])."""
    token_ids = token_ids.to(next(model.parameters()).device)
    if token_ids.dim() == 1:
        return model(token_ids.unsqueeze(0)).logits[0]
    return model(token_ids).logits


def export_hf(model: DSV4Model, path: str, dtype: Optional[torch.dtype] = None) -> None:
    """Write a Hugging Face directory (config.json + safetensors) that transformers loads."""
    save_hf(model, path, dtype=dtype)
