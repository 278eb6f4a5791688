"""The notebook API: build a model from a preset, load weights, get logits, export.

    import dsv4
    model = dsv4.build_model("debug", ["model.num_layers=4", "model.compress_ratios=[0,4,16,4,0]"])
    logits = dsv4.logits(model, token_ids)          # [b, s, vocab]
    dsv4.export_hf(model, "out/hf")                   # loads in transformers' DeepseekV4ForCausalLM
    model2 = dsv4.load_hf("out/hf")                   # and back
    model3 = dsv4.load_hf("transformers_dir")         # save_pretrained's: MTP initialised (or mtp="drop")

Everything here runs in one process: the first call sets up a single-process world (gloo on CPU, NCCL on GPU)
through `dsv4.parallel.state.init_distributed`, so no launcher is needed.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch

from dsv4.parallel.state import ParallelGroups, init_distributed

from .config import ModelConfig
from .hf_interop import from_hf_config, load_hf_into, read_hf_config, read_hf_weights, save_hf, split_mtp
from .transformer import DSV4Model


def model_config(preset: str = "debug", overrides: Sequence[str] = (), seq_length: Optional[int] = None) -> ModelConfig:
    """The validated ModelConfig of a preset (debug, flash, pro) plus Hydra-style overrides
    (`"model.hidden_size=128"`; the `model.` prefix may be left out).

    The model is validated on its own: the checks that need a sequence length (window, top-k against the compressed
    entries, HCA ratio, positions) run only at `seq_length` when given. Overrides of other groups (`parallel.tp=2`,
    `data.seq_length=4096`) make the whole config take part, as `dsv4-train` would check it on one rank."""
    from dsv4.conf.schema import _GROUPS, compose_raw, to_object

    def qualified(o: str) -> str:
        return o if o.lstrip("+~").split(".")[0].split("=")[0] in _GROUPS else f"model.{o}"

    overrides = [qualified(o) for o in overrides]
    if seq_length is not None:
        overrides.append(f"data.seq_length={seq_length}")
    cfg = to_object(compose_raw(preset, overrides))
    if all(o.lstrip("+~").startswith("model.") for o in overrides):
        return cfg.model.validate()
    # A model config does not depend on the launch: check the layout for one rank, not $WORLD_SIZE.
    return cfg.validate(world_size=1).model


def build_model(preset: str | ModelConfig = "debug", overrides: Sequence[str] = (), seed: int = 0,
                groups: Optional[ParallelGroups] = None, dtype: torch.dtype = torch.float32) -> DSV4Model:
    """A freshly initialised model (deterministic for `seed`; on this rank's GPU if there is one), in eval mode."""
    cfg = preset if isinstance(preset, ModelConfig) else model_config(preset, overrides)
    groups = groups or init_distributed()
    return DSV4Model(cfg, groups.tp, params_dtype=dtype, seed=seed).eval()


MTP_CHOICES = ("init", "drop")


def load_hf(path: str, groups: Optional[ParallelGroups] = None, dtype: torch.dtype = torch.float32,
            mtp: str = "init", seed: int = 0, **config_overrides) -> DSV4Model:
    """A model built from a Hugging Face `deepseek_v4` directory's config.json and weights (`config_overrides`:
    ModelConfig fields that replace config.json's).

    `mtp` says what happens to MTP blocks the config counts and the weights lack, as in every directory that
    transformers' `save_pretrained` wrote (its config says `num_nextn_predict_layers=1`; it has no MTP, so no
    `mtp.*` tensors): "init" (the default, for continuing training) builds them and initialises them from
    `seed`, with a notice naming them (a block whose tensors are only partly there is an error); "drop" imports
    without MTP (`mtp_depth=0`; `mtp.*` tensors are ignored, with a notice)."""
    if mtp not in MTP_CHOICES:
        raise ValueError(f"load_hf(mtp={mtp!r}): expected one of {MTP_CHOICES}")
    if mtp == "drop":
        if config_overrides.get("mtp_depth", 0) != 0:
            raise ValueError(f"load_hf(mtp='drop', mtp_depth={config_overrides['mtp_depth']}): 'drop' imports "
                             f"without MTP; pass one of the two")
        config_overrides["mtp_depth"] = 0
    cfg = from_hf_config(read_hf_config(path), **config_overrides)
    weights, missing, ignored = split_mtp(read_hf_weights(path), cfg.mtp_depth)
    if ignored:
        print(f"dsv4.load_hf: note: {path}: ignoring the weights of MTP block(s) "
              f"{', '.join(f'mtp.{i}' for i in ignored)} (importing with mtp_depth={cfg.mtp_depth})", file=sys.stderr)
    if missing:
        print(f"dsv4.load_hf: note: {path} has no weights for MTP block(s) "
              f"{', '.join(f'mtp.{i}' for i in missing)} of the {cfg.mtp_depth} its config.json counts "
              f"(transformers' save_pretrained writes none: it does not implement MTP); they are freshly "
              f"initialised (seed {seed}). Pass mtp='drop' (dsv4-export: --mtp drop) to import without MTP.",
              file=sys.stderr)
    model = build_model(cfg, groups=groups, dtype=dtype, seed=seed)
    load_hf_into(model, weights, keep_mtp=missing)
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
