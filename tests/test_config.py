"""Config: the Hydra presets of every group compose and validate, overrides and typos behave, and every check in
`ModelConfig.validate`, in each group's `validate()` (conf/groups.py) and in `DSV4Config.validate` fires with a
message that starts with the offending key."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import shutil
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf

from dsv4.conf import schema
from dsv4.conf.groups import ClusterConfig, DataConfig, OptimConfig, ParallelConfig, PrecisionConfig, RunConfig
from dsv4.conf.schema import _GROUPS, CONF_DIR, DSV4Config, compose_config, register_configs
from dsv4.model.config import ConfigError, ModelConfig

GROUP_PRESETS = {"model": ["debug", "flash", "pro"], "parallel": ["ep2", "pp2", "single", "tp2"], "optim": ["adamw", "muon"],
                 "data": ["embedded"], "precision": ["auto", "bf16", "fp32", "fp8"], "run": ["default"], "cluster": ["local", "slurm"]}
"""Every preset shipped in conf/<group>/ (the test below checks this list against the folders)."""

LAYOUT_LAUNCH = {"tp2": (2, []), "pp2": (2, []), "ep2": (2, ["data.global_batch_size=8"])}
"""Parallel presets that need more than one rank: the world size and the overrides they compose with (ep2: 2
data-parallel ranks x micro-batch 4)."""

FULL_SIZE_OVERRIDES = {"flash": ["data.seq_length=4096"], "pro": ["data.seq_length=4096"]}
"""Flash/Pro keep index_topk=512/1024 entries, which need >= 2048/4096 tokens at csa_ratio 4."""


@pytest.fixture(autouse=True)
def _no_ambient_world_size(monkeypatch):
    """compose_config validates with $WORLD_SIZE; a test run under torchrun must not see its launcher's value."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.fixture(scope="module")
def base() -> DSV4Config:
    """The default composition (debug model, every group's default preset), composed once; copy before mutating."""
    return compose_config()


def kinds(cfg: ModelConfig) -> list[str]:
    """Attention kind of each block, MTP blocks last."""
    return [cfg.layer_kind(i) for i in range(cfg.num_layers + cfg.mtp_depth)]


def changed(cfg: DSV4Config, **values: Any) -> DSV4Config:
    """A deep copy of `cfg` with `group__key=value` fields set (no validation: that is what the tests call)."""
    cfg = copy.deepcopy(cfg)
    for dotted, value in values.items():
        group, key = dotted.split("__")
        node = getattr(cfg, group)
        assert key in {f.name for f in dataclasses.fields(node)}, f"{group}.{key} is not a field"
        setattr(node, key, value)
    return cfg


def assert_invalid(cfg: DSV4Config, key: str, match: str | None = None, world_size: int | None = 1) -> None:
    """`cfg.validate(world_size)` raises a ConfigError whose message starts with `key:` and matches `match`."""
    with pytest.raises(ConfigError, match=match) as e:
        cfg.validate(world_size=world_size)
    assert str(e.value).startswith(f"{key}:"), str(e.value)


# --- presets ----------------------------------------------------------------------------------------------------


def test_debug_is_the_default_and_has_every_component():
    cfg = compose_config()
    assert isinstance(cfg, DSV4Config) and isinstance(cfg.model, ModelConfig)
    m = cfg.model
    assert (m.hidden_size, m.num_layers, cfg.data.seq_length) == (64, 6, 256)
    assert kinds(m) == ["swa", "swa", "csa", "hca", "csa", "hca", "swa"]
    assert 0 < m.num_hash_layers < m.num_layers  # both hash- and score-routed MoE blocks
    assert m.mtp_depth == 1 and m.hc_mult > 1
    assert m.index_topk < 128 // m.csa_ratio  # the top-k selects even at 128 tokens
    compose_config(overrides=["data.seq_length=128"])  # the shortest sequence the preset is meant for


def test_flash_preset_is_the_released_config():
    m = compose_config("flash", ["data.seq_length=4096"]).model
    assert (m.num_layers, m.hidden_size, m.num_heads, m.head_dim, m.q_lora_rank) == (43, 4096, 64, 512, 1024)
    assert (m.o_groups, m.o_lora_rank, m.index_topk) == (8, 1024, 512)
    assert (m.n_routed_experts, m.n_activated_experts, m.moe_intermediate_size) == (256, 6, 2048)
    assert m.routed_scaling_factor == 1.5
    assert m.compress_ratios == [0, 0] + [4, 128] * 20 + [4] + [0]
    k = kinds(m)
    assert (k[:43].count("swa"), k[:43].count("csa"), k[:43].count("hca")) == (2, 21, 20)
    assert k[43] == "swa"  # the MTP block


def test_pro_preset_is_the_released_config():
    m = compose_config("pro", ["data.seq_length=4096"]).model
    assert (m.num_layers, m.hidden_size, m.num_heads, m.q_lora_rank, m.o_groups) == (61, 7168, 128, 1536, 16)
    assert (m.index_topk, m.n_routed_experts, m.moe_intermediate_size) == (1024, 384, 3072)
    assert m.routed_scaling_factor == 2.5
    assert m.compress_ratios == [128, 128] + [4, 128] * 29 + [4] + [0]
    k = kinds(m)
    assert (k[:61].count("swa"), k[:61].count("csa"), k[:61].count("hca")) == (0, 30, 31)
    assert k[61] == "swa"


def test_flash_preset_matches_the_schema_defaults():
    # ModelConfig's defaults are documented as V4-Flash's; the two must not drift apart.
    assert compose_config("flash", ["data.seq_length=4096"]).model == ModelConfig()


@pytest.mark.parametrize("preset", ["debug", "flash", "pro"])
def test_presets_state_values_only_and_name_their_schema(preset):
    with open(os.path.join(CONF_DIR, "model", f"{preset}.yaml")) as f:
        raw = yaml.safe_load(f)
    assert raw.pop("defaults") == ["model_schema", "_self_"]
    assert set(raw) <= set(ModelConfig.__dataclass_fields__)


def test_every_group_has_a_schema_a_field_and_its_presets():
    assert [f.name for f in dataclasses.fields(DSV4Config)] == list(_GROUPS)
    assert {f.name: f.type for f in dataclasses.fields(DSV4Config)} == {g: t.__name__ for g, t in _GROUPS.items()}
    for group, presets in GROUP_PRESETS.items():
        found = sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, group)) if f.endswith(".yaml"))
        assert found == presets, group
    with open(os.path.join(CONF_DIR, "config.yaml")) as f:
        defaults = yaml.safe_load(f)["defaults"]
    assert defaults[:2] == ["dsv4_schema", "_self_"]
    assert {g: p for d in defaults[2:] for g, p in d.items()} == {
        "model": "debug", "parallel": "single", "optim": "adamw", "data": "embedded", "precision": "auto",
        "run": "default", "cluster": "local"}


PRESET_FILES = [(g, p) for g, presets in GROUP_PRESETS.items() for p in presets]


@pytest.mark.parametrize("group, preset", PRESET_FILES)
def test_group_presets_state_values_only_and_name_their_schema(group, preset):
    with open(os.path.join(CONF_DIR, group, f"{preset}.yaml")) as f:
        raw = yaml.safe_load(f)
    assert raw.pop("defaults") == [f"{group}_schema", "_self_"]
    assert raw, "a preset with no values"
    unknown = set(raw) - {f.name for f in dataclasses.fields(_GROUPS[group])}
    assert not unknown, f"conf/{group}/{preset}.yaml states keys its schema lacks: {unknown}"


