"""The inference KV cache of DeepSeek-V4: its layout and an allocator, with DeepSeek-V3.2's MLA cache to compare
(spec sections 4, 10 and 12).

This file holds the cache layout and allocates it; decoding through it (filling it token by token, attending from
it) is not built yet. What a V4 attention layer keeps while generating, per sequence of up to `max_tokens` tokens:

- every layer: the sliding-window ring of the shared K=V head, [b, n_win, head_dim]; token t lives in slot
  t % n_win. Fixed size: it does not grow with the context.
- CSA and HCA layers: the compressor's pending state, the projections C (`kv_state`) and gate logits Z + B
  (`gate_state`) of the tokens of the block not yet complete, [b, coff * m, coff * head_dim]; the overlapped CSA
  compressor (coff = 2) keeps two blocks, because entry i pools block i-1 (first projection half) with block i
  (second half). Fixed size, kept in fp32 like the reference's compressor (spec S1 `Compressor.kv_state` /
  `score_state`, the same shapes).
- CSA and HCA layers: the compressed entries, [b, floor(L / m), head_dim]. Only complete blocks become entries
  (a query never sees its own incomplete block); the partial block is the compressor state above.
- CSA layers: the lightning indexer's compressed keys, [b, floor(L / m), index_head_dim], and its own
  (overlapped) compressor state.
The shapes are those of the reference inference code's buffers (S1: window + max_seq_len // m rows per layer, the
indexer's max_seq_len // m keys); its buffers are BF16 holding FP8/FP4-simulated values, the formats below store
them packed.

Two storage formats, each allocated as real tensors:
- "bf16": every K=V row, entry and indexer key in BF16 (and the compressor state in BF16): the accounting of the
  spec's section 12 (Flash 6,880 B/token, Pro 9,848, V3.2 85,888 from the growing part alone).
- "reference": the precision of V4's inference: the non-RoPE dims of K=V as FP8 e4m3 (`torch.float8_e4m3fn`) with
  one ue8m0 scale byte per `quant_fp8_block` values, the RoPE dims in BF16; indexer keys as FP4 e2m1, two codes per
  byte (uint8), with one ue8m0 scale byte per `quant_fp4_block` values; the compressor state in fp32.
  The block sizes come from the ModelConfig (the quantization simulation of training uses the same ones).

The MTP block is left out unless `include_mtp=True` (the spec's accounting counts the main layers; a served MTP
block used for speculative decoding adds one sliding-window layer, fixed size).

`KVCache.v32_mla` allocates DeepSeek-V3.2's cache the same way: per layer, the MLA latent (kv_lora_rank) and the
decoupled RoPE key, plus the DSA indexer's keys, one row per token. "bf16" is the spec's accounting; "reference" is
FlashMLA's FP8 layout (latent FP8 with one fp32 scale per 128 values, RoPE BF16: 656 B) and the indexer's FP8 keys
with one fp32 scale (132 B), spec section 10.

Allocate on `device="meta"` to count the bytes of a 1M-token cache without the memory; `nbytes()` then equals
what the same call allocates on a real device (tests/test_kv_cache.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import ConfigError, ModelConfig

STORAGES = ("bf16", "reference")

PARTS = ("window", "compressor_state", "compressed", "indexer_keys", "indexer_state")
"""The cache parts of a V4 layer; `latent` (MLA latent + RoPE key) is V3.2's per-token part."""

FIXED_PARTS = ("window", "compressor_state", "indexer_state")
"""Parts whose size does not depend on the context length."""


@dataclass(frozen=True)
class V32CacheConfig:
    """What sizes DeepSeek-V3.2's inference cache (spec sections 10 and 12)."""

    num_layers: int = 61
    """Transformer layers, each with an MLA cache and a DSA indexer (MTP layer not counted)."""
    kv_lora_rank: int = 512
    """Width of the compressed MLA latent cached per token."""
    rope_head_dim: int = 64
    """Decoupled RoPE key cached per token, shared by all heads."""
    index_head_dim: int = 128
    """Indexer key width d^I, one key per token."""
    latent_fp8_block: int = 128
    """FlashMLA's FP8 cache: one fp32 scale per this many latent values (512 / 128 = 4 scales, 656 B/token)."""
    index_fp8_block: int = 128
    """Indexer FP8 keys: one fp32 scale per this many values (one per key: 132 B/token)."""
    max_position_embeddings: int = 163840
    """V3.2's context window (128K tokens at release; the 1M comparison extrapolates the per-token cost)."""


