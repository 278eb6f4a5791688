"""RMS normalisations used throughout DeepSeek-V4 (spec sections 3 and 4)."""

from __future__ import annotations

import torch
from torch import nn


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dim, computed in fp32, returned in x's dtype.

    The weightless form is the per-head query norm (`q *= rsqrt(mean(q^2) + eps)` in the reference). (mHC's input
    norm, whose weight the reference folds into `hc_fn`, is applied after its projection: `mhc.mixing_logits`.)
    """
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learned gain kept in fp32 (the reference keeps all norm weights in fp32)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)