@pytest.mark.parametrize("group, preset", PRESET_FILES)
def test_every_preset_composes_and_the_config_holds_its_values(group, preset):
    if group == "model":
        cfg = compose_config(preset, FULL_SIZE_OVERRIDES.get(preset, []))
    elif group == "parallel" and preset in LAYOUT_LAUNCH:
        world, overrides = LAYOUT_LAUNCH[preset]
        cfg = compose_config(overrides=[f"{group}={preset}", *overrides], world_size=world)
    else:
        cfg = compose_config(overrides=[f"{group}={preset}"])
    assert isinstance(cfg, DSV4Config) and isinstance(getattr(cfg, group), _GROUPS[group])
    values = OmegaConf.to_container(OmegaConf.load(os.path.join(CONF_DIR, group, f"{preset}.yaml")), resolve=False)
    values.pop("defaults")
    node = getattr(cfg, group)
    for key, value in values.items():
        if isinstance(value, str) and "${" in value:  # an interpolation: resolved at composition
            assert "${" not in getattr(node, key), key
            continue
        assert getattr(node, key) == value, f"{group}.{key}"
        assert isinstance(getattr(node, key), type(_GROUPS[group].__dataclass_fields__[key].default)
                          if not isinstance(value, list) else list), f"{group}.{key}: not converted to its type"


def test_the_default_composition_holds_each_groups_default_preset(base):
    assert base.parallel == ParallelConfig(tp=1)
    assert (base.optim.name, base.optim.lr, base.optim.min_lr, base.optim.schedule, base.optim.warmup_steps) == (
        "adamw", 3e-3, 3e-4, "cosine", 20)
    assert (base.data.prefixes, base.data.seq_length, base.data.micro_batch_size, base.data.global_batch_size,
            base.data.split) == ([], 256, 4, 4, "98,2,0")
    assert base.precision == PrecisionConfig(params_dtype="auto")  # bf16 on a GPU, fp32 on CPU (test_fp8.py)
    assert (base.run.steps, base.run.seed, base.run.on_nan, base.run.progress_bar) == (300, 1234, "skip", True)
    assert base.run.output_dir.startswith("runs/") and "${" not in base.run.output_dir
    assert base.cluster == ClusterConfig(kind="local")
    assert all(isinstance(getattr(base, g), t) for g, t in _GROUPS.items())


def test_precision_preset_selects_bf16():
    assert compose_config(overrides=["precision=bf16"]).precision.params_dtype == "bfloat16"
    assert compose_config(overrides=["precision=fp32"]).precision.params_dtype == "float32"


def test_register_configs_is_idempotent():
    register_configs()
    register_configs()
    assert compose_config().model.hidden_size == 64


# --- overrides, typos, wrong types ------------------------------------------------------------------------------


def test_command_line_overrides():
    cfg = compose_config("debug", ["model.hidden_size=128", "model.compress_ratios=[0,4,16,4,16,0,0]",
                                   "data.seq_length=512"])
    assert cfg.model.hidden_size == 128 and cfg.data.seq_length == 512
    assert cfg.model.compress_ratios == [0, 4, 16, 4, 16, 0, 0]


@pytest.mark.parametrize("overrides, expected", [
    (["optim.lr=1e-3", "optim.min_lr=1e-4", "optim.schedule=wsd", "optim.decay_fraction=0.5", "optim.beta2=0.99"],
     {"optim": OptimConfig(lr=1e-3, min_lr=1e-4, schedule="wsd", warmup_steps=20, decay_fraction=0.5, beta2=0.99)}),
    (["optim.lr=1"], {"optim.lr": 1.0}),  # an int on the command line becomes the float field's value
    (["run.steps=5", "optim.warmup_steps=2", "run.seed=7", "run.on_nan=stop", "run.progress_bar=false",
      "run.output_dir=/tmp/dsv4-run", "run.eval_interval=0"],
     {"run.steps": 5, "optim.warmup_steps": 2, "run.seed": 7, "run.on_nan": "stop", "run.progress_bar": False,
      "run.output_dir": "/tmp/dsv4-run", "run.eval_interval": 0}),
    (["data.micro_batch_size=2", "data.global_batch_size=8", "data.seq_length=128"],
     {"data.micro_batch_size": 2, "data.global_batch_size": 8, "data.seq_length": 128}),
    (["data.prefixes=[/d/web,/d/code]", "data.weights=[0.7,0.3]", "data.tokenizer=/d/tokenizer.json",
      "data.cache_dir=/tmp/cache"],
     {"data.prefixes": ["/d/web", "/d/code"], "data.weights": [0.7, 0.3], "data.tokenizer": "/d/tokenizer.json",
      "data.cache_dir": "/tmp/cache"}),
    (["data.split='90,10,0'"], {"data.split": "90,10,0"}),  # quoted: an unquoted a,b,c is a Hydra sweep
    (["precision=bf16"], {"precision.params_dtype": "bfloat16"}),
    (["precision.params_dtype=bfloat16"], {"precision.params_dtype": "bfloat16"}),
    (["parallel=single", "parallel.tp=1"], {"parallel.tp": 1}),
    (["cluster=local", "cluster.kind=local"], {"cluster.kind": "local"}),
])
def test_command_line_overrides_of_each_group(overrides, expected):
    cfg = compose_config(overrides=overrides)
    for where, value in expected.items():
        group, _, key = where.partition(".")
        got = getattr(getattr(cfg, group), key) if key else getattr(cfg, group)
        assert got == value and type(got) is type(value), where


def test_tensor_parallel_override_uses_the_world_size_from_the_environment(monkeypatch):
    with pytest.raises(ConfigError, match=r"parallel.tp: tp\*pp = 2\*1 = 2 ranks per model replica do not divide the 1 "
                                          r"ranks; launch a multiple of 2 ranks"):
        compose_config(overrides=["parallel.tp=2"])  # no $WORLD_SIZE: one rank
    monkeypatch.setenv("WORLD_SIZE", "4")  # tp 2 x dp 2: 4 x 2 sequences per micro-step
    cfg = compose_config(overrides=["parallel.tp=2", "data.global_batch_size=8"])
    assert cfg.parallel.tp == 2
    with pytest.raises(ConfigError, match=r"data.global_batch_size: 4 is not a multiple .* = 8"):
        compose_config(overrides=["parallel.tp=2", "data.global_batch_size=4"])
    assert compose_config(overrides=["parallel.tp=2"]).data.global_batch_size == 8  # unset: 4 x dp 2


@pytest.mark.parametrize("override, key", [
    ("parallel.tp=0", "parallel.tp"),
    ("optim.lr=0", "optim.lr"),
    ("data.micro_batch_size=0", "data.micro_batch_size"),
    ("precision.params_dtype=float16", "precision.params_dtype"),
    ("run.steps=0", "run.steps"),
    ("cluster.kind=pbs", "cluster.kind"),
    ("optim.warmup_steps=300", "optim.warmup_steps"),  # a cross-group check
])
def test_compose_config_runs_every_groups_validation(override, key):
    with pytest.raises(ConfigError) as e:
        compose_config(overrides=[override])
    assert str(e.value).startswith(f"{key}:"), str(e.value)


def test_flash_at_its_first_stage_length_with_a_shrunk_depth():
    m = compose_config("flash", ["model.num_layers=3", "model.compress_ratios=[0,4,128,0]",
                                 "data.seq_length=4096"]).model
    assert kinds(m) == ["swa", "csa", "hca", "swa"]


