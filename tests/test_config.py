"""Config: the Hydra presets compose and validate, overrides and typos behave, and every check in
`ModelConfig.validate` fires with a message naming the offending key."""

from __future__ import annotations

import os

import pytest
import yaml

from dsv4.conf.schema import CONF_DIR, DSV4Config, compose_config, register_configs
from dsv4.model.config import ConfigError, ModelConfig


def kinds(cfg: ModelConfig) -> list[str]:
    """Attention kind of each block, MTP blocks last."""
    return [cfg.layer_kind(i) for i in range(cfg.num_layers + cfg.mtp_depth)]


# --- presets ----------------------------------------------------------------------------------------------------


def test_debug_is_the_default_and_has_every_component():
    cfg = compose_config()
    assert isinstance(cfg, DSV4Config) and isinstance(cfg.model, ModelConfig)
    m = cfg.model
    assert (m.hidden_size, m.num_layers, cfg.seq_length) == (64, 6, 256)
    assert kinds(m) == ["swa", "swa", "csa", "hca", "csa", "hca", "swa"]
    assert 0 < m.num_hash_layers < m.num_layers  # both hash- and score-routed MoE blocks
    assert m.mtp_depth == 1 and m.hc_mult > 1
    assert m.index_topk < 128 // m.csa_ratio  # the top-k selects even at 128 tokens
    compose_config(overrides=["seq_length=128"])  # the shortest sequence the preset is meant for


def test_flash_preset_is_the_released_config():
    m = compose_config("flash", ["seq_length=4096"]).model
    assert (m.num_layers, m.hidden_size, m.num_heads, m.head_dim, m.q_lora_rank) == (43, 4096, 64, 512, 1024)
    assert (m.o_groups, m.o_lora_rank, m.index_topk) == (8, 1024, 512)
    assert (m.n_routed_experts, m.n_activated_experts, m.moe_intermediate_size) == (256, 6, 2048)
    assert m.routed_scaling_factor == 1.5
    assert m.compress_ratios == [0, 0] + [4, 128] * 20 + [4] + [0]
    k = kinds(m)
    assert (k[:43].count("swa"), k[:43].count("csa"), k[:43].count("hca")) == (2, 21, 20)
    assert k[43] == "swa"  # the MTP block


def test_pro_preset_is_the_released_config():
    m = compose_config("pro", ["seq_length=4096"]).model
    assert (m.num_layers, m.hidden_size, m.num_heads, m.q_lora_rank, m.o_groups) == (61, 7168, 128, 1536, 16)
    assert (m.index_topk, m.n_routed_experts, m.moe_intermediate_size) == (1024, 384, 3072)
    assert m.routed_scaling_factor == 2.5
    assert m.compress_ratios == [128, 128] + [4, 128] * 29 + [4] + [0]
    k = kinds(m)
    assert (k[:61].count("swa"), k[:61].count("csa"), k[:61].count("hca")) == (0, 30, 31)
    assert k[61] == "swa"


def test_flash_preset_matches_the_schema_defaults():
    # ModelConfig's defaults are documented as V4-Flash's; the two must not drift apart.
    assert compose_config("flash", ["seq_length=4096"]).model == ModelConfig()


@pytest.mark.parametrize("preset", ["debug", "flash", "pro"])
def test_presets_state_values_only_and_name_their_schema(preset):
    with open(os.path.join(CONF_DIR, "model", f"{preset}.yaml")) as f:
        raw = yaml.safe_load(f)
    assert raw.pop("defaults") == ["model_schema", "_self_"]
    assert set(raw) <= set(ModelConfig.__dataclass_fields__)


def test_register_configs_is_idempotent():
    register_configs()
    register_configs()
    assert compose_config().model.hidden_size == 64


# --- overrides, typos, wrong types ------------------------------------------------------------------------------


def test_command_line_overrides():
    cfg = compose_config("debug", ["model.hidden_size=128", "model.compress_ratios=[0,4,16,4,16,0,0]",
                                   "seq_length=512"])
    assert cfg.model.hidden_size == 128 and cfg.seq_length == 512
    assert cfg.model.compress_ratios == [0, 4, 16, 4, 16, 0, 0]


def test_flash_at_its_first_stage_length_with_a_shrunk_depth():
    m = compose_config("flash", ["model.num_layers=3", "model.compress_ratios=[0,4,128,0]",
                                 "seq_length=4096"]).model
    assert kinds(m) == ["swa", "csa", "hca", "swa"]


@pytest.mark.parametrize("override, key, hint", [
    ("model.hiden_size=128", "model.hiden_size", "hidden_size"),
    ("+model.hiden_size=128", "model.hiden_size", "hidden_size"),  # force-added keys must not be dropped silently
    ("model.not_a_field=1", "model.not_a_field", "no such key"),
    ("seq_len=512", "seq_len", "seq_length"),
])
def test_unknown_key_fails_naming_it(override, key, hint):
    with pytest.raises(ConfigError, match="no such key") as e:
        compose_config(overrides=[override])
    assert str(e.value).startswith(f"{key}:") and hint in str(e.value)


@pytest.mark.parametrize("override, key, expected", [
    ("model.num_layers=abc", "model.num_layers", "int"),
    ("model.yarn_factor=fast", "model.yarn_factor", "float"),
    ("model.quant_sim=maybe", "model.quant_sim", "bool"),
    ("model.compress_ratios=[0,0,4,x,4,16,0]", "model.compress_ratios[3]", "int"),
    ("seq_length=1.5", "seq_length", "int"),
])
def test_wrong_type_fails_naming_the_key(override, key, expected):
    with pytest.raises(ConfigError) as e:
        compose_config(overrides=[override])
    assert str(e.value).startswith(f"{key}:") and f"type {expected}" in str(e.value)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match=r"model=flsh: no such preset.*'debug', 'flash', 'pro'"):
        compose_config("flsh")


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


def test_index_head_dim_power_of_two():
    assert_rejected(["model.index_head_dim=24"], "index_head_dim", "power of two")


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
    assert_rejected(["seq_length=8192"], "max_position_embeddings", "sequence length 8192")


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