@dataclass
class LayerCache:
    """The cache tensors of one attention layer, grouped by part (`PARTS`; `latent` for V3.2)."""

    layer: int
    kind: str
    """'swa', 'csa', 'hca' (V4) or 'mla' (V3.2)."""
    ratio: int
    """Tokens per compressed entry (0: none)."""
    parts: dict = field(default_factory=dict)
    """part -> {tensor name -> tensor}."""

    def nbytes(self, part: str | None = None) -> int:
        """Bytes of one part, or of all of them."""
        groups = [self.parts.get(part, {})] if part else self.parts.values()
        return sum(t.numel() * t.element_size() for g in groups for t in g.values())

    def tensors(self):
        """(part.name, tensor) pairs."""
        for part, group in self.parts.items():
            for name, t in group.items():
                yield f"{part}.{name}", t


class KVCache:
    """The inference cache of a whole model for `batch` sequences of up to `max_tokens` tokens.

    `layers[i]` is block i's `LayerCache` (in `compress_ratios` order). Build with `KVCache.v4(cfg, ...)` or
    `KVCache.v32_mla(...)`.
    """

    def __init__(self, layers: list, batch: int, max_tokens: int, storage: str):
        self.layers, self.batch, self.max_tokens, self.storage = layers, batch, max_tokens, storage

    # --- builders ------------------------------------------------------------------------------------------------
    @classmethod
    def v4(cls, cfg: ModelConfig, max_tokens: int, batch: int = 1, storage: str = "bf16", device="meta",
           include_mtp: bool = False) -> "KVCache":
        """Allocate a DeepSeek-V4 cache for `cfg` (one layer per block, its kind from `compress_ratios`) on `device`
        ("meta" by default: the layout and byte counts without the memory; "cpu"/"cuda" allocate it)."""
        _check(storage, batch, max_tokens)
        if max_tokens > cfg.max_position_embeddings:
            raise ConfigError(f"model.max_position_embeddings: a {max_tokens}-token cache exceeds it "
                              f"({cfg.max_position_embeddings}); allocate at most that many tokens")
        alloc = _Allocator(storage, batch, device)
        n_blocks = cfg.num_layers + (cfg.mtp_depth if include_mtp else 0)
        layers = []
        for i in range(n_blocks):
            kind, ratio = cfg.layer_kind(i), cfg.layer_ratio(i)
            lc = LayerCache(i, kind, ratio)
            lc.parts["window"] = alloc.kv_rows(cfg.sliding_window, cfg.head_dim, cfg.rope_head_dim,
                                               cfg.quant_fp8_block)
            if kind != "swa":
                coff = 2 if kind == "csa" else 1
                lc.parts["compressor_state"] = alloc.compressor_state(coff * ratio, coff * cfg.head_dim)
                lc.parts["compressed"] = alloc.kv_rows(max_tokens // ratio, cfg.head_dim, cfg.rope_head_dim,
                                                       cfg.quant_fp8_block)
            if kind == "csa":
                # The indexer's own compressor is overlapped with the CSA ratio (spec section 4).
                lc.parts["indexer_keys"] = alloc.fp4_rows(max_tokens // ratio, cfg.index_head_dim,
                                                          cfg.quant_fp4_block)
                lc.parts["indexer_state"] = alloc.compressor_state(2 * ratio, 2 * cfg.index_head_dim)
            layers.append(lc)
        return cls(layers, batch, max_tokens, storage)

    @classmethod
    def v32_mla(cls, max_tokens: int, batch: int = 1, storage: str = "bf16", device="meta",
                cfg: V32CacheConfig = V32CacheConfig()) -> "KVCache":
        """Allocate DeepSeek-V3.2's MLA + indexer cache: one latent row and one indexer key per token and layer.

        `max_tokens` may exceed V3.2's own context window: the 1M comparison extrapolates its per-token cost."""
        _check(storage, batch, max_tokens)
        alloc = _Allocator(storage, batch, device)
        layers = []
        for i in range(cfg.num_layers):
            lc = LayerCache(i, "mla", 1)
            lc.parts["latent"] = alloc.mla_rows(max_tokens, cfg.kv_lora_rank, cfg.rope_head_dim, cfg.latent_fp8_block)
            lc.parts["indexer_keys"] = alloc.fp8_rows_fp32_scale(max_tokens, cfg.index_head_dim, cfg.index_fp8_block)
            layers.append(lc)
        return cls(layers, batch, max_tokens, storage)

    # --- accounting ----------------------------------------------------------------------------------------------
    def nbytes(self, part: str | None = None) -> int:
        """Bytes the cache allocates (one part, or all)."""
        return sum(lc.nbytes(part) for lc in self.layers)

    def bytes_by_part(self) -> dict:
        """part -> bytes, for the parts present."""
        parts = dict.fromkeys(p for lc in self.layers for p in lc.parts)
        return {p: self.nbytes(p) for p in parts}

    def bytes_per_token(self, part: str | None = None) -> float:
        """Allocated bytes per cached token of one sequence: nbytes / (batch * max_tokens). The fixed parts
        (window ring, compressor states) amortise towards 0 as max_tokens grows."""
        return self.nbytes(part) / (self.batch * self.max_tokens)

    def fixed_bytes_per_sequence(self) -> int:
        """Bytes per sequence that do not grow with the context (window ring and compressor states)."""
        return sum(self.nbytes(p) for p in FIXED_PARTS) // self.batch

    def growing_bytes_per_token(self) -> float:
        """Bytes per token of the parts that grow with the context (compressed entries, indexer keys, latents)."""
        growing = self.nbytes() - self.fixed_bytes_per_sequence() * self.batch
        return growing / (self.batch * self.max_tokens)

    def storage_nbytes(self) -> int:
        """Bytes of the tensors' storages, each counted once: what the allocator actually handed out (on a real
        device; on `meta` the storages are as large, without memory behind them)."""
        seen = {}
        for lc in self.layers:
            for _, t in lc.tensors():
                seen[id(t.untyped_storage())] = t.untyped_storage().nbytes()
        return sum(seen.values())

    def layout(self) -> list:
        """[(layer, kind, ratio, {part.name: (shape, dtype)})], a readable description of the allocation."""
        return [(lc.layer, lc.kind, lc.ratio, {name: (tuple(t.shape), t.dtype) for name, t in lc.tensors()})
                for lc in self.layers]