@pytest.mark.parametrize("override, key, hint", [
    ("model.hiden_size=128", "model.hiden_size", "hidden_size"),
    ("+model.hiden_size=128", "model.hiden_size", "hidden_size"),  # force-added keys must not be dropped silently
    ("model.not_a_field=1", "model.not_a_field", "no such key"),
    ("data.seq_len=512", "data.seq_len", "seq_length"),
    ("seq_length=512", "seq_length", "no such key"),  # the old top-level key: now data.seq_length
    ("+seq_length=512", "seq_length", "no such key"),
    ("parallel.ttp=2", "parallel.ttp", "tp"),
    ("optim.lrr=1e-3", "optim.lrr", "'lr'"),
    ("+optim.lrr=1e-3", "optim.lrr", "'lr'"),
    ("optim.warmup=10", "optim.warmup", "warmup_steps"),
    ("data.micro_batch=2", "data.micro_batch", "micro_batch_size"),
    ("+data.weight=[1]", "data.weight", "weights"),
    ("precision.param_dtype=bfloat16", "precision.param_dtype", "params_dtype"),
    ("run.step=5", "run.step", "steps"),
    ("+run.step=5", "run.step", "steps"),
    ("cluster.knd=local", "cluster.knd", "kind"),
    ("optimizer.lr=1e-3", "optimizer", "'optim'"),
])
def test_unknown_key_fails_naming_it(override, key, hint):
    with pytest.raises(ConfigError, match="no such key") as e:
        compose_config(overrides=[override])
    assert str(e.value).startswith(f"{key}:") and hint in str(e.value), str(e.value)


@pytest.mark.parametrize("override, group", [("optim.lrr=1", "optim"), ("model.hiden_size=1", "model")])
def test_unknown_key_points_at_the_schema_listing_the_keys(override, group):
    with pytest.raises(ConfigError) as e:
        compose_config(overrides=[override])
    schema_cls = _GROUPS[group]
    assert f"{schema_cls.__module__}.{schema_cls.__qualname__}" in str(e.value)


@pytest.mark.parametrize("override, key, expected", [
    ("model.num_layers=abc", "model.num_layers", "int"),
    ("model.yarn_factor=fast", "model.yarn_factor", "float"),
    ("model.quant_sim=maybe", "model.quant_sim", "bool"),
    ("model.compress_ratios=[0,0,4,x,4,16,0]", "model.compress_ratios[3]", "int"),
    ("data.seq_length=1.5", "data.seq_length", "int"),
    ("parallel.tp=two", "parallel.tp", "int"),
    ("parallel.sp=maybe", "parallel.sp", "bool"),
    ("parallel.pp_layers=[3,x]", "parallel.pp_layers[1]", "int"),
    ("parallel.pp_layers=3", "parallel.pp_layers", "List[int]"),
    ("optim.lr=fast", "optim.lr", "float"),
    ("optim.warmup_steps=1.5", "optim.warmup_steps", "Optional[int]"),
    ("data.micro_batch_size=many", "data.micro_batch_size", "int"),
    ("data.weights=[1,x]", "data.weights[1]", "float"),
    ("data.prefixes=/d/web", "data.prefixes", "List[str]"),
    ("data.tokenizer=[a,b]", "data.tokenizer", "Optional[str]"),
    ("precision.params_dtype=[bf16]", "precision.params_dtype", "str"),
    ("run.steps=abc", "run.steps", "int"),
    ("run.progress_bar=maybe", "run.progress_bar", "bool"),
    ("cluster.kind=[local]", "cluster.kind", "str"),
])
def test_wrong_type_fails_naming_the_key(override, key, expected):
    with pytest.raises(ConfigError) as e:
        compose_config(overrides=[override])
    assert str(e.value).startswith(f"{key}:") and f"type {expected}" in str(e.value), str(e.value)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match=r"model=flsh: no such preset.*'debug', 'flash', 'pro'"):
        compose_config("flsh")


@pytest.mark.parametrize("override, listing", [("precision=fp16", "'bf16', 'fp32'"), ("optim=sgd", "'adamw'")])
def test_unknown_group_preset_lists_that_groups_presets(override, listing):
    group, name = override.split("=")
    with pytest.raises(ConfigError) as e:
        compose_config(overrides=[override])
    assert str(e.value).startswith(f"{group}={name}: no such preset") and listing in str(e.value), str(e.value)
    assert f"conf/{group}/*.yaml" in str(e.value)


