"""Manifold-Constrained Hyper-Connections, the residual stream of DeepSeek-V4 (spec section 3).

The residual is n parallel streams X [s, b, n, d]. Around each sublayer F (attention or MoE), paper Eq. 3-7:
    X_{l+1} = B_l X_l + C_l F_l(A_l X_l)
with A (pre, 1 x n), C (post, n x 1) and B (res, n x n) computed from the normalised flattened streams:
    X^ = RMSNorm(vec X);  A = sigmoid(a_pre * X^ W_pre + S_pre) + eps;  C = 2 sigmoid(a_post * X^ W_post + S_post);
    B = SinkhornKnopp(a_res * X^ W_res + S_res)  (row softmax, then alternating column/row normalisation,
                                                  t_max iterations in all: doubly stochastic, ||B||_2 <= 1).
In the reference's code form the three W are one `fn` [(2 + n) n, n d], S is `base`, the three alpha are `scale`.
The new streams are X'[j] = C[j] F(x) + sum_i B[i, j] X[i], i.e. B^T X (note the transpose).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .norm import rms_normalize


def sinkhorn_knopp(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Project exp(logits) [..., n, n] towards the doubly stochastic matrices (reference `hc_split_sinkhorn`).

    The first iteration is a row softmax (+ eps) followed by a column normalisation; each further one normalises
    rows then columns. `iters` counts all of them (V4: 20).
    """
    m = torch.softmax(logits, dim=-1) + eps
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


class HyperConnection(nn.Module):
    """mHC around one sublayer: computes (pre, post, res) from the streams, collapses them, and re-expands.

    Parameters are fp32 (reference): `fn` = [W_pre; W_post; W_res] with the RMSNorm gain folded in, `base` = S,
    `scale` = (alpha_pre, alpha_post, alpha_res). Init as in `transformers` (fn ~ N(0, std), base 0, scale 1):
    DeepSeek's initial values are not published (spec: NOT FOUND).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = cfg.hc_mult
        self.n, self.iters, self.hc_eps, self.norm_eps = n, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
        self.fn = nn.Parameter(torch.randn((2 + n) * n, n * cfg.hidden_size) * cfg.init_std)
        self.base = nn.Parameter(torch.zeros((2 + n) * n))
        self.scale = nn.Parameter(torch.ones(3))

    def weights(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [s, b, n, d] -> pre [s, b, n], post [s, b, n], res [s, b, n, n] (all fp32)."""
        n = self.n
        mixes = F.linear(rms_normalize(streams.flatten(-2).float(), self.norm_eps), self.fn.float())
        pre, post, res = mixes.split([n, n, n * n], dim=-1)
        base_pre, base_post, base_res = self.base.split([n, n, n * n])
        pre = torch.sigmoid(pre * self.scale[0] + base_pre) + self.hc_eps
        post = 2 * torch.sigmoid(post * self.scale[1] + base_post)
        res = sinkhorn_knopp((res * self.scale[2] + base_res).unflatten(-1, (n, n)), self.iters, self.hc_eps)
        return pre, post, res

    def collapse(self, streams: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """The sublayer input A X = sum_i pre[i] X[i]: [s, b, d]."""
        return (pre.unsqueeze(-1) * streams).sum(dim=-2).to(streams.dtype)

    def expand(self, out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        """X' = C F(x) + B^T X: [s, b, n, d]."""
        dtype = streams.dtype
        return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + res.to(dtype).transpose(-1, -2) @ streams


class HyperHead(nn.Module):
    """`hc_head`: the final collapse of the n streams with pre-style weights sigmoid(.) + eps (no res/post)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = cfg.hc_mult
        self.hc_eps, self.norm_eps = cfg.hc_eps, cfg.rms_norm_eps
        self.fn = nn.Parameter(torch.randn(n, n * cfg.hidden_size) * cfg.init_std)
        self.base = nn.Parameter(torch.zeros(n))
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        """[s, b, n, d] -> [s, b, d]."""
        mixes = F.linear(rms_normalize(streams.flatten(-2).float(), self.norm_eps), self.fn.float())
        pre = torch.sigmoid(mixes * self.scale + self.base) + self.hc_eps
        return (pre.unsqueeze(-1) * streams).sum(dim=-2).to(streams.dtype)
