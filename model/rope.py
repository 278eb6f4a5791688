"""Interleaved rotary position embedding on the *last* `rope_head_dim` dims, with optional YaRN (spec section 4).

DeepSeek-V4 rotates adjacent channel pairs (2i, 2i+1) as complex numbers (the reference's `view_as_complex`), only
in the trailing rope slice of each head. Sliding-window-only layers use base `rope_theta` without scaling; CSA/HCA
layers, their compressors and indexers use base `compress_rope_theta` with YaRN. Like the reference and
`transformers`, YaRN's attention scale (mscale) is *not* applied: cos/sin are unscaled.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig


def default_inv_freq(dim: int, base: float) -> torch.Tensor:
    """theta_i = base^(-2i/dim), i = 0 .. dim/2-1."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def yarn_inv_freq(dim: int, base: float, factor: float, original_max_position: int, beta_fast: float,
                  beta_slow: float) -> torch.Tensor:
    """YaRN (arXiv 2309.00071) frequency interpolation, with DeepSeek's floor/ceil of the correction range.

    Dimensions whose wavelength is short compared to the original context keep their frequency
    (extrapolation); long-wavelength dimensions are divided by `factor` (interpolation); a linear ramp blends
    between the two over the correction range [low, high].
    """

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(original_max_position / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = default_inv_freq(dim, base)
    interpolation = extrapolation / factor
    return interpolation * ramp + extrapolation * (1 - ramp)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the two rope types of V4: 'main' (SWA layers) and 'compress' (CSA/HCA layers)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.rope_dim = cfg.rope_head_dim
        self.register_buffer("main_inv_freq", default_inv_freq(cfg.rope_head_dim, cfg.rope_theta), persistent=False)
        if cfg.yarn_factor > 1.0:
            compress = yarn_inv_freq(cfg.rope_head_dim, cfg.compress_rope_theta, cfg.yarn_factor,
                                     cfg.yarn_original_max_position, cfg.yarn_beta_fast, cfg.yarn_beta_slow)
        else:
            compress = default_inv_freq(cfg.rope_head_dim, cfg.compress_rope_theta)
        self.register_buffer("compress_inv_freq", compress, persistent=False)

    def forward(self, positions: torch.Tensor, rope_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] -> (cos, sin), each [..., rope_dim/2] in fp32."""
        inv_freq = self.main_inv_freq if rope_type == "main" else self.compress_inv_freq
        freqs = positions.float().unsqueeze(-1) * inv_freq  # [..., rope_dim/2]
        return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last 2*cos.shape[-1] dims of x in interleaved pairs; `inverse` applies the conjugate rotation.

    x: [s, ..., D]; cos/sin: [s, rope/2], broadcast over the middle dims. The inverse rotation at the query
    position is what V4 applies to the attention output: since K = V, values carry absolute positions, and
    de-rotating the output leaves only relative ones (spec section 4, "Output").
    """
    rope = 2 * cos.shape[-1]
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    cos, sin = cos.view(shape), sin.view(shape)
    if inverse:
        sin = -sin
    nope, rot = x[..., :-rope], x[..., -rope:].float()
    a, b = rot[..., 0::2], rot[..., 1::2]  # real and imaginary parts of each pair
    rotated = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    return torch.cat([nope, rotated.to(x.dtype)], dim=-1)