def test_a_preset_with_a_misspelt_key_fails_naming_the_key_and_the_file(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    with open(conf / "optim" / "adamw.yaml", "a") as f:
        f.write("\nwarmup: 5\n")
    monkeypatch.setattr(schema, "CONF_DIR", str(conf))
    with pytest.raises(ConfigError) as e:
        compose_config()
    msg = str(e.value)
    assert msg.startswith("optim.warmup: no such key") and "warmup_steps" in msg and "conf/optim/adamw.yaml" in msg, msg


# --- one test per check in ModelConfig.validate (on the debug preset, seq_length 256) ----------------------------

POSITIVE = ["vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "q_lora_rank", "o_groups",
            "o_lora_rank", "sliding_window", "csa_ratio", "hca_ratio", "index_n_heads", "index_head_dim",
            "index_topk", "n_routed_experts", "n_activated_experts", "moe_intermediate_size", "hc_mult",
            "hc_sinkhorn_iters"]
NON_NEGATIVE = ["num_hash_layers", "mtp_depth", "n_shared_experts", "dense_attention_steps", "indexer_warmup_steps"]


def assert_rejected(overrides: list[str], key: str, match: str = "") -> None:
    with pytest.raises(ConfigError, match=match) as e:
        compose_config("debug", overrides)
    assert str(e.value).startswith(f"model.{key}:"), str(e.value)


@pytest.mark.parametrize("key", POSITIVE)
@pytest.mark.parametrize("value", [0, -1])
def test_sizes_must_be_positive(key, value):
    assert_rejected([f"model.{key}={value}"], key, "must be > 0")


@pytest.mark.parametrize("key", NON_NEGATIVE)
def test_counts_must_be_non_negative(key):
    assert_rejected([f"model.{key}=-1"], key, "must be >= 0")


@pytest.mark.parametrize("value", [7, 0, 64])  # odd, zero, larger than head_dim=32
def test_rope_head_dim_even_and_within_head_dim(value):
    assert_rejected([f"model.rope_head_dim={value}"], "rope_head_dim", "even")


def test_heads_divisible_by_o_groups():
    assert_rejected(["model.o_groups=3"], "o_groups", "divisible")


def test_csa_and_hca_ratio_differ():
    assert_rejected(["model.hca_ratio=4"], "hca_ratio", "must differ from csa_ratio")


def test_index_head_dim_power_of_two_only_where_the_hadamard_rotation_runs(groups):
    """The rotation belongs to the FP4 simulation (model.quant_sim): a power of two is required with it on (the
    message names the key and both fixes); with it off any width builds and runs."""
    import torch

    from dsv4.model.transformer import DSV4Model

    assert_rejected(["model.quant_sim=true", "model.index_head_dim=24"], "index_head_dim",
                    "power of two for the Hadamard rotation.*set model.quant_sim=false")
    cfg = compose_config("debug", ["model.quant_sim=false", "model.index_head_dim=24"]).model
    model = DSV4Model(cfg, groups.tp, seed=0)
    assert model.layers[2].attn.indexer.wq_b.linear.weight.shape[0] == cfg.index_n_heads * 24
    ids = torch.randint(0, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=torch.roll(ids, -1, 1))
    assert torch.isfinite(out.loss) and out.indexer_loss is not None


def test_index_head_dim_covers_rope_head_dim():
    assert_rejected(["model.index_head_dim=4"], "index_head_dim", "rope_head_dim")


def test_top_k_experts_within_experts():
    assert_rejected(["model.n_activated_experts=9"], "n_activated_experts", "exceeds n_routed_experts")


@pytest.mark.parametrize("overrides", [
    ["model.compress_ratios=[0,0,4,16,4,16]"],  # the MTP entry forgotten
    ["model.mtp_depth=2"],
    ["model.num_layers=5"],
])
def test_schedule_has_one_entry_per_block_and_mtp_block(overrides):
    assert_rejected(overrides, "compress_ratios", "num_layers \\+ mtp_depth")


def test_schedule_entries_are_swa_csa_or_hca():
    assert_rejected(["model.compress_ratios=[0,0,4,16,4,8,0]"], "compress_ratios", r"entries \[8\]")


def test_hash_layers_within_layers():
    assert_rejected(["model.num_hash_layers=7"], "num_hash_layers", "only num_layers=6")


def test_yarn_factor_at_least_one():
    assert_rejected(["model.yarn_factor=0.5"], "yarn_factor", ">= 1")


def test_mtp_loss_weight_non_negative():
    assert_rejected(["model.mtp_loss_weight=-0.1"], "mtp_loss_weight", ">= 0")


def test_swiglu_limit_non_negative():
    assert_rejected(["model.swiglu_limit=-1"], "swiglu_limit", ">= 0")


def test_fp8_block_divides_the_non_rope_dims_when_simulating():
    assert_rejected(["model.quant_sim=true", "model.quant_fp8_block=16"], "quant_fp8_block", "must divide the 24")
    compose_config("debug", ["model.quant_sim=false", "model.quant_fp8_block=16"])  # unused when off


def test_fp4_block_divides_the_indexer_head_when_simulating():
    assert_rejected(["model.quant_sim=true", "model.quant_fp4_block=32"], "quant_fp4_block", "index_head_dim=16")


# --- checks that depend on the sequence length --------------------------------------------------------------------


def test_sequence_within_max_position_embeddings():
    assert_rejected(["data.seq_length=8192"], "max_position_embeddings", "sequence length 8192")


def test_window_within_sequence():
    assert_rejected(["model.sliding_window=512"], "sliding_window", "longer than the sequence")


def test_index_topk_within_compressed_entries():
    compose_config(overrides=["model.index_topk=64"])  # 256 // 4 = 64 entries: the boundary is allowed
    assert_rejected(["model.index_topk=65"], "index_topk", "64 compressed entries")


def test_index_topk_ignored_without_csa_layers():
    compose_config(overrides=["model.index_topk=1000", "model.compress_ratios=[0,0,16,16,16,16,0]"])


def test_hca_ratio_within_sequence():
    assert_rejected(["model.hca_ratio=512", "model.compress_ratios=[0,0,4,512,4,512,0]"], "hca_ratio",
                    "longer than the sequence")


def test_validate_without_seq_length_skips_sequence_checks():
    relaxed = compose_config().model.replace(sliding_window=10_000, index_topk=10_000)  # replace(): no sequence
    with pytest.raises(ConfigError, match="model.sliding_window"):
        relaxed.validate(seq_length=256)


# --- attention phases ---------------------------------------------------------------------------------------------


def test_attention_phase_boundaries():
    m = compose_config(overrides=["model.dense_attention_steps=10", "model.indexer_warmup_steps=5"]).model
    assert [m.attention_phase(s) for s in (0, 9, 10, 14, 15, 10_000)] == [
        "dense", "dense", "indexer_warmup", "indexer_warmup", "sparse", "sparse"]


def test_attention_phase_sparse_from_the_start_by_default():
    m = compose_config().model
    assert m.attention_phase(0) == "sparse"


def test_attention_phase_warmup_without_dense_phase():
    m = compose_config(overrides=["model.indexer_warmup_steps=3"]).model
    assert [m.attention_phase(s) for s in (0, 2, 3)] == ["indexer_warmup", "indexer_warmup", "sparse"]


# --- Flash and Pro at their sequence lengths ---------------------------------------------------------------------


@pytest.mark.parametrize("preset, topk", [("flash", 512), ("pro", 1024)])
def test_full_size_presets_validate_at_4096_and_reject_256(preset, topk):
    cfg = compose_config(preset, ["data.seq_length=4096"])
    assert cfg.data.seq_length == 4096 and cfg.model.index_topk == topk
    with pytest.raises(ConfigError, match=f"top-k={topk} exceeds the 64 compressed entries") as e:
        compose_config(preset)  # data/embedded.yaml's 256 tokens
    assert str(e.value).startswith("model.index_topk:"), str(e.value)


@pytest.mark.parametrize("preset, shortest", [("flash", 2048), ("pro", 4096)])
def test_full_size_presets_need_index_topk_times_csa_ratio_tokens(preset, shortest):
    cfg = compose_config(preset, ["data.seq_length=4096"])
    changed(cfg, data__seq_length=shortest).validate()
    assert_invalid(changed(cfg, data__seq_length=shortest - cfg.model.csa_ratio), "model.index_topk",
                   f"{shortest // cfg.model.csa_ratio - 1} compressed entries")


# --- one test per check in the groups' validate() (conf/groups.py), on the default composition ---------------------


def test_the_default_composition_is_valid(base):
    assert copy.deepcopy(base).validate(world_size=1) is not None
    for group in ("parallel", "optim", "data", "precision", "run", "cluster"):
        getattr(base, group).validate()  # returns None, raises nothing
    for schema_cls in (ParallelConfig, OptimConfig, DataConfig, PrecisionConfig, RunConfig, ClusterConfig):
        schema_cls().validate()  # the schema defaults are valid on their own


# parallel


@pytest.mark.parametrize("value", [0, -2])
def test_parallel_tensor_parallel_at_least_one(base, value):
    assert_invalid(changed(base, parallel__tp=value), "parallel.tp", "must be >= 1")


@pytest.mark.parametrize("key", ["pp", "vpp", "ep", "etp"])
@pytest.mark.parametrize("value", [0, -2])
def test_parallel_sizes_at_least_one(base, key, value):
    assert_invalid(changed(base, **{f"parallel__{key}": value}), f"parallel.{key}", f"must be >= 1, got {value}")


def test_parallel_dp_non_negative_and_zero_derives_it(base):
    assert_invalid(changed(base, parallel__dp=-1), "parallel.dp", r"must be >= 0 \(0: derived from the world size\)")
    changed(base, parallel__dp=0).validate(world_size=1)


@pytest.mark.parametrize("vpp", [2, 4])
def test_parallel_vpp_needs_pipeline_stages(base, vpp):
    assert_invalid(changed(base, parallel__vpp=vpp), "parallel.vpp",
                   f"{vpp} virtual stages with parallel.pp=1: interleaving needs pipeline stages; set parallel.pp>=3 "
                   f"or vpp=1")


@pytest.mark.parametrize("layers", [[6, 0], [7, -1]])
def test_parallel_pp_layers_at_least_one_each(base, layers):
    assert_invalid(changed(base, parallel__pp=2, parallel__pp_layers=layers), "parallel.pp_layers",
                   r"must all be >= 1 \(every virtual stage holds a layer\)", world_size=2)


@pytest.mark.parametrize("pp, vpp, layers, stages", [(2, 1, [6], 2), (2, 1, [2, 2, 2], 2), (3, 2, [2, 2, 2], 6),
                                                     (1, 1, [3, 3], 1)])
def test_parallel_pp_layers_one_entry_per_virtual_stage(base, pp, vpp, layers, stages):
    assert_invalid(changed(base, parallel__pp=pp, parallel__vpp=vpp, parallel__pp_layers=layers),
                   "parallel.pp_layers", rf"{len(layers)} entries for pp\*vpp = {pp}\*{vpp} = {stages} virtual "
                   rf"stages; give one per stage or \[\] for an even split", world_size=pp)


def test_parallel_single_preset_states_every_field_at_its_default():
    with open(os.path.join(CONF_DIR, "parallel", "single.yaml")) as f:
        raw = yaml.safe_load(f)
    raw.pop("defaults")
    assert raw == dataclasses.asdict(ParallelConfig())
    assert list(raw) == [f.name for f in dataclasses.fields(ParallelConfig)]  # in the schema's order


# optim


@pytest.mark.parametrize("value", ["sgd", "AdamW", "Muon"])
def test_optim_name_is_a_known_optimizer(base, value):
    assert_invalid(changed(base, optim__name=value), "optim.name", f"'{value}': choose adamw or muon")


def test_optim_muon_preset_is_v4s_muon():
    o = compose_config(overrides=["optim=muon"]).optim
    assert (o.name, o.muon_momentum, o.muon_nesterov, o.muon_ns, o.muon_rms_scale, o.muon_ns_dtype) == (
        "muon", 0.95, True, "v4_hybrid", 0.18, "bfloat16")


@pytest.mark.parametrize("key, value, message", [
    ("muon_momentum", 1.0, "must be in [0, 1), got 1.0"),
    ("muon_momentum", -0.1, "must be in [0, 1), got -0.1"),
    ("muon_ns", "quintic", "'quintic': choose v4_hybrid or moonlight"),
    ("muon_rms_scale", 0.0, "must be > 0, got 0.0"),
    ("muon_ns_dtype", "float16", "'float16': choose bfloat16 or float32"),
])
def test_optim_muon_values_are_checked(base, key, value, message):
    assert_invalid(changed(base, **{f"optim__{key}": value}), f"optim.{key}", re.escape(message))


@pytest.mark.parametrize("value", ["linear", "cos", ""])
def test_optim_schedule_is_a_known_schedule(base, value):
    assert_invalid(changed(base, optim__schedule=value), "optim.schedule", "choose cosine, wsd or constant")


@pytest.mark.parametrize("value", [0.0, -1e-3])
def test_optim_lr_positive(base, value):
    assert_invalid(changed(base, optim__lr=value), "optim.lr", "must be > 0")


@pytest.mark.parametrize("value", [-1e-5, 3.1e-3])  # below 0, above optim.lr=3e-3
def test_optim_min_lr_between_zero_and_lr(base, value):
    assert_invalid(changed(base, optim__min_lr=value), "optim.min_lr", r"must be in \[0, optim.lr=0.003\]")
    changed(base, optim__min_lr=0.0).validate(world_size=1)  # both ends allowed
    changed(base, optim__min_lr=3e-3).validate(world_size=1)


def test_optim_warmup_steps_non_negative(base):
    assert_invalid(changed(base, optim__warmup_steps=-1), "optim.warmup_steps", "must be >= 0")
    changed(base, optim__warmup_steps=0).validate(world_size=1)


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5])
def test_optim_decay_fraction_in_zero_one(base, value):
    assert_invalid(changed(base, optim__decay_fraction=value), "optim.decay_fraction", r"must be in \(0, 1\]")
    changed(base, optim__decay_fraction=1.0).validate(world_size=1)


