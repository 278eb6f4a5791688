"""The inference KV cache layout (dsv4/model/kv_cache.py): byte counts against the spec's accounting (section 12),
derived from the presets; meta and real allocations agree; the layout follows each preset's compress_ratios."""

import functools

import pytest
import torch

from dsv4.model.config import ConfigError
from dsv4.model.kv_cache import KVCache, V32CacheConfig

BF16 = 2
MILLION = 2 ** 20


@functools.lru_cache(maxsize=None)
def preset(name: str):
    from dsv4.conf.schema import compose_config

    # The full-size presets need a sequence long enough for their top-k; the model config does not depend on it.
    return compose_config(name, [] if name == "debug" else ["data.seq_length=4096"]).model


def count(cfg, kind: str) -> int:
    """Main blocks of one attention kind."""
    return sum(cfg.layer_kind(i) == kind for i in range(cfg.num_layers))


def bf16_growing_bytes_per_token(cfg) -> float:
    """Spec section 12: one BF16 K=V entry per m tokens in CSA, per m' tokens in HCA, one BF16 indexer key per m
    tokens in CSA (e.g. Flash 21*256 + 20*8 + 21*64)."""
    n_csa, n_hca = count(cfg, "csa"), count(cfg, "hca")
    return BF16 * (n_csa * cfg.head_dim / cfg.csa_ratio + n_hca * cfg.head_dim / cfg.hca_ratio
                   + n_csa * cfg.index_head_dim / cfg.csa_ratio)


@pytest.mark.parametrize("name, spec_bytes", [("flash", 6880), ("pro", 9848)])
def test_bf16_accounting_is_the_spec_formula(name, spec_bytes):
    cfg = preset(name)
    cache = KVCache.v4(cfg, MILLION, storage="bf16")
    assert cache.growing_bytes_per_token() == bf16_growing_bytes_per_token(cfg)
    assert cache.growing_bytes_per_token() == spec_bytes  # the figure spec section 12 states
    # The fixed part: the window ring of every main block, the compressor states of CSA/HCA (two blocks of two
    # halves in the overlapped CSA compressor) and of the CSA indexers; kv and gate each.
    n_csa, n_hca = count(cfg, "csa"), count(cfg, "hca")
    window = cfg.num_layers * cfg.sliding_window * cfg.head_dim * BF16
    states = 2 * BF16 * (n_csa * (2 * cfg.csa_ratio) * (2 * cfg.head_dim) + n_hca * cfg.hca_ratio * cfg.head_dim
                         + n_csa * (2 * cfg.csa_ratio) * (2 * cfg.index_head_dim))
    assert cache.fixed_bytes_per_sequence() == window + states
    assert cache.nbytes() == cache.growing_bytes_per_token() * MILLION + window + states
    # Amortised over 1M tokens the fixed part adds under 0.3%.
    assert cache.bytes_per_token() / cache.growing_bytes_per_token() - 1 < 3e-3