def _check(storage: str, batch: int, max_tokens: int) -> None:
    if storage not in STORAGES:
        raise ValueError(f"storage={storage!r}: expected one of {STORAGES}")
    if batch < 1 or max_tokens < 1:
        raise ValueError(f"batch={batch} and max_tokens={max_tokens} must be >= 1")


class _Allocator:
    """Allocates the cache's tensors in one storage format on one device (torch.zeros: real memory is touched)."""

    def __init__(self, storage: str, batch: int, device):
        self.storage, self.b, self.device = storage, batch, torch.device(device)

    def _zeros(self, shape, dtype) -> torch.Tensor:
        return torch.zeros(self.b, *shape, dtype=dtype, device=self.device)

    def kv_rows(self, n: int, head_dim: int, rope_dim: int, fp8_block: int) -> dict:
        """n rows of V4's shared K=V head: BF16, or FP8 non-RoPE dims + ue8m0 scale bytes + BF16 RoPE dims."""
        if self.storage == "bf16":
            return {"kv": self._zeros((n, head_dim), torch.bfloat16)}
        nope = head_dim - rope_dim
        if nope % fp8_block:
            raise ConfigError(f"model.quant_fp8_block: {fp8_block} must divide the {nope} non-RoPE dims of a head "
                              f"for the FP8 cache layout")
        return {"kv_nope": self._zeros((n, nope), torch.float8_e4m3fn),
                "kv_nope_scale": self._zeros((n, nope // fp8_block), torch.uint8),  # ue8m0: an exponent byte
                "kv_rope": self._zeros((n, rope_dim), torch.bfloat16)}

    def fp4_rows(self, n: int, dim: int, fp4_block: int) -> dict:
        """n indexer keys: BF16, or FP4 e2m1 packed two per byte + one ue8m0 scale byte per block."""
        if self.storage == "bf16":
            return {"keys": self._zeros((n, dim), torch.bfloat16)}
        if dim % fp4_block or dim % 2:
            raise ConfigError(f"model.quant_fp4_block: {fp4_block} must divide index_head_dim={dim} (even) for the "
                              f"FP4 cache layout")
        return {"keys_fp4": self._zeros((n, dim // 2), torch.uint8),
                "keys_scale": self._zeros((n, dim // fp4_block), torch.uint8)}

    def compressor_state(self, rows: int, width: int) -> dict:
        """Pending projections and gate logits of the incomplete block(s): fp32 in the reference, BF16 in bf16."""
        dtype = torch.bfloat16 if self.storage == "bf16" else torch.float32
        return {"kv_state": self._zeros((rows, width), dtype), "gate_state": self._zeros((rows, width), dtype)}

    def mla_rows(self, n: int, latent: int, rope_dim: int, fp8_block: int) -> dict:
        """n MLA rows: BF16 latent + RoPE key, or FlashMLA's FP8 latent with fp32 scales + BF16 RoPE key."""
        if self.storage == "bf16":
            return {"latent": self._zeros((n, latent), torch.bfloat16),
                    "k_rope": self._zeros((n, rope_dim), torch.bfloat16)}
        return {"latent_fp8": self._zeros((n, latent), torch.float8_e4m3fn),
                "latent_scale": self._zeros((n, latent // fp8_block), torch.float32),
                "k_rope": self._zeros((n, rope_dim), torch.bfloat16)}

    def fp8_rows_fp32_scale(self, n: int, dim: int, fp8_block: int) -> dict:
        """n V3.2 indexer keys: BF16, or FP8 with one fp32 scale per block."""
        if self.storage == "bf16":
            return {"keys": self._zeros((n, dim), torch.bfloat16)}
        return {"keys_fp8": self._zeros((n, dim), torch.float8_e4m3fn),
                "keys_scale": self._zeros((n, dim // fp8_block), torch.float32)}