def test_optim_weight_decay_non_negative(base):
    assert_invalid(changed(base, optim__weight_decay=-0.1), "optim.weight_decay", "must be >= 0")
    changed(base, optim__weight_decay=0.0).validate(world_size=1)


@pytest.mark.parametrize("value", [1.0, -0.1])
def test_optim_beta1_in_zero_one(base, value):
    assert_invalid(changed(base, optim__beta1=value), "optim.beta1", r"must be in \[0, 1\)")


@pytest.mark.parametrize("value", [1.0, 1.5, -0.5])
def test_optim_beta2_in_zero_one(base, value):
    assert_invalid(changed(base, optim__beta2=value), "optim.beta2", r"must be in \[0, 1\)")
    changed(base, optim__beta1=0.0, optim__beta2=0.0).validate(world_size=1)


@pytest.mark.parametrize("value", [0.0, -1e-8])
def test_optim_eps_positive(base, value):
    assert_invalid(changed(base, optim__eps=value), "optim.eps", "must be > 0")


def test_optim_grad_clip_non_negative_and_zero_disables(base):
    assert_invalid(changed(base, optim__grad_clip=-1.0), "optim.grad_clip", r"must be >= 0 \(0 disables")
    changed(base, optim__grad_clip=0.0).validate(world_size=1)


def test_optim_mtp_loss_weight_after_decay_non_negative(base):
    assert_invalid(changed(base, optim__mtp_loss_weight_after_decay=-0.1), "optim.mtp_loss_weight_after_decay",
                   "must be >= 0")
    changed(base, optim__mtp_loss_weight_after_decay=0.0).validate(world_size=1)


# data


@pytest.mark.parametrize("value", [0, -256])
def test_data_seq_length_positive(base, value):
    assert_invalid(changed(base, data__seq_length=value), "data.seq_length", "must be > 0")


@pytest.mark.parametrize("value", [0, -1])
def test_data_micro_batch_size_positive(base, value):
    assert_invalid(changed(base, data__micro_batch_size=value), "data.micro_batch_size", "must be > 0")


@pytest.mark.parametrize("value", [-1, -4])  # 0: derived (test_default_global_batch_is_one_micro_batch_per_...)
def test_data_global_batch_size_positive(base, value):
    assert_invalid(changed(base, data__global_batch_size=value), "data.global_batch_size", "must be > 0")


@pytest.mark.parametrize("prefixes, weights, counts", [
    (["/d/a", "/d/b"], [1.0], "1 weights for 2 prefixes"),
    (["/d/a"], [0.5, 0.5], "2 weights for 1 prefixes"),
    ([], [1.0], "1 weights for 0 prefixes"),
])
def test_data_one_weight_per_prefix(base, prefixes, weights, counts):
    assert_invalid(changed(base, data__prefixes=prefixes, data__weights=weights), "data.weights", counts)
    changed(base, data__prefixes=prefixes, data__weights=[]).validate(world_size=1)  # none: by size


@pytest.mark.parametrize("weights", [[1.0, 0.0], [2.0, -1.0]])
def test_data_weights_positive(base, weights):
    assert_invalid(changed(base, data__prefixes=["/d/a", "/d/b"], data__weights=weights), "data.weights",
                   "must all be > 0")
    changed(base, data__prefixes=["/d/a", "/d/b"], data__weights=[0.25, 3.0]).validate(world_size=1)


@pytest.mark.parametrize("split", ["98,2", "98,2,0,0", "98;2;0", "98 2 0", "a,b,c", "98,,0", "", "-1,2,0",
                                   "98,-2,0", "1.2.3,1,1", "98%,2%,0%"])
def test_data_split_is_three_non_negative_parts(base, split):
    assert_invalid(changed(base, data__split=split), "data.split", f"'{split}': give three non-negative parts")


@pytest.mark.parametrize("split", ["0,98,2", "0,0,0", "0.0,1,1"])
def test_data_split_needs_a_train_part(base, split):
    assert_invalid(changed(base, data__split=split), "data.split", "with train > 0")


@pytest.mark.parametrize("split", ["98,2,0", "100,0,0", "1,1,1", " 98, 2, 0", "99.5,0.5,0", "969,30,1"])
def test_data_split_accepted_formats(base, split):
    changed(base, data__split=split).validate(world_size=1)


# precision


@pytest.mark.parametrize("value", ["float16", "bf16", "fp32", "BFLOAT16", "float8"])
def test_precision_params_dtype_is_a_known_dtype(base, value):
    assert_invalid(changed(base, precision__params_dtype=value), "precision.params_dtype",
                   f"'{value}': choose auto, float32 or bfloat16")
    changed(base, precision__params_dtype="bfloat16").validate(world_size=1)


# run


@pytest.mark.parametrize("value", [0, -5])
def test_run_steps_positive(base, value):
    assert_invalid(changed(base, run__steps=value), "run.steps", "must be > 0")


def test_run_log_interval_positive(base):
    assert_invalid(changed(base, run__log_interval=0), "run.log_interval", "must be > 0")


def test_run_eval_interval_non_negative_and_zero_disables(base):
    assert_invalid(changed(base, run__eval_interval=-1), "run.eval_interval", r"must be >= 0 \(0 disables\)")
    changed(base, run__eval_interval=0).validate(world_size=1)


def test_run_eval_iters_positive(base):
    assert_invalid(changed(base, run__eval_iters=0), "run.eval_iters", "must be > 0")


@pytest.mark.parametrize("value", ["ignore", "raise", "SKIP"])
def test_run_on_nan_is_skip_or_stop(base, value):
    assert_invalid(changed(base, run__on_nan=value), "run.on_nan", f"'{value}': choose skip or stop")
    changed(base, run__on_nan="stop").validate(world_size=1)