@pytest.mark.parametrize("name", ["flash", "pro", "debug"])
def test_reference_accounting_counts_fp8_fp4_and_their_scales(name):
    cfg = preset(name)
    length = cfg.max_position_embeddings
    cache = KVCache.v4(cfg, length, storage="reference")
    nope = cfg.head_dim - cfg.rope_head_dim
    entry = nope + nope // cfg.quant_fp8_block + BF16 * cfg.rope_head_dim  # FP8 + ue8m0 bytes + BF16 RoPE dims
    key = cfg.index_head_dim // 2 + cfg.index_head_dim // cfg.quant_fp4_block  # FP4 pairs + ue8m0 bytes
    n_csa, n_hca = count(cfg, "csa"), count(cfg, "hca")
    assert cache.nbytes("compressed") == entry * (n_csa * (length // cfg.csa_ratio) + n_hca * (length // cfg.hca_ratio))
    assert cache.nbytes("indexer_keys") == key * n_csa * (length // cfg.csa_ratio)
    assert cache.nbytes("window") == entry * cfg.sliding_window * cfg.num_layers
    kinds = {t.dtype for lc in cache.layers for _, t in lc.tensors()}
    assert kinds == {torch.float8_e4m3fn, torch.uint8, torch.bfloat16, torch.float32}


def test_v32_mla_cache_is_the_spec_formula():
    v32 = V32CacheConfig()
    bf16 = KVCache.v32_mla(MILLION, storage="bf16")
    per_layer = BF16 * (v32.kv_lora_rank + v32.rope_head_dim + v32.index_head_dim)
    assert bf16.bytes_per_token() == v32.num_layers * per_layer == 85_888  # spec section 12
    ref = KVCache.v32_mla(MILLION, storage="reference")
    # FlashMLA's 656 B (512 FP8 + 4 fp32 scales + 64 BF16) and the indexer's 132 B (FP8 + one fp32 scale), spec 10.
    assert ref.bytes_per_token() == v32.num_layers * (656 + 132)


@pytest.mark.parametrize("name, tokens, batch", [("debug", 256, 3), ("flash", 4096, 1)])
@pytest.mark.parametrize("storage", ["bf16", "reference"])
def test_meta_allocation_counts_what_a_real_one_allocates(name, tokens, batch, storage):
    cfg = preset(name)
    meta = KVCache.v4(cfg, tokens, batch, storage, device="meta", include_mtp=True)
    real = KVCache.v4(cfg, tokens, batch, storage, device="cpu", include_mtp=True)
    assert meta.layout() == real.layout()
    assert all(t.device.type == "cpu" for lc in real.layers for _, t in lc.tensors())
    assert meta.nbytes() == real.nbytes() == real.storage_nbytes()
    assert meta.bytes_by_part() == real.bytes_by_part()


@pytest.mark.parametrize("name", ["debug", "flash", "pro"])
def test_layout_follows_compress_ratios(name):
    cfg = preset(name)
    tokens, batch = 1024, 2
    cache = KVCache.v4(cfg, tokens, batch, "bf16")
    assert [(lc.kind, lc.ratio) for lc in cache.layers] == [
        (cfg.layer_kind(i), cfg.compress_ratios[i]) for i in range(cfg.num_layers)]
    for lc in cache.layers:
        parts = dict(lc.tensors())
        assert parts["window.kv"].shape == (batch, cfg.sliding_window, cfg.head_dim)
        expected = {"swa": {"window"}, "hca": {"window", "compressor_state", "compressed"},
                    "csa": {"window", "compressor_state", "compressed", "indexer_keys", "indexer_state"}}[lc.kind]
        assert set(lc.parts) == expected
        if lc.kind == "swa":
            continue
        coff = 2 if lc.kind == "csa" else 1  # the overlapped CSA compressor keeps two blocks of both halves
        assert parts["compressed.kv"].shape == (batch, tokens // lc.ratio, cfg.head_dim)
        assert parts["compressor_state.kv_state"].shape == (batch, coff * lc.ratio, coff * cfg.head_dim)
        assert parts["compressor_state.gate_state"].shape == (batch, coff * lc.ratio, coff * cfg.head_dim)
        if lc.kind == "csa":
            assert parts["indexer_keys.keys"].shape == (batch, tokens // cfg.csa_ratio, cfg.index_head_dim)
            assert parts["indexer_state.kv_state"].shape == (batch, 2 * cfg.csa_ratio, 2 * cfg.index_head_dim)


def test_mtp_block_is_left_out_unless_asked_for():
    cfg = preset("flash")
    main = KVCache.v4(cfg, 4096)
    with_mtp = KVCache.v4(cfg, 4096, include_mtp=True)
    assert len(main.layers) == cfg.num_layers
    assert len(with_mtp.layers) == cfg.num_layers + cfg.mtp_depth
    # Flash's MTP block is sliding-window only: it adds one window ring and nothing that grows.
    assert with_mtp.nbytes() - main.nbytes() == cfg.sliding_window * cfg.head_dim * BF16
    assert with_mtp.growing_bytes_per_token() == main.growing_bytes_per_token()


def test_cache_longer_than_the_positions_or_bad_storage_fails():
    cfg = preset("debug")
    with pytest.raises(ConfigError, match="model.max_position_embeddings"):
        KVCache.v4(cfg, cfg.max_position_embeddings + 1)
    with pytest.raises(ValueError, match="storage"):
        KVCache.v4(cfg, 256, storage="fp8")
