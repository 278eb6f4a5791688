"""Hydra structured-config schema: the typed top-level config and `compose_config`, the one way to build it.

`DSV4Config` is the root; each group (today only `model`) is a dataclass registered in Hydra's ConfigStore, and the
YAML presets in this folder (`config.yaml`, `model/{debug,flash,pro}.yaml`) hold only values and name their schema
in their defaults list. Struct mode makes a misspelt key or a wrongly typed value fail at composition; the error is
re-raised as a `ConfigError` naming the key and the fix. `ModelConfig.validate` then rejects impossible combinations.

Adding a group (data, optim, run, ...): a dataclass with a documented field per knob, a field of that type on
`DSV4Config`, a `_GROUPS` entry, and `conf/<group>/*.yaml` presets starting with `defaults: [<group>_schema, _self_]`.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from dataclasses import dataclass, field, is_dataclass
from typing import Any, Sequence, get_args, get_type_hints

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException, MissingConfigException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from dsv4.model.config import ConfigError, ModelConfig
from dsv4.parallel.launch import launch_world_size

from .groups import AUTO_WARMUP_STEPS, ClusterConfig, DataConfig, OptimConfig, ParallelConfig, PrecisionConfig, RunConfig

log = logging.getLogger(__name__)

CONF_DIR = os.path.dirname(os.path.abspath(__file__))
"""The folder holding config.yaml and the group presets (shipped as package data of dsv4.conf)."""


@dataclass
class DSV4Config:
    """Root of the composed config: one field per group."""

    model: ModelConfig = MISSING
    """Architecture; chosen with `model=<preset>` (conf/model/*.yaml)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout (conf/parallel/*.yaml)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule (conf/optim/*.yaml)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets, tokenizer, sequence length and batch sizes (conf/data/*.yaml)."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Numeric formats (conf/precision/*.yaml)."""
    run: RunConfig = field(default_factory=RunConfig)
    """Output folder, length, intervals, seed (conf/run/*.yaml)."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Where the job runs (conf/cluster/*.yaml)."""

    def validate(self, world_size: int | None = None) -> "DSV4Config":
        """Every group's checks, then the ones across groups; `world_size` defaults to the launcher's
        (RANK/WORLD_SIZE, an srun step's task count) or 1.

        The layout: tp*pp ranks hold one model replica, dp = world / (tp*pp) replicas; the routed experts use the
        grid etp*ep*pp over the same world (see ParallelConfig)."""
        for group in (self.parallel, self.optim, self.data, self.precision, self.run, self.cluster):
            group.validate()
        self.model.validate(seq_length=self.data.seq_length)
        par, model, data = self.parallel, self.model, self.data
        tp, pp, vpp, ep, etp = par.tp, par.pp, par.vpp, par.ep, par.etp
        # What the model's sizes allow, whatever the world.
        for key in ("num_heads", "o_groups", "index_n_heads", "vocab_size"):
            if getattr(model, key) % tp:
                raise ConfigError(f"model.{key}: {getattr(model, key)} is not divisible by "
                                  f"parallel.tp={tp}; pick a tensor-parallel size that divides it")
        shared = model.n_shared_experts * model.moe_intermediate_size
        if shared % tp:
            raise ConfigError(f"model.n_shared_experts: the shared experts' {model.n_shared_experts} x "
                              f"model.moe_intermediate_size={model.moe_intermediate_size} = {shared} hidden units are "
                              f"split over parallel.tp={tp} ranks and are not divisible by it; pick a "
                              f"tensor-parallel size that divides {shared}")
        if model.moe_intermediate_size % etp:
            raise ConfigError(f"model.moe_intermediate_size: {model.moe_intermediate_size} is not divisible by "
                              f"parallel.etp={etp}; pick an expert-tensor-parallel size that divides it")
        if model.n_routed_experts % ep:
            raise ConfigError(f"model.n_routed_experts: {model.n_routed_experts} experts cannot be spread over "
                              f"parallel.ep={ep} ranks; pick an expert-parallel size that divides it")
        # The rank grids over the world.
        world = world_size if world_size is not None else launch_world_size()
        if world < 1:
            raise ConfigError(f"parallel.tp: cannot lay out {world} ranks; the world size "
                              f"(world_size or the launcher's WORLD_SIZE) must be >= 1")
        if world % (tp * pp):
            key = "parallel.tp" if world % tp else "parallel.pp"  # tp when it alone does not divide the world
            raise ConfigError(f"{key}: tp*pp = {tp}*{pp} = {tp * pp} ranks per model replica do not divide the "
                              f"{world} ranks; launch a multiple of {tp * pp} ranks or change {key}")
        dp = world // (tp * pp)
        if par.dp and par.dp != dp:
            raise ConfigError(f"parallel.dp: {par.dp} does not match the {world} ranks, which give world / (tp*pp) "
                              f"= {world}/({tp}*{pp}) = {dp} data-parallel ranks; set parallel.dp={dp} or 0 "
                              f"(derived)")
        grid = etp * ep * pp
        if world % grid:
            key = "parallel.etp" if world % (etp * pp) else "parallel.ep"  # etp when etp*pp alone does not divide
            raise ConfigError(f"{key}: the expert grid etp*ep*pp = {etp}*{ep}*{pp} = {grid} does not divide the "
                              f"{world} ranks; launch a multiple of {grid} ranks or change {key} (the key named is "
                              f"parallel.etp when etp*pp alone does not divide the ranks, else parallel.ep)")
        if tp > 1 and ep > 1 and not par.sp:
            raise ConfigError(f"parallel.sp: expert parallelism (ep={ep}) together with tensor parallelism (tp={tp}) "
                              f"needs sequence parallelism (megatron requires it); set parallel.sp=true")
        if tp > 1 and par.sp and data.seq_length % tp:
            raise ConfigError(f"data.seq_length: {data.seq_length} tokens cannot be split over parallel.tp={tp} "
                              f"ranks by sequence parallelism; use a multiple of {tp} or set parallel.sp=false")
        # The pipeline's stages.
        stages = pp * vpp
        if stages > model.num_layers:
            key = "parallel.vpp" if vpp > 1 else "parallel.pp"
            raise ConfigError(f"{key}: pp*vpp = {pp}*{vpp} = {stages} virtual pipeline stages exceed the "
                              f"model.num_layers={model.num_layers} layers, and every stage needs one; lower {key}")
        if par.pp_layers and sum(par.pp_layers) != model.num_layers:
            raise ConfigError(f"parallel.pp_layers: {par.pp_layers} holds {sum(par.pp_layers)} layers, not "
                              f"model.num_layers={model.num_layers}; give layer counts summing to "
                              f"{model.num_layers} or [] for an even split")
        # Batches.
        per_step = data.micro_batch_size * dp
        if not data.global_batch_size:  # unset: one micro-batch per data-parallel rank, on any number of ranks
            data.global_batch_size = per_step
            if dp > 1:
                log.info("data.global_batch_size: unset, so micro_batch_size x data-parallel ranks = %d x %d = %d "
                         "sequences per step; state it to keep one batch across layouts", data.micro_batch_size, dp,
                         per_step)
        if data.global_batch_size % per_step:
            raise ConfigError(f"data.global_batch_size: {data.global_batch_size} is not a multiple of "
                              f"data.micro_batch_size={data.micro_batch_size} x {dp} data-parallel "
                              f"ranks = {per_step}; use a multiple of {per_step}")
        micro_batches = data.global_batch_size // per_step
        if vpp > 1 and micro_batches % pp:
            raise ConfigError(f"data.global_batch_size: {data.global_batch_size} gives {micro_batches} micro-batches "
                              f"per step (global / (data.micro_batch_size={data.micro_batch_size} x {dp} "
                              f"data-parallel ranks)), not a multiple of parallel.pp={pp} as megatron's interleaved "
                              f"schedule (parallel.vpp={vpp}) requires; use a multiple of {per_step * pp}")
        # Validation: run.eval_iters micro-batches for the whole job, each rank ceil(eval_iters / dp) (data.valid).
        eval_per_rank = -(-self.run.eval_iters // dp)
        if vpp > 1 and eval_per_rank % pp:
            raise ConfigError(f"run.eval_iters: {self.run.eval_iters} validation micro-batches give {eval_per_rank} "
                              f"per data-parallel rank ({dp} ranks), which cannot run through the interleaved "
                              f"schedule of parallel.pp={pp}; use a multiple of {dp * pp}")
        if self.optim.warmup_steps is None:  # unset: AUTO_WARMUP_STEPS, at most a tenth of a short run
            self.optim.warmup_steps = min(AUTO_WARMUP_STEPS, self.run.steps // 10)
            if self.optim.warmup_steps < AUTO_WARMUP_STEPS:
                log.info("optim.warmup_steps: unset, so %d warm-up steps (a tenth of run.steps=%d; %d from %d steps "
                         "on)", self.optim.warmup_steps, self.run.steps, AUTO_WARMUP_STEPS, 10 * AUTO_WARMUP_STEPS)
        if self.optim.warmup_steps >= self.run.steps and self.optim.schedule != "constant":
            raise ConfigError(f"optim.warmup_steps: {self.optim.warmup_steps} warm-up steps leave no decay in "
                              f"run.steps={self.run.steps}; lower it or run longer")
        return self


_GROUPS = {"model": ModelConfig, "parallel": ParallelConfig, "optim": OptimConfig, "data": DataConfig,
           "precision": PrecisionConfig, "run": RunConfig, "cluster": ClusterConfig}
"""Config group -> its schema dataclass, registered as `<group>/<group>_schema`."""


def slurm_minutes(time: str) -> int:
    """SLURM's [days-]hours:minutes:seconds as whole minutes (rounded up)."""
    days, _, hms = str(time).rpartition("-")
    h, m, sec = (int(x) for x in hms.split(":"))
    return (int(days or 0) * 24 + h) * 60 + m + (1 if sec else 0)


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore (safe to call more than once: a store overwrites by name)."""
    cs = ConfigStore.instance()
    cs.store(name="dsv4_schema", node=DSV4Config)
    # For conf/hydra/launcher/dsv4_slurm.yaml: the cluster group's values in the form submitit takes.
    OmegaConf.register_new_resolver("dsv4.ranks_per_node", lambda gpus, tasks: int(gpus) or int(tasks), replace=True)
    OmegaConf.register_new_resolver("dsv4.minutes", slurm_minutes, replace=True)
    OmegaConf.register_new_resolver("dsv4.unset_if_empty", lambda value: value if value not in ("", None) else None,
                                    replace=True)
    for group, schema in _GROUPS.items():
        cs.store(group=group, name=f"{group}_schema", node=schema)


register_configs()


def compose_config(model: str = "debug", overrides: Sequence[str] = (), world_size: int | None = None) -> DSV4Config:
    """Compose conf/config.yaml with the `model` preset and command-line style `overrides`, type-check and validate.

    Example: `compose_config("flash", ["model.num_layers=4", "data.seq_length=4096"])`. The layout checks use
    `world_size` ranks (default: $WORLD_SIZE, else 1).
    """
    return to_config(compose_raw(model, overrides), world_size)


def compose_raw(model: str = "debug", overrides: Sequence[str] = ()) -> DictConfig:
    """The composed DictConfig, before type and layout checks (ConfigError for unknown presets and keys)."""
    return compose_overrides([f"model={model}", *overrides], model)


def compose_overrides(overrides: Sequence[str], model: str = "debug") -> DictConfig:
    """conf/config.yaml composed with command-line `overrides` as given (`model=...` among them or not), before
    type and layout checks; ConfigError for unknown presets and keys. `dsv4-train` runs this before Hydra does."""
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            return compose("config", overrides=list(overrides))
    except MissingConfigException as e:
        raise ConfigError(_missing_preset_message(e, model)) from e
    except (HydraException, OmegaConfBaseException) as e:
        raise _as_config_error(e) from e


def to_config(cfg: DictConfig, world_size: int | None = None) -> DSV4Config:
    """A composed DictConfig (from `compose_config` or a `@hydra.main` app) -> a validated `DSV4Config`."""
    return to_object(cfg).validate(world_size)


def to_object(cfg: DictConfig) -> DSV4Config:
    """A composed DictConfig -> a type-checked `DSV4Config`, not yet validated (unset derived values stay unset)."""
    try:
        _reject_added_keys(cfg, DSV4Config, "")
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _as_config_error(e) from e


# --- turning Hydra/OmegaConf errors into messages that name the key and the fix -------------------------------------


def _reject_added_keys(node: DictConfig, schema: type, path: str) -> None:
    """Struct mode stops `key=value` on an unknown key, but `+key=value` force-adds it and `to_object` would then
    drop it silently; a misspelt `+model.hiden_size=128` must fail like the unprefixed one."""
    hints = get_type_hints(schema)
    for key, child in node.items_ex(resolve=False):
        full_key = f"{path}.{key}" if path else str(key)
        if key not in hints:
            raise ConfigError(_unknown_key_message(full_key))
        if isinstance(child, DictConfig) and not OmegaConf.is_missing(node, key) and is_dataclass(hints[key]):
            _reject_added_keys(child, hints[key], full_key)


def _as_config_error(exc: BaseException) -> ConfigError:
    err = _omegaconf_cause(exc)
    if err is None:
        return ConfigError(f"{_first_line(exc)}; run with `--cfg job` to print the composed config")
    key = err.full_key
    # Hydra names the preset file whose values failed to merge: "In 'model/debug': ...".
    source = re.match(r"In '([^']+)'", str(exc))
    in_file = f" (in conf/{source.group(1)}.yaml)" if source else ""
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        return ConfigError(_unknown_key_message(key) + in_file)
    field_type = _field_type(key)
    if re.search(r"\[\d+\]$", key) and get_args(field_type):  # a list entry: name the entry's type
        field_type = get_args(field_type)[0]
    fix = f"; give a value of type {_type_name(field_type)}" if field_type is not None else ""
    return ConfigError(f"{key}: {err.msg.splitlines()[0]}{fix}{in_file}")


def _omegaconf_cause(exc: BaseException | None) -> OmegaConfBaseException | None:
    """The outermost OmegaConf error in the cause/context chain that knows which key failed (`full_key`)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OmegaConfBaseException) and exc.full_key:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _unknown_key_message(full_key: str) -> str:
    parent, _, name = full_key.rpartition(".")
    schema = _field_type(parent) if parent else DSV4Config
    valid = list(get_type_hints(schema)) if is_dataclass(schema) else []
    # A spelling slip (hiden_size), or a name spelt out where the key abbreviates it (learning_rate -> lr).
    initials = "".join(word[0] for word in name.split("_") if word)
    close = difflib.get_close_matches(name, valid, n=1) or [v for v in valid if v == initials and len(v) > 1]
    did_you_mean = f"did you mean '{close[0]}'? " if close else ""
    # The schema lists every key; a group's presets may state only some (and only model has a debug.yaml).
    where = f"{_GROUPS[parent].__module__}.{_GROUPS[parent].__qualname__}" if parent in _GROUPS else "conf/config.yaml"
    return f"{full_key}: no such key; {did_you_mean}see `--cfg job` / {where} for valid keys"


def _field_type(full_key: str) -> Any:
    """The schema type of dotted `full_key` (list indices stripped), or None if the schema has no such field."""
    schema: Any = DSV4Config
    for part in re.sub(r"\[\d+\]", "", full_key).split("."):
        if not is_dataclass(schema):
            return None
        schema = get_type_hints(schema).get(part)
    return schema


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _missing_preset_message(exc: MissingConfigException, model: str) -> str:
    # Hydra: "In 'config': Could not find 'optim/sgd'" -- any group's preset, not only the model's.
    found = re.search(r"Could not find '([^'/]+)/([^']+)'", str(exc))
    group, name = found.groups() if found else ("model", model)
    if group not in _GROUPS:
        return f"{_first_line(exc)}; run with `--cfg job` to print the composed config"
    options = _presets(group)
    if found or f"'model/{model}'" in str(exc) or f"model={model}" in str(exc):
        return f"{group}={name}: no such preset; choose one of {options} (conf/{group}/*.yaml)"
    return f"{_first_line(exc)}; model presets: {options}"


def _presets(group: str) -> list[str]:
    return sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(CONF_DIR, group)) if f.endswith(".yaml"))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