def test_run_max_skipped_steps_positive(base):
    assert_invalid(changed(base, run__max_skipped_steps=0), "run.max_skipped_steps", "must be > 0")


# cluster


@pytest.mark.parametrize("value", ["pbs", "k8s", ""])
def test_cluster_kind_is_local_or_slurm(base, value):
    assert_invalid(changed(base, cluster__kind=value), "cluster.kind", f"'{value}': choose local or slurm")


@pytest.mark.parametrize("field, value, message", [
    ("nodes", 0, "must be >= 1"),
    ("tasks_per_node", 0, "must be >= 1"),
    ("cpus_per_task", 0, "must be >= 1"),
    ("gpus_per_node", -1, "must be >= 0"),
    ("signal_lead_s", -5, "must be >= 0"),
    ("time", "4h", r"use \[days-\]hours:minutes:seconds"),
    ("job_name", "my job", "without '/' or spaces"),
    ("extra_sbatch", ["exclusive"], "give sbatch options like --exclusive"),
])
def test_cluster_slurm_values_are_checked(base, field, value, message):
    assert_invalid(changed(base, **{f"cluster__{field}": value}), f"cluster.{field}", message)


# --- one test per check in DSV4Config.validate (across groups) -------------------------------------------------------


def test_model_is_validated_at_data_seq_length(base):
    # The sequence-dependent model checks see data.seq_length: index_topk 8 needs 8 * csa_ratio 4 = 32 tokens.
    changed(base, data__seq_length=32).validate(world_size=1)
    assert_invalid(changed(base, data__seq_length=31), "model.sliding_window", r"longer than the sequence \(31\)")
    assert_invalid(changed(base, model__sliding_window=16, data__seq_length=31), "model.index_topk",
                   "exceeds the 7 compressed entries a 31-token sequence")


def test_groups_are_validated_before_the_model(base):
    # A bad group value is reported even when the model would fail too (seq_length 0 would break the model checks).
    assert_invalid(changed(base, data__seq_length=0, model__num_layers=0), "data.seq_length")


def test_tensor_parallel_divides_num_heads(base):  # debug: 4 heads, 2 output groups, 4 indexer heads, vocab 1024
    assert_invalid(changed(base, parallel__tp=3), "model.num_heads",
                   "4 is not divisible by parallel.tp=3", world_size=3)


def test_tensor_parallel_divides_o_groups(base):
    assert_invalid(changed(base, parallel__tp=4), "model.o_groups",
                   "2 is not divisible by parallel.tp=4", world_size=4)


def test_tensor_parallel_divides_index_n_heads(base):
    cfg = changed(base, parallel__tp=4, model__o_groups=4, model__index_n_heads=2)
    assert_invalid(cfg, "model.index_n_heads", "2 is not divisible by parallel.tp=4", world_size=4)


def test_tensor_parallel_divides_vocab_size(base):
    assert_invalid(changed(base, parallel__tp=2, model__vocab_size=1025), "model.vocab_size",
                   "1025 is not divisible by parallel.tp=2", world_size=2)


def test_tensor_parallel_of_two_and_four_fit_the_debug_model(base):
    changed(base, parallel__tp=2).validate(world_size=2)
    changed(base, parallel__tp=2, data__global_batch_size=8).validate(world_size=4)


@pytest.mark.parametrize("tp, world", [(2, 3), (2, 1), (4, 2), (4, 6)])
def test_tensor_parallel_divides_the_world_size(base, tp, world):
    cfg = changed(base, parallel__tp=tp, model__o_groups=4)
    assert_invalid(cfg, "parallel.tp", rf"tp\*pp = {tp}\*1 = {tp} ranks per model replica do not divide the {world} "
                   rf"ranks; launch a multiple of {tp} ranks or change parallel.tp", world_size=world)


def test_world_size_from_the_environment(base, monkeypatch):
    cfg = changed(base, parallel__tp=2)
    assert_invalid(cfg, "parallel.tp", "do not divide the 1 ranks", world_size=None)  # unset: 1
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"parallel.tp: tp\*pp = 2\*1 = 2 ranks per model replica do not divide the 3 "
                                          r"ranks"):
        cfg.validate()
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg.validate()
    assert_invalid(cfg, "parallel.tp", "do not divide the 3 ranks", world_size=3)  # explicit wins


@pytest.mark.parametrize("world", [0, -1])
def test_world_size_at_least_one(base, world):
    assert_invalid(copy.deepcopy(base), "parallel.tp", f"cannot lay out {world} ranks", world_size=world)


def test_global_batch_is_a_multiple_of_micro_batch_times_data_parallel_ranks(base):
    # world 4, tp 2 -> dp 2; micro 4 -> 8 sequences per micro-step over all ranks.
    cfg = changed(base, parallel__tp=2)
    assert_invalid(cfg, "data.global_batch_size",
                   r"4 is not a multiple of data.micro_batch_size=4 x 2 data-parallel ranks = 8; use a multiple of 8",
                   world_size=4)
    assert_invalid(changed(cfg, data__global_batch_size=12), "data.global_batch_size", "= 8", world_size=4)
    for global_batch in (8, 16, 64):  # 16, 64: gradient accumulation over 2, 8 micro-steps
        changed(cfg, data__global_batch_size=global_batch).validate(world_size=4)
    # One rank: only the micro batch counts.
    assert_invalid(changed(base, data__global_batch_size=6), "data.global_batch_size", "= 4")
    changed(base, data__micro_batch_size=3, data__global_batch_size=6).validate(world_size=1)
    # Eight ranks, tp 1 -> dp 8.
    assert_invalid(changed(base, data__global_batch_size=16), "data.global_batch_size", "x 8 data-parallel ranks = 32",
                   world_size=8)


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
@pytest.mark.parametrize("warmup, steps", [(20, 20), (21, 20), (300, 300)])
def test_warmup_shorter_than_the_run_for_decaying_schedules(base, schedule, warmup, steps):
    cfg = changed(base, optim__schedule=schedule, optim__warmup_steps=warmup, run__steps=steps)
    assert_invalid(cfg, "optim.warmup_steps", f"{warmup} warm-up steps leave no decay in run.steps={steps}")
    changed(cfg, run__steps=warmup + 1).validate(world_size=1)


@pytest.mark.parametrize("warmup, steps", [(20, 20), (50, 20)])
def test_warmup_may_cover_the_run_with_a_constant_schedule(base, warmup, steps):
    changed(base, optim__schedule="constant", optim__warmup_steps=warmup, run__steps=steps).validate(world_size=1)


# --- the parallel layout: tp x pp model replicas times dp, and the expert grid etp x ep x pp -------------------------


@pytest.mark.parametrize("tp, pp, world", [(2, 2, 6), (2, 2, 2), (1, 2, 3), (1, 3, 4)])
def test_tensor_times_pipeline_parallel_divides_the_world_size(base, tp, pp, world):
    # tp divides the world, tp*pp does not: the pipeline size is named.
    cfg = changed(base, parallel__tp=tp, parallel__pp=pp)
    assert_invalid(cfg, "parallel.pp", rf"tp\*pp = {tp}\*{pp} = {tp * pp} ranks per model replica do not divide the "
                   rf"{world} ranks; launch a multiple of {tp * pp} ranks or change parallel.pp", world_size=world)


def test_tensor_times_pipeline_names_tp_when_tp_alone_does_not_divide(base):
    assert_invalid(changed(base, parallel__tp=2, parallel__pp=3), "parallel.tp",
                   r"tp\*pp = 2\*3 = 6 ranks per model replica do not divide the 9 ranks", world_size=9)


