"""Quantize-dequantize simulation of DeepSeek-V4's low-precision KV and indexer paths (spec sections 4, 7).

The reference inference code keeps a BF16 cache that holds FP8/FP4-*simulated* values:
- K=V of every layer (sliding-window rows and compressed entries), non-RoPE dims: FP8 e4m3 in 1x64 blocks with
  power-of-two (ue8m0) scales (`act_quant(kv[..., :-rd], 64, ...)`); the RoPE dims stay high precision;
- lightning-indexer q and compressed keys: a Hadamard rotation, then FP4 e2m1 in 1x32 blocks (`fp4_quant`).
Training with the same simulation is quantization-aware training: the forward sees quantized values and the
backward passes straight through (straight-through estimator), as in V4's FP4 QAT. The whole path is switched by
`model.quant_sim`; with it off the model equals Hugging Face `transformers` exactly.
"""

from __future__ import annotations

import functools
import math

import torch

FP8_E4M3_MAX = 448.0
FP4_E2M1_MAX = 6.0
# The non-negative values e2m1 can represent.
FP4_E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _ue8m0_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Smallest power of two s with amax / s <= qmax (an 8-bit exponent-only scale)."""
    return torch.exp2(torch.ceil(torch.log2(amax.clamp_min(1e-30) / qmax)))


def _blocked(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of the quantization block {block}")
    return x.float().unflatten(-1, (x.shape[-1] // block, block))


def fp8_e4m3_qdq(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Round x to FP8 e4m3 with one ue8m0 scale per 1 x `block` tile and back (no gradient)."""
    xb = _blocked(x, block)
    scale = _ue8m0_scale(xb.abs().amax(-1, keepdim=True), FP8_E4M3_MAX)
    q = (xb / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
    return (q * scale).flatten(-2).to(x.dtype)


def fp4_e2m1_qdq(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Round x to FP4 e2m1 (round to nearest, ties to the even code) with one ue8m0 scale per 1 x `block` tile."""
    xb = _blocked(x, block)
    scale = _ue8m0_scale(xb.abs().amax(-1, keepdim=True), FP4_E2M1_MAX)
    mag = (xb / scale).abs().clamp_max(FP4_E2M1_MAX)
    grid = torch.tensor(FP4_E2M1_GRID, dtype=mag.dtype, device=mag.device)
    # Index of the first grid point >= mag, then pick the nearer of it and its left neighbour.
    hi = torch.bucketize(mag, grid).clamp(1, len(FP4_E2M1_GRID) - 1)
    lo = hi - 1
    d_lo, d_hi = mag - grid[lo], grid[hi] - mag
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))  # ties to the even code
    q = torch.where(pick_hi, grid[hi], grid[lo]) * torch.sign(xb)
    return (q * scale).flatten(-2).to(x.dtype)


def straight_through(x: torch.Tensor, qdq) -> torch.Tensor:
    """Forward: qdq(x). Backward: identity (straight-through estimator, as in V4's QAT)."""
    return x + (qdq(x) - x).detach()


@functools.lru_cache(maxsize=8)
def _hadamard_matrix(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of order n (a power of two), scaled by n^-1/2 so it is orthogonal."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """x @ H over the last dim (the indexer's rotation before FP4: it spreads outliers across the block)."""
    h = _hadamard_matrix(x.shape[-1]).to(device=x.device, dtype=x.dtype)
    return x @ h


def simulate_kv_fp8(kv: torch.Tensor, rope_dim: int, block: int) -> torch.Tensor:
    """The reference's K=V precision: FP8 on the non-RoPE dims, RoPE dims untouched (straight-through)."""
    nope = straight_through(kv[..., :-rope_dim], lambda t: fp8_e4m3_qdq(t, block))
    return torch.cat([nope, kv[..., -rope_dim:]], dim=-1)


def simulate_indexer_fp4(x: torch.Tensor, block: int) -> torch.Tensor:
    """The reference's indexer q/k precision: Hadamard rotation, then FP4 (straight-through)."""
    return straight_through(hadamard_rotate(x), lambda t: fp4_e2m1_qdq(t, block))
