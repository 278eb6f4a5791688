"""Manifold-Constrained Hyper-Connections, the residual stream of DeepSeek-V4 (spec section 3).

The residual is n parallel streams X [s, b, n, d]. Around each sublayer F (attention or MoE), paper Eq. 3-7:
    X_{l+1} = B_l X_l + C_l F_l(A_l X_l)
with A (pre, 1 x n), C (post, n x 1) and B (res, n x n) computed from the normalised flattened streams:
    X^ = RMSNorm(vec X);  A = sigmoid(a_pre * X^ W_pre + S_pre) + eps;  C = 2 sigmoid(a_post * X^ W_post + S_post);
    B = SinkhornKnopp(a_res * X^ W_res + S_res)  (row softmax, then alternating column/row normalisation,
                                                  t_max iterations in all: doubly stochastic, ||B||_2 <= 1).
In the reference's code form the three W are one `fn` [(2 + n) n, n d], S is `base`, the three alpha are `scale`.
The new streams are X'[j] = C[j] F(x) + sum_i B[i, j] X[i], i.e. B^T X (note the transpose).

How it is computed (the math is the one above; the layout is chosen for the CPU, where mHC was the largest cost of
a debug-model step, `bench/RESULTS.md`):
- the RMS normalisation is applied after the projection, X^ W = (vec X W) / rms(vec X), so no normalised copy of
  the streams is made;
- the (2 + n) n mixing coefficients of every token are laid out token-last, [(2 + n) n, tokens], so the sigmoids
  and the 2 t_max Sinkhorn normalisations run over long contiguous rows instead of [tokens, 4, 4] tiles;
- the expansion is one batched product per token, X' = [B^T | C] [X; F(x)] ([n, n + 1] @ [n + 1, d]).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .config import ModelConfig


def sinkhorn_knopp(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Project exp(logits) [..., n, n] towards the doubly stochastic matrices (reference `hc_split_sinkhorn`).

    The first iteration is a row softmax (+ eps) followed by a column normalisation; each further one normalises
    rows then columns. `iters` counts all of them (V4: 20).
    """
    return sinkhorn_knopp_leading(logits.movedim((-2, -1), (0, 1)), iters, eps).movedim((0, 1), (-2, -1))


def sinkhorn_knopp_leading(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """`sinkhorn_knopp` with the matrix dims leading: logits [n (rows), n (columns), ...]."""
    return _SinkhornKnopp.apply(logits, iters, eps)


class _SinkhornKnopp(torch.autograd.Function):
    """The t_max normalisations with a hand-written backward (autograd's costs about twice the ops).

    Each step is m' = m / (sum_axis m + eps); its backward is dm = (dm' - sum_axis(dm' * m')) / (sum_axis m + eps).
    The softmax's backward is dz = p * (dp - sum_row(dp * p)). Saves every iterate, as autograd would.
    """

    @staticmethod
    def forward(ctx, logits, iters, eps):
        p = torch.softmax(logits, dim=1)  # row softmax (rows are dim 0: the sum runs over the columns, dim 1)
        m = p + eps
        axes = [0] + [1, 0] * (iters - 1)  # column normalisation first, then (row, column) pairs
        iterates, denominators = [], []
        for axis in axes:
            den = m.sum(dim=axis, keepdim=True) + eps
            m = m / den
            iterates.append(m)
            denominators.append(den)
        ctx.axes = axes
        ctx.save_for_backward(p, *iterates, *denominators)
        return m

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        p, *saved = ctx.saved_tensors
        k = len(ctx.axes)
        grad = grad.contiguous()  # arrives token-major from the [s, b, n, n] view of the result
        for axis, m, den in zip(reversed(ctx.axes), reversed(saved[:k]), reversed(saved[k:])):
            grad = (grad - (grad * m).sum(dim=axis, keepdim=True)) / den
        return p * (grad - (grad * p).sum(dim=1, keepdim=True)), None, None


def mixing_logits(streams: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """alpha * (RMSNorm(vec X) W) + S, token-last: streams [s, b, n, d] -> [k, s * b] fp32 (k = rows of fn).

    `scale` [k] holds each row's alpha. The norm is applied after the projection: (x W) / rms(x).
    """
    x = streams.flatten(-2).float().flatten(0, -2)  # [s b, n d]
    inv_rms = torch.rsqrt(torch.linalg.vecdot(x, x) / x.shape[-1] + eps)  # [s b]
    return (fn.float() @ x.t()) * inv_rms * scale.unsqueeze(-1) + base.unsqueeze(-1)


def collapse(streams: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """A X = sum_i pre[i] X[i]: streams [s, b, n, d], pre [s, b, n] fp32 -> [s, b, d] in the streams' dtype."""
    return (pre.to(streams.dtype).contiguous().unsqueeze(-2) @ streams).squeeze(-2)


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
        n, sb = self.n, streams.shape[:-2]
        alpha = torch.cat([self.scale[:1].expand(n), self.scale[1:2].expand(n), self.scale[2:].expand(n * n)])
        logits = mixing_logits(streams, self.fn, alpha, self.base, self.norm_eps)  # [(2 + n) n, s b]
        pre = torch.sigmoid(logits[:n]) + self.hc_eps
        post = 2 * torch.sigmoid(logits[n:2 * n])
        res = sinkhorn_knopp_leading(logits[2 * n:].unflatten(0, (n, n)), self.iters, self.hc_eps)
        return pre.t().unflatten(0, sb), post.t().unflatten(0, sb), res.permute(2, 0, 1).unflatten(0, sb)

    def collapse(self, streams: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """The sublayer input A X = sum_i pre[i] X[i]: [s, b, d]."""
        return collapse(streams, pre)

    def expand(self, out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        """X' = C F(x) + B^T X = [B^T | C] [X; F(x)]: [s, b, n, d]."""
        dtype = streams.dtype
        mix = torch.cat([res.to(dtype).transpose(-1, -2), post.to(dtype).unsqueeze(-1)], dim=-1)  # [s, b, n, n + 1]
        return mix @ torch.cat([streams, out.unsqueeze(-2)], dim=-2)


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
        logits = mixing_logits(streams, self.fn, self.scale.expand(self.fn.shape[0]), self.base, self.norm_eps)
        pre = torch.sigmoid(logits) + self.hc_eps  # [n, s b]
        return collapse(streams, pre.t().unflatten(0, streams.shape[:-2]))