@pytest.mark.parametrize("dp, world, derived", [(2, 8, 4), (8, 8, 4), (1, 4, 2)])
def test_explicit_dp_matches_the_derived_one(base, dp, world, derived):
    cfg = changed(base, parallel__tp=2, parallel__dp=dp, data__global_batch_size=32)
    assert_invalid(cfg, "parallel.dp", rf"{dp} does not match the {world} ranks, which give world / \(tp\*pp\) = "
                   rf"{world}/\(2\*1\) = {derived} data-parallel ranks; set parallel.dp={derived} or 0 \(derived\)",
                   world_size=world)
    changed(cfg, parallel__dp=derived).validate(world_size=world)
    changed(cfg, parallel__dp=0).validate(world_size=world)


def test_explicit_dp_is_the_data_parallel_size_with_pipelines(base):
    cfg = changed(base, parallel__tp=2, parallel__pp=2, parallel__dp=2, data__global_batch_size=8)
    cfg.validate(world_size=8)
    assert_invalid(changed(cfg, parallel__dp=4), "parallel.dp", "set parallel.dp=2", world_size=8)


def test_parallel_ep_divides_the_experts(base):  # debug: 8 routed experts
    assert_invalid(changed(base, parallel__ep=3), "model.n_routed_experts", "parallel.ep=3", world_size=3)


def test_expert_tensor_parallel_divides_moe_intermediate_size(base):  # debug: moe_intermediate_size 32
    assert_invalid(changed(base, parallel__etp=3), "model.moe_intermediate_size",
                   "32 is not divisible by parallel.etp=3; pick an expert-tensor-parallel size that divides it",
                   world_size=3)
    assert_invalid(changed(base, parallel__etp=2, model__moe_intermediate_size=48, parallel__ep=1), "parallel.etp",
                   world_size=3)  # 48 splits over 2, but 2 ranks do not divide 3


def test_shared_expert_is_split_over_tensor_parallel(base):  # debug: 1 shared expert of 32
    cfg = changed(base, parallel__tp=2, model__moe_intermediate_size=33)
    assert_invalid(cfg, "model.n_shared_experts", r"the shared experts' 1 x model.moe_intermediate_size=33 = 33 hidden "
                   r"units are split over parallel.tp=2 ranks and are not divisible by it; pick a tensor-parallel size "
                   r"that divides 33", world_size=2)
    changed(cfg, model__n_shared_experts=0).validate(world_size=2)  # no shared expert: nothing to split
    changed(cfg, model__n_shared_experts=2).validate(world_size=2)  # 2 x 33 = 66 splits over 2


@pytest.mark.parametrize("ep, etp, pp, world, key", [
    (4, 1, 1, 2, "parallel.ep"),
    (2, 1, 1, 3, "parallel.ep"),
    (2, 2, 1, 2, "parallel.ep"),  # etp*pp = 2 divides the 2 ranks; ep is the one too many
    (2, 1, 2, 2, "parallel.ep"),
    (1, 2, 1, 3, "parallel.etp"),  # etp alone does not divide the 3 ranks
    (2, 2, 1, 6, "parallel.ep"),
    (1, 4, 2, 6, "parallel.etp"),  # tp*pp = 2 divides 6, etp*pp = 8 does not
])
def test_expert_grid_divides_the_world_size(base, ep, etp, pp, world, key):
    cfg = changed(base, parallel__ep=ep, parallel__etp=etp, parallel__pp=pp)
    grid = ep * etp * pp
    assert_invalid(cfg, key, rf"the expert grid etp\*ep\*pp = {etp}\*{ep}\*{pp} = {grid} does not divide the {world} "
                   rf"ranks; launch a multiple of {grid} ranks or change {key}", world_size=world)


def test_expert_with_tensor_parallel_needs_sequence_parallel(base):
    cfg = changed(base, parallel__tp=2, parallel__ep=2, parallel__sp=False, data__global_batch_size=8)
    assert_invalid(cfg, "parallel.sp", r"expert parallelism \(ep=2\) together with tensor parallelism \(tp=2\) needs "
                   r"sequence parallelism \(megatron requires it\); set parallel.sp=true", world_size=4)
    changed(cfg, parallel__sp=True).validate(world_size=4)
    changed(cfg, parallel__tp=1, data__global_batch_size=16).validate(world_size=4)  # ep alone: no tp to pair with
    changed(cfg, parallel__ep=1).validate(world_size=4)  # tp alone may go without sp


def test_sequence_parallel_splits_the_sequence_over_tensor_parallel(base):
    cfg = changed(base, parallel__tp=2, data__seq_length=255)
    assert_invalid(cfg, "data.seq_length", "255 tokens cannot be split over parallel.tp=2 ranks by sequence "
                   "parallelism; use a multiple of 2 or set parallel.sp=false", world_size=2)
    changed(cfg, parallel__sp=False).validate(world_size=2)
    changed(cfg, parallel__tp=1).validate(world_size=1)  # sp only acts with tp > 1


@pytest.mark.parametrize("pp, vpp, key", [(7, 1, "parallel.pp"), (4, 2, "parallel.vpp"), (3, 3, "parallel.vpp")])
def test_virtual_pipeline_stages_within_the_layers(base, pp, vpp, key):  # debug: 6 layers
    cfg = changed(base, parallel__pp=pp, parallel__vpp=vpp)
    assert_invalid(cfg, key, rf"pp\*vpp = {pp}\*{vpp} = {pp * vpp} virtual pipeline stages exceed the "
                   rf"model.num_layers=6 layers, and every stage needs one; lower {key}", world_size=pp)


@pytest.mark.parametrize("layers", [[3, 2], [4, 4], [1, 6]])
def test_pp_layers_sum_to_the_layers(base, layers):
    cfg = changed(base, parallel__pp=2, parallel__pp_layers=layers)
    assert_invalid(cfg, "parallel.pp_layers", re.escape(f"{layers} holds {sum(layers)} layers, not model.num_layers=6; "
                                                        f"give layer counts summing to 6 or [] for an even split"),
                   world_size=2)


@pytest.mark.parametrize("global_batch, micro_batches", [(4, 1), (8, 2), (16, 4)])
def test_interleaved_pipeline_needs_micro_batches_a_multiple_of_pp(base, global_batch, micro_batches):
    # pp 3 x vpp 2 on 3 ranks: dp 1, micro-batch 4.
    cfg = changed(base, parallel__pp=3, parallel__vpp=2, data__global_batch_size=global_batch)
    assert_invalid(cfg, "data.global_batch_size", rf"{global_batch} gives {micro_batches} micro-batches per step "
                   rf"\(global / \(data.micro_batch_size=4 x 1 data-parallel ranks\)\), not a multiple of "
                   rf"parallel.pp=3 as megatron's interleaved schedule \(parallel.vpp=2\) requires; use a multiple of "
                   rf"12", world_size=3)
    changed(cfg, parallel__vpp=1).validate(world_size=3)  # plain 1F1B takes any number of micro-batches


def test_interleaved_pipeline_needs_eval_iters_a_multiple_of_pp(base):
    cfg = changed(base, parallel__pp=3, parallel__vpp=2, data__global_batch_size=12, run__eval_iters=4)
    assert_invalid(cfg, "run.eval_iters", r"4 validation micro-batches give 4 per data-parallel rank \(1 ranks\), "
                   r"which cannot run through the interleaved schedule of parallel.pp=3; use a multiple of 3",
                   world_size=3)
    changed(cfg, run__eval_iters=3).validate(world_size=3)
    changed(cfg, parallel__vpp=1).validate(world_size=3)
    # run.eval_iters is the job's count: on 2 data-parallel ranks each runs ceil(eval_iters / 2) of them.
    dp2 = changed(cfg, data__global_batch_size=24, run__eval_iters=3)
    assert_invalid(dp2, "run.eval_iters", r"3 validation micro-batches give 2 per data-parallel rank \(2 ranks\), "
                   r"which cannot run through the interleaved schedule of parallel.pp=3; use a multiple of 6",
                   world_size=6)
    changed(dp2, run__eval_iters=6).validate(world_size=6)
    changed(dp2, run__eval_iters=5).validate(world_size=6)  # 3 and 2 + a padding micro-batch


@pytest.mark.parametrize("tp, pp, vpp, ep, etp, world, global_batch, layers", [
    (2, 2, 1, 1, 1, 8, 8, []),  # dp 2
    (2, 1, 1, 2, 1, 4, 8, []),  # tp and ep combined with sequence parallelism (the default)
    (1, 3, 2, 1, 1, 3, 12, []),  # interleaved: 6 virtual stages of one layer, 3 micro-batches
    (1, 3, 2, 1, 1, 3, 24, [1, 1, 1, 1, 1, 1]),
    (1, 2, 2, 1, 1, 2, 8, []),  # pp 2 with vpp: a valid config (only the gloo backend rejects it, at run time)
    (1, 2, 1, 1, 1, 2, 4, [4, 2]),  # uneven stages
    (1, 1, 1, 2, 2, 4, 16, []),  # each expert over 2 ranks, experts over 2 ranks
    (2, 2, 1, 2, 2, 8, 8, [2, 4]),  # everything at once: dp 2, expert grid 2*2*2
    (1, 6, 1, 1, 1, 6, 4, []),  # one layer per stage
])
def test_parallel_layouts_that_fit_the_debug_model(base, tp, pp, vpp, ep, etp, world, global_batch, layers):
    cfg = changed(base, parallel__tp=tp, parallel__pp=pp, parallel__vpp=vpp, parallel__ep=ep, parallel__etp=etp,
                  parallel__pp_layers=layers, data__global_batch_size=global_batch, run__eval_iters=6)
    assert cfg.validate(world_size=world) is cfg
    changed(cfg, parallel__dp=world // (tp * pp)).validate(world_size=world)  # dp given explicitly and matching


@pytest.mark.parametrize("preset, world, values", [
    ("tp2", 2, {"tp": 2}), ("pp2", 2, {"pp": 2}), ("ep2", 4, {"ep": 2}),
])
def test_layout_presets_compose_at_their_world_size(preset, world, values):
    cfg = compose_config(overrides=[f"parallel={preset}", "data.global_batch_size=16"], world_size=world)
    assert cfg.parallel == ParallelConfig(**values)
    with pytest.raises(ConfigError):
        compose_config(overrides=[f"parallel={preset}", "data.global_batch_size=16"], world_size=1)


# --- values that cannot be right (every numeric field of every schema) ----------------------------------------------

@pytest.mark.parametrize("key", ["rms_norm_eps", "hc_eps", "rope_theta", "compress_rope_theta", "init_std",
                                 "routed_scaling_factor"])
@pytest.mark.parametrize("value", [0, -1, "nan"])
def test_model_scales_and_floors_must_be_positive(key, value):
    assert_rejected([f"model.{key}={value}"], key, "must be > 0")


@pytest.mark.parametrize("key", ["max_position_embeddings", "yarn_original_max_position"])
@pytest.mark.parametrize("value", [0, -1])
def test_model_position_lengths_must_be_positive(key, value):
    assert_rejected([f"model.{key}={value}"], key, "must be > 0")


@pytest.mark.parametrize("key", ["bias_update_rate", "seq_aux_loss_coef", "indexer_loss_coef", "hash_seed"])
def test_model_rates_coefficients_and_seeds_non_negative(key):
    assert_rejected([f"model.{key}=-1"], key, "must be >= 0")
    compose_config("debug", [f"model.{key}=0"])  # zero: off (rates, coefficients) or a valid seed


@pytest.mark.parametrize("fast, slow, key", [(32, 0, "yarn_beta_slow"), (32, -1, "yarn_beta_slow"),
                                             (1, 1, "yarn_beta_fast"), (1, 32, "yarn_beta_fast")])
def test_yarn_betas_positive_and_ordered(fast, slow, key):
    assert_rejected([f"model.yarn_beta_fast={fast}", f"model.yarn_beta_slow={slow}"], key)


def test_run_seed_non_negative(base):
    assert_invalid(changed(base, run__seed=-1), "run.seed", "must be >= 0")
    changed(base, run__seed=0).validate(world_size=1)


@pytest.mark.parametrize("key", ["run.output_dir", "data.cache_dir"])
def test_folders_under_a_file_are_refused_naming_the_key(tmp_path, key):
    (tmp_path / "a_file").write_text("")
    for path in (tmp_path / "a_file", tmp_path / "a_file" / "run" / "x"):
        with pytest.raises(ConfigError, match="not a folder|is a file") as e:
            compose_config(overrides=[f"{key}={path}"])
        assert str(e.value).startswith(f"{key}:") and str(tmp_path / "a_file") in str(e.value), str(e.value)
    compose_config(overrides=[f"{key}={tmp_path / 'new' / 'deeper'}"])  # creatable: nothing is made by checking
    assert not (tmp_path / "new").exists()


# --- defaults that work on 1, 2, 4 and 8 ranks and for short runs ---------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_default_global_batch_is_one_micro_batch_per_data_parallel_rank(world):
    cfg = compose_config(world_size=world)
    assert cfg.data.global_batch_size == cfg.data.micro_batch_size * world == 4 * world  # 1 rank: 4, as before


def test_an_explicit_global_batch_is_kept_and_checked():
    assert compose_config(overrides=["data.global_batch_size=16"], world_size=2).data.global_batch_size == 16
    with pytest.raises(ConfigError, match="data.global_batch_size: 4 is not a multiple"):
        compose_config(overrides=["data.global_batch_size=4"], world_size=2)


def test_the_readme_layouts_compose_with_the_default_batch():
    compose_config(overrides=["parallel.tp=2", "parallel.pp=2", "parallel.ep=2"], world_size=8)
    compose_config(overrides=["parallel=tp2"], world_size=2)


@pytest.mark.parametrize("steps, warmup", [(1, 0), (3, 0), (20, 2), (150, 15), (199, 19), (200, 20), (300, 20),
                                           (100000, 20)])
def test_unset_warmup_is_clipped_to_a_tenth_of_a_short_run(steps, warmup, caplog):
    with caplog.at_level("INFO", logger="dsv4.conf.schema"):
        cfg = compose_config(overrides=[f"run.steps={steps}"])
    assert cfg.optim.warmup_steps == warmup
    notice = [r.getMessage() for r in caplog.records if r.getMessage().startswith("optim.warmup_steps: unset")]
    assert bool(notice) == (warmup < 20), notice


def test_an_explicit_warmup_is_used_as_given_and_still_checked():
    assert compose_config(overrides=["run.steps=20", "optim.warmup_steps=5"]).optim.warmup_steps == 5
    with pytest.raises(ConfigError, match="optim.warmup_steps: 20 warm-up steps leave no decay in run.steps=20"):
        compose_config(overrides=["run.steps=20", "optim.warmup_steps=20"])


# --- dsv4.model_config: a preset validated on its own ---------------------------------------------------------------

def test_model_config_validates_the_preset_alone():
    import dsv4

    assert dsv4.model_config("flash", ["sliding_window=256"]).sliding_window == 256  # the README's example
    assert dsv4.model_config("pro").num_layers == 61
    with pytest.raises(ConfigError, match="model.index_topk"):  # at a sequence length, when one is given
        dsv4.model_config("flash", seq_length=256)
    assert dsv4.model_config("flash", seq_length=4096).index_topk == 512
    with pytest.raises(ConfigError, match="model.index_topk"):  # other groups' values take part when given
        dsv4.model_config("flash", ["data.seq_length=256"])
    with pytest.raises(ConfigError, match="model.rms_norm_eps"):
        dsv4.model_config("debug", ["rms_norm_eps=0"])


def test_spelt_out_key_suggests_the_abbreviation():
    with pytest.raises(ConfigError, match=r"optim.learning_rate: no such key; did you mean 'lr'\?"):
        compose_config(overrides=["optim.learning_rate=1e-3"])
