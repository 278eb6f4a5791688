"""The model's primitives against naive references written out here (explicit loops and spec formulas).

Covered: RMSNorm, interleaved RoPE and YaRN, the sink attention, the sliding window, the KV compressor (HCA and
overlapped CSA), the lightning indexer and its top-k, Sinkhorn-Knopp, the mHC hyper-connections, and the FP8/FP4
quantize-dequantize simulation. References run in float64 where the module runs in fp32; activations are
sequence-first [s, b, ...].
"""

from __future__ import annotations

import math

import pytest
import torch

from dsv4.model.attention import sink_attention, sliding_window_mask
from dsv4.model.compressor import Compressor, LightningIndexer, compressed_visibility, select_topk
from dsv4.model.mhc import HyperConnection, HyperHead, sinkhorn_knopp
from dsv4.model.norm import RMSNorm, rms_normalize
from dsv4.model.quant import fp4_e2m1_qdq, fp8_e4m3_qdq, hadamard_rotate, straight_through
from dsv4.model.rope import RotaryEmbedding, apply_rope, default_inv_freq, yarn_inv_freq
from dsv4.parallel.layers import make_layer_context

# --- naive references ---------------------------------------------------------------------------------------------


def ref_rms(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, in float64."""
    x = x.double()
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight.double()


def ref_inv_freq(dim: int, base: float) -> torch.Tensor:
    """theta_j = base^(-2j/dim), one by one."""
    return torch.tensor([base ** (-2.0 * j / dim) for j in range(dim // 2)], dtype=torch.float64)


def ref_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Interleaved RoPE on the last 2*len(inv_freq) dims: adjacent pairs as complex numbers times e^{+-i pos theta}.

    x [s, ..., D], positions [s]; float64 result.
    """
    x = x.double()
    r = 2 * inv_freq.numel()
    pairs = torch.view_as_complex(x[..., -r:].reshape(*x.shape[:-1], r // 2, 2).contiguous())
    angle = positions.double().unsqueeze(-1) * inv_freq.double()  # [s, r/2]
    angle = angle.view(angle.shape[0], *([1] * (x.dim() - 2)), r // 2)
    rot = torch.polar(torch.ones_like(angle), -angle if inverse else angle)
    rotated = torch.view_as_real(pairs * rot).flatten(-2)
    return torch.cat([x[..., :-r], rotated], dim=-1)


def ref_sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Spec section 3 with explicit loops over the rows and columns of one n x n matrix (float64)."""
    a = logits.double().tolist()
    n = len(a)
    m = [[0.0] * n for _ in range(n)]
    for i in range(n):  # row softmax + eps
        top = max(a[i])
        z = sum(math.exp(v - top) for v in a[i])
        for j in range(n):
            m[i][j] = math.exp(a[i][j] - top) / z + eps

    def normalise_columns():
        for j in range(n):
            c = sum(m[i][j] for i in range(n)) + eps
            for i in range(n):
                m[i][j] /= c

    def normalise_rows():
        for i in range(n):
            r = sum(m[i]) + eps
            for j in range(n):
                m[i][j] /= r

    normalise_columns()
    for _ in range(iters - 1):
        normalise_rows()
        normalise_columns()
    return torch.tensor(m, dtype=torch.float64)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-x))


@pytest.fixture()
def debug_cfg(debug_cfg):
    """The debug preset with the quantization simulation off: the references here are exact arithmetic (the
    simulation itself is checked on its own, below)."""
    return debug_cfg.replace(quant_sim=False)


@pytest.fixture()
def ctx(groups):
    return make_layer_context(groups.tp, 0.02)


# --- RMSNorm ------------------------------------------------------------------------------------------------------


def test_rms_normalize_matches_formula():
    """rms_normalize(x) = x / sqrt(mean(x^2) + eps) over the last dim, returned in x's dtype."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 16) * 3
    y = rms_normalize(x, 1e-6)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref_rms(x, 1e-6), rtol=1e-6, atol=1e-6)
    assert rms_normalize(x.bfloat16(), 1e-6).dtype == torch.bfloat16


def test_rmsnorm_matches_formula_with_weight():
    """RMSNorm(x) = weight * x / sqrt(mean(x^2) + eps); a large eps is visible in the result."""
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=0.5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(4, 2, 16)
    torch.testing.assert_close(norm(x).double(), ref_rms(x, 0.5, norm.weight), rtol=1e-6, atol=1e-6)


# --- RoPE ---------------------------------------------------------------------------------------------------------


def test_apply_rope_matches_complex_rotation_of_last_dims():
    """apply_rope rotates adjacent pairs of the last rope dims by e^{i pos theta_j}; the leading dims are untouched."""
    torch.manual_seed(0)
    s, b, h, D, r = 7, 2, 3, 24, 8
    x = torch.randn(s, b, h, D)
    pos = torch.arange(s) * 5 + 3
    inv = ref_inv_freq(r, 10000.0)
    freqs = pos.double().unsqueeze(-1) * inv
    y = apply_rope(x, freqs.cos().float(), freqs.sin().float())
    torch.testing.assert_close(y.double(), ref_rope(x, pos, inv), rtol=1e-5, atol=1e-5)
    assert torch.equal(y[..., :-r], x[..., :-r])


def test_apply_rope_inverse_is_conjugate_and_undoes_rotation():
    """inverse=True rotates by e^{-i pos theta_j}, and applying it after the forward rotation gives x back."""
    torch.manual_seed(0)
    s, D, r = 9, 16, 16
    x = torch.randn(s, 2, D)
    pos = torch.arange(s) * 11
    inv = ref_inv_freq(r, 10000.0)
    freqs = pos.double().unsqueeze(-1) * inv
    cos, sin = freqs.cos().float(), freqs.sin().float()
    y = apply_rope(x, cos, sin, inverse=True)
    torch.testing.assert_close(y.double(), ref_rope(x, pos, inv, inverse=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_rope(apply_rope(x, cos, sin), cos, sin, inverse=True), x, rtol=1e-5, atol=1e-5)


def test_apply_rope_preserves_norm():
    """A rotation preserves the norm of every head vector."""
    torch.manual_seed(0)
    x = torch.randn(20, 3, 32)
    pos = torch.arange(20) * 37
    freqs = pos.double().unsqueeze(-1) * ref_inv_freq(32, 10000.0)
    y = apply_rope(x, freqs.cos().float(), freqs.sin().float())
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position(debug_cfg):
    """<rope(q, t1), rope(k, t2)> depends only on t1 - t2 (both rope types of RotaryEmbedding)."""
    torch.manual_seed(0)
    rope = RotaryEmbedding(debug_cfg)
    D = debug_cfg.head_dim
    q, k = torch.randn(D), torch.randn(D)
    for rope_type in ("main", "compress"):
        def score(t1: int, t2: int) -> float:
            cos, sin = rope(torch.tensor([t1, t2]), rope_type)
            rq = apply_rope(q.view(1, D), cos[:1], sin[:1])
            rk = apply_rope(k.view(1, D), cos[1:], sin[1:])
            return float((rq * rk).sum())

        for t1, t2 in [(5, 2), (17, 30), (0, 9)]:
            base = score(t1, t2)
            for shift in (1, 13, 100):
                assert score(t1 + shift, t2 + shift) == pytest.approx(base, rel=1e-4, abs=1e-4)
        assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-4, abs=1e-4)  # and it does depend on t1 - t2


def test_default_inv_freq_matches_formula():
    """default_inv_freq(dim, base)[j] = base^(-2j/dim)."""
    torch.testing.assert_close(default_inv_freq(64, 160000.0).double(), ref_inv_freq(64, 160000.0), rtol=1e-6,
                               atol=0)


def test_yarn_factor_one_is_default_inv_freq():
    """YaRN with factor 1 leaves every frequency unchanged."""
    torch.testing.assert_close(yarn_inv_freq(64, 160000.0, 1.0, 65536, 32.0, 1.0), default_inv_freq(64, 160000.0),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("dim,base,factor,orig", [(64, 160000.0, 16.0, 65536), (8, 160000.0, 4.0, 256),
                                                  (32, 10000.0, 8.0, 4096)])
def test_yarn_extrapolates_high_and_interpolates_low_frequencies(dim, base, factor, orig):
    """YaRN by rotation counts r_j = L theta_j / (2 pi) over the original context L: dims with r_j >= beta_fast keep
    theta_j, dims with r_j <= beta_slow get theta_j / factor, and the ones between get a value in between that
    moves monotonically from the first to the second."""
    beta_fast, beta_slow = 32.0, 1.0
    theta = ref_inv_freq(dim, base)
    got = yarn_inv_freq(dim, base, factor, orig, beta_fast, beta_slow).double()
    rotations = orig * theta / (2 * math.pi)
    fast, slow = rotations >= beta_fast, rotations <= beta_slow
    assert fast.any() and slow.any()  # both regions exist for these parameters
    torch.testing.assert_close(got[fast], theta[fast], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[slow], theta[slow] / factor, rtol=1e-6, atol=0)
    # Blend weight of the interpolated frequency: 0 = theta, 1 = theta / factor.
    blend = (theta - got) / (theta - theta / factor)
    assert (blend >= -1e-6).all() and (blend <= 1 + 1e-6).all()
    assert (blend[1:] - blend[:-1] >= -1e-6).all()


def test_rotary_embedding_tables(debug_cfg):
    """RotaryEmbedding: 'main' uses rope_theta without scaling, 'compress' uses compress_rope_theta with YaRN;
    cos/sin are those of pos * theta_j (no mscale)."""
    cfg = debug_cfg
    rope = RotaryEmbedding(cfg)
    pos = torch.tensor([0, 1, 7, 100])
    cos, sin = rope(pos, "main")
    angle = pos.double().unsqueeze(-1) * ref_inv_freq(cfg.rope_head_dim, cfg.rope_theta)
    torch.testing.assert_close(cos.double(), angle.cos(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin.double(), angle.sin(), rtol=1e-5, atol=1e-5)
    yarn = yarn_inv_freq(cfg.rope_head_dim, cfg.compress_rope_theta, cfg.yarn_factor, cfg.yarn_original_max_position,
                         cfg.yarn_beta_fast, cfg.yarn_beta_slow)
    torch.testing.assert_close(rope.compress_inv_freq, yarn)
    assert not torch.allclose(yarn.double(), ref_inv_freq(cfg.rope_head_dim, cfg.compress_rope_theta))


# --- sink attention and the sliding window ------------------------------------------------------------------------


def ref_sink_attention(q, kv, mask, sinks, scale):
    """o_h = sum_k e^{s_k} v_k / (sum_k e^{s_k} + e^{sink_h}), one query at a time (float64)."""
    b, h, s, D = q.shape
    K = kv.shape[1]
    out = torch.zeros(b, h, s, D, dtype=torch.float64)
    probs = torch.zeros(b, h, s, K, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for t in range(s):
                keys = [k for k in range(K) if mask[min(bi, mask.shape[0] - 1), t, k]]
                logits = {k: float(q[bi, hi, t].double() @ kv[bi, k].double()) * scale for k in keys}
                top = max(list(logits.values()) + [float(sinks[hi])])
                denom = sum(math.exp(v - top) for v in logits.values()) + math.exp(float(sinks[hi]) - top)
                for k in keys:
                    p = math.exp(logits[k] - top) / denom
                    probs[bi, hi, t, k] = p
                    out[bi, hi, t] += p * kv[bi, k].double()
    return out, probs


def _attention_inputs(seed=0, b=2, h=3, s=6, K=9, D=8):
    torch.manual_seed(seed)
    q, kv = torch.randn(b, h, s, D), torch.randn(b, K, D)
    mask = torch.rand(b, s, K) < 0.6
    mask[..., 0] = True  # every query sees at least one key
    return q, kv, mask


def test_sink_attention_matches_explicit_formula():
    """Output and probabilities equal the sink formula computed query by query; masked keys get probability 0."""
    q, kv, mask = _attention_inputs()
    sinks = torch.tensor([0.5, -1.0, 2.0])
    out, probs = sink_attention(q, kv, mask, sinks, scale=0.7)
    ref_out, ref_probs = ref_sink_attention(q, kv, mask, sinks, 0.7)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.double(), ref_probs, rtol=1e-5, atol=1e-7)
    assert (probs.masked_select(~mask.unsqueeze(1).expand_as(probs)) == 0).all()


def test_sink_attention_ignores_masked_keys():
    """Changing a masked-out key/value row does not change the output."""
    q, kv, mask = _attention_inputs(seed=1)
    mask[:, :, 4] = False
    sinks = torch.zeros(3)
    out, _ = sink_attention(q, kv, mask, sinks, 0.5)
    kv2 = kv.clone()
    kv2[:, 4] = torch.randn(kv.shape[0], kv.shape[-1]) * 100
    out2, _ = sink_attention(q, kv2, mask, sinks, 0.5)
    assert torch.equal(out, out2)


def test_sink_attention_mass_below_one_with_large_sink():
    """The sink takes mass from the denominator only: total probability = sum e^s / (sum e^s + e^sink) < 1."""
    q, kv, mask = _attention_inputs(seed=2)
    sinks = torch.tensor([3.0, 5.0, 8.0])
    _, probs = sink_attention(q, kv, mask, sinks, 0.5)
    total = probs.sum(-1)
    assert (total < 1).all()
    assert (total[:, 2] < total[:, 0]).all()  # a larger sink takes more mass
    logits = (torch.einsum("bhsd,bkd->bhsk", q.double(), kv.double()) * 0.5).masked_fill(~mask.unsqueeze(1),
                                                                                        float("-inf"))
    e = logits.exp().sum(-1)
    torch.testing.assert_close(total.double(), e / (e + sinks.double().exp().view(1, -1, 1)), rtol=1e-5, atol=1e-7)


def test_sink_attention_without_sink_is_softmax_attention():
    """With sink = -inf the sink attention is ordinary masked softmax attention (mass exactly 1)."""
    q, kv, mask = _attention_inputs(seed=3)
    sinks = torch.full((3,), float("-inf"))
    out, probs = sink_attention(q, kv, mask, sinks, 0.3)
    logits = (torch.einsum("bhsd,bkd->bhsk", q, kv) * 0.3).masked_fill(~mask.unsqueeze(1), float("-inf"))
    p = torch.softmax(logits.double(), dim=-1)
    torch.testing.assert_close(probs.double(), p, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.double(), p @ kv.double().unsqueeze(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("s,window", [(10, 3), (10, 1), (6, 10), (32, 32)])
def test_sliding_window_mask_brute_force(s, window):
    """Query t sees exactly the keys t-W+1 .. t (clipped at 0)."""
    mask = sliding_window_mask(s, window)
    for t in range(s):
        for j in range(s):
            assert bool(mask[t, j]) == (max(0, t - window + 1) <= j <= t), (t, j)


# --- compressor ---------------------------------------------------------------------------------------------------


def _randomize_compressor(comp: Compressor, gate_gain: float = 20.0) -> None:
    """Non-trivial ape, norm gain and gates (the default init has ape = 0, gain = 1 and nearly uniform gates)."""
    with torch.no_grad():
        comp.ape.copy_(torch.randn_like(comp.ape))
        comp.norm.weight.copy_(1 + 0.5 * torch.randn_like(comp.norm.weight))
        comp.wgate.weight.mul_(gate_gain)


def ref_compress(x, wkv, wgate, ape, norm_w, eps, ratio, head_dim, overlap, inv_freq):
    """Compressed entries [n, b, head_dim] with explicit loops over entries, channels and pooled positions."""
    s, b, _ = x.shape
    m, hd = ratio, head_dim
    n = s // m
    C = x.double() @ wkv.double().t()  # [s, b, width]
    Z = x.double() @ wgate.double().t()
    ape = ape.double()
    out = torch.zeros(n, b, hd, dtype=torch.float64)
    for i in range(n):
        for bi in range(b):
            for c in range(hd):
                logits, values = [], []
                if overlap and i > 0:  # block i-1 through the first half of the projection
                    for j in range(m):
                        tok = (i - 1) * m + j
                        logits.append(Z[tok, bi, c] + ape[j, c])
                        values.append(C[tok, bi, c])
                off = hd if overlap else 0  # block i through the second half (or the only one)
                for j in range(m):
                    tok = i * m + j
                    logits.append(Z[tok, bi, off + c] + ape[j, off + c])
                    values.append(C[tok, bi, off + c])
                logits = torch.stack(logits)
                w = torch.exp(logits - logits.max())
                w = w / w.sum()
                out[i, bi, c] = (w * torch.stack(values)).sum()
    out = ref_rms(out, eps, norm_w)
    return ref_rope(out, torch.arange(n) * m, inv_freq)


@pytest.mark.parametrize("kind", ["hca", "csa"])
def test_compressor_matches_per_block_loop(debug_cfg, ctx, kind):
    """HCA: entry i = RMSNorm(sum_{j in block i} softmax_j(Z_j + ape_j) * C_j) per channel, then RoPE at i*m.
    CSA (overlap): entry i pools block i-1 through channels [:hd] and block i through [hd:], one joint softmax
    over the 2m positions; block 0 pools only its own m tokens."""
    cfg = debug_cfg
    ratio, overlap = (cfg.csa_ratio, True) if kind == "csa" else (cfg.hca_ratio, False)
    torch.manual_seed(0)
    comp = Compressor(cfg, ctx, ratio, cfg.head_dim, overlap)
    _randomize_compressor(comp)
    rope = RotaryEmbedding(cfg)
    s, b = 4 * ratio, 2
    x = torch.randn(s, b, cfg.hidden_size)
    got = comp(x, rope)
    assert got.shape == (s // ratio, b, cfg.head_dim)
    ref = ref_compress(x, comp.wkv.weight, comp.wgate.weight, comp.ape, comp.norm.weight, cfg.rms_norm_eps, ratio,
                       cfg.head_dim, overlap, rope.compress_inv_freq)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_csa_entry_zero_only_pools_its_own_block(debug_cfg, ctx):
    """Overlapped compressor: entry 0 depends only on tokens 0..m-1; entry i on tokens (i-1)m .. (i+1)m-1."""
    cfg = debug_cfg
    m = cfg.csa_ratio
    torch.manual_seed(0)
    comp = Compressor(cfg, ctx, m, cfg.head_dim, overlap=True)
    _randomize_compressor(comp)
    rope = RotaryEmbedding(cfg)
    x = torch.randn(4 * m, 1, cfg.hidden_size)
    base = comp(x, rope)
    x2 = x.clone()
    x2[m:2 * m] += torch.randn(m, 1, cfg.hidden_size)  # block 1 changes
    out = comp(x2, rope)
    assert torch.equal(out[0], base[0])
    assert not torch.allclose(out[1], base[1]) and not torch.allclose(out[2], base[2])
    assert torch.equal(out[3], base[3])


@pytest.mark.parametrize("kind", ["hca", "csa"])
def test_compressor_drops_trailing_partial_block(debug_cfg, ctx, kind):
    """s // m entries; the tokens of a trailing partial block do not influence anything."""
    cfg = debug_cfg
    ratio, overlap = (cfg.csa_ratio, True) if kind == "csa" else (cfg.hca_ratio, False)
    torch.manual_seed(0)
    comp = Compressor(cfg, ctx, ratio, cfg.head_dim, overlap)
    _randomize_compressor(comp)
    rope = RotaryEmbedding(cfg)
    full = 3 * ratio
    x = torch.randn(full + ratio - 1, 2, cfg.hidden_size)
    out = comp(x, rope)
    assert out.shape[0] == 3
    assert torch.equal(out, comp(x[:full], rope))


@pytest.mark.parametrize("s,m", [(32, 4), (37, 4), (64, 16), (20, 16)])
def test_compressed_visibility_brute_force(s, m):
    """compressed_visibility(s, T, m)[t, i] == (i < (t+1)//m): entry i is seen only once its block is complete."""
    T = s // m
    vis = compressed_visibility(s, T, m)
    assert vis.shape == (s, T)
    for t in range(s):
        for i in range(T):
            complete = (i + 1) * m - 1 <= t  # the last token of block i is at or before t
            assert bool(vis[t, i]) == complete == (i < (t + 1) // m), (t, i)


@pytest.mark.parametrize("for_indexer", [False, True])
def test_compressor_quant_sim_path(debug_cfg, ctx, for_indexer):
    """quant_sim: attention KV gets FP8 (quant_fp8_block tiles) on the non-rope dims, rope dims untouched; the
    indexer's keys get a Hadamard rotation then FP4 (quant_fp4_block tiles). Same weights with and without."""
    cfg = debug_cfg
    torch.manual_seed(0)
    hd = cfg.index_head_dim if for_indexer else cfg.head_dim
    plain = Compressor(cfg, ctx, cfg.csa_ratio, hd, True, for_indexer=for_indexer)
    _randomize_compressor(plain)
    sim = Compressor(cfg.replace(quant_sim=True), ctx, cfg.csa_ratio, hd, True, for_indexer=for_indexer)
    sim.load_state_dict(plain.state_dict())
    rope = RotaryEmbedding(cfg)
    x = torch.randn(32, 2, cfg.hidden_size)
    c, q = plain(x, rope), sim(x, rope)
    r = cfg.rope_head_dim
    if for_indexer:
        torch.testing.assert_close(q, fp4_e2m1_qdq(hadamard_rotate(c), cfg.quant_fp4_block), rtol=0, atol=0)
    else:
        assert torch.equal(q[..., -r:], c[..., -r:])
        torch.testing.assert_close(q[..., :-r], fp8_e4m3_qdq(c[..., :-r], cfg.quant_fp8_block), rtol=0, atol=0)
    assert not torch.equal(q, c)


# --- lightning indexer --------------------------------------------------------------------------------------------


def test_lightning_indexer_scores_brute_force(debug_cfg, ctx):
    """I[t, s] = sum_h w[t,h] * relu(q[t,h] . K[s]) * head_dim^-0.5, w = weights_proj(x) * n_heads^-0.5,
    q = rope(wq_b(q_latent)) on its last rope dims (compress rope at the query position)."""
    cfg = debug_cfg
    torch.manual_seed(0)
    idx = LightningIndexer(cfg, ctx)
    _randomize_compressor(idx.compressor)
    rope = RotaryEmbedding(cfg)
    s, b = 24, 2
    x = torch.randn(s, b, cfg.hidden_size)
    q_latent = torch.randn(s, b, cfg.q_lora_rank)
    scores = idx(x, q_latent, rope)
    keys = idx.compressor(x, rope).double()  # [T, b, c]
    T = keys.shape[0]
    assert scores.shape == (b, s, T)
    H, hd = cfg.index_n_heads, cfg.index_head_dim
    q = (q_latent.double() @ idx.wq_b.weight.double().t()).view(s, b, H, hd)
    q = ref_rope(q, torch.arange(s), rope.compress_inv_freq)
    w = (x.double() @ idx.weights_proj.weight.double().t()) * H ** -0.5  # [s, b, H]
    ref = torch.zeros(b, s, T, dtype=torch.float64)
    for bi in range(b):
        for t in range(s):
            for e in range(T):
                ref[bi, t, e] = sum(w[t, bi, h] * torch.relu(q[t, bi, h] @ keys[e, bi]) for h in range(H)) * hd ** -0.5
    assert (ref != 0).any() and (ref < 0).any()  # ReLU and signed weights both matter
    torch.testing.assert_close(scores.double(), ref, rtol=1e-4, atol=1e-5)


def ref_topk_mask(scores, visible, k):
    b, s, T = scores.shape
    mask = torch.zeros(b, s, T, dtype=torch.bool)
    for bi in range(b):
        for t in range(s):
            vis = [e for e in range(T) if visible[t, e]]
            chosen = sorted(vis, key=lambda e: -float(scores[bi, t, e]))[:k]
            for e in chosen:
                mask[bi, t, e] = True
    return mask


def test_select_topk_brute_force():
    """select_topk keeps the k highest-scoring visible entries of each query (per-query sort)."""
    torch.manual_seed(0)
    s, m, k = 40, 4, 3
    T = s // m
    scores = torch.randn(2, s, T)
    # The most attractive entries are invisible ones: a correct top-k must skip them.
    scores[..., T // 2:] += 10
    visible = torch.tensor([[i < (t + 1) // m for i in range(T)] for t in range(s)])
    got = select_topk(scores, visible, k)
    assert torch.equal(got, ref_topk_mask(scores, visible, k))


def test_select_topk_few_visible_keeps_all_and_no_future():
    """Queries with fewer than k visible entries keep exactly their visible ones, never a future entry;
    queries with at least k keep exactly k; k larger than T is allowed."""
    torch.manual_seed(1)
    s, m = 32, 4
    T = s // m
    scores = torch.randn(3, s, T) + torch.arange(T)  # later (invisible) entries score higher
    visible = compressed_visibility(s, T, m)
    for k in (3, T, T + 5):
        got = select_topk(scores, visible, k)
        assert not (got & ~visible).any()
        n_vis = visible.sum(-1)  # [s]
        torch.testing.assert_close(got.sum(-1), torch.minimum(n_vis, torch.tensor(k)).expand(3, s))
        few = n_vis < k
        assert torch.equal(got[:, few], visible[few].expand(3, -1, -1))


# --- Sinkhorn-Knopp and mHC ---------------------------------------------------------------------------------------


def test_sinkhorn_rows_and_columns_sum_to_one(debug_cfg):
    """With the config's 20 iterations and eps = 1e-6, rows and columns sum to 1 within 1e-5.

    Why 1e-5 and not 1e-6: exact sums are out of reach by construction. The last step divides each column by
    (sum + eps), so column sums are 1 - eps / (sum + eps), i.e. 1 - 1.0e-6 (just *over* 1e-6 away), and row sums
    carry the same eps bias plus the residual of 20 iterations. Logits have std 0.5, the regime of mHC (at init
    the mixes have std ~0.3); for much wider logits (std >= 1) 20 Sinkhorn iterations leave row residuals of
    ~1e-3, a property of the algorithm with the spec's t_max = 20, not of this implementation. Float64, so
    rounding is not the limit.
    """
    torch.manual_seed(0)
    logits = torch.randn(256, 4, 4, dtype=torch.float64) * 0.5
    m = sinkhorn_knopp(logits, debug_cfg.hc_sinkhorn_iters, debug_cfg.hc_eps)
    assert (m > 0).all()
    ones = torch.ones(256, 4, dtype=torch.float64)
    torch.testing.assert_close(m.sum(-2), ones, rtol=0, atol=1e-5)
    torch.testing.assert_close(m.sum(-1), ones, rtol=0, atol=1e-5)
    # The deviation that remains is the eps bias (about 1e-6), not slack in the algorithm.
    assert (m.sum(-2) - 1).abs().max() < 1.01 * debug_cfg.hc_eps
    assert (m.sum(-1) - 1).abs().max() < 1.01 * debug_cfg.hc_eps


@pytest.mark.parametrize("iters", [1, 2, 20])
def test_sinkhorn_matches_explicit_loop(debug_cfg, iters):
    """sinkhorn_knopp = row softmax + eps, column normalise, then (iters-1) x (row, column normalise), each
    denominator + eps, as written out element by element."""
    torch.manual_seed(0)
    logits = torch.randn(5, 4, 4, dtype=torch.float64) * 3
    got = sinkhorn_knopp(logits, iters, debug_cfg.hc_eps)
    for i in range(5):
        torch.testing.assert_close(got[i], ref_sinkhorn(logits[i], iters, debug_cfg.hc_eps), rtol=1e-12, atol=1e-12)


def autograd_sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """The spec's iteration in plain tensor ops, differentiated by autograd: the reference for the backward."""
    m = torch.softmax(logits, dim=-1) + eps
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


@pytest.mark.parametrize("iters", [1, 3, 20])
def test_sinkhorn_backward_matches_autograd(debug_cfg, iters):
    """sinkhorn_knopp's hand-written backward equals autograd through the plain iteration (float64) and passes
    torch's numerical gradcheck; the incoming gradient is made non-contiguous as the model's [s, b, n, n] view is."""
    torch.manual_seed(0)
    logits = (torch.randn(6, 4, 4, dtype=torch.float64) * 0.7).requires_grad_(True)
    grad_out = torch.randn(4, 4, 6, dtype=torch.float64).permute(2, 0, 1)  # non-contiguous, like the model's
    got, = torch.autograd.grad(sinkhorn_knopp(logits, iters, debug_cfg.hc_eps), logits, grad_out)
    want, = torch.autograd.grad(autograd_sinkhorn(logits, iters, debug_cfg.hc_eps), logits, grad_out)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z: sinkhorn_knopp(z, iters, debug_cfg.hc_eps), (logits[:2],))


def _randomize_hc(mod) -> None:
    with torch.no_grad():
        mod.fn.normal_(0, 0.3)
        mod.base.normal_(0, 1)
        mod.scale.copy_(torch.rand_like(mod.scale) + 0.5)


def ref_mixes(streams, fn, eps):
    """mixes[k] = sum over the flattened streams of RMS-normalised x times fn[k] (explicit loop over k)."""
    x = ref_rms(streams.flatten(-2), eps)  # [s, b, n*d]
    return [(x * fn[k].double()).sum(-1) for k in range(fn.shape[0])]


def test_hyper_connection_weights_match_spec(debug_cfg):
    """pre = sigmoid(a_pre * xhat W_pre + S_pre) + eps; post = 2 sigmoid(a_post * xhat W_post + S_post);
    res = Sinkhorn(a_res * Mat(xhat W_res) + S_res), written out stream by stream."""
    cfg = debug_cfg
    n, eps = cfg.hc_mult, cfg.hc_eps
    torch.manual_seed(0)
    hc = HyperConnection(cfg)
    _randomize_hc(hc)
    s, b = 3, 2
    streams = torch.randn(s, b, n, cfg.hidden_size)
    pre, post, res = hc.weights(streams)
    mix = ref_mixes(streams, hc.fn.detach(), cfg.rms_norm_eps)
    base, scale = hc.base.detach().double(), hc.scale.detach().double()
    for i in range(n):
        torch.testing.assert_close(pre[..., i].double(), sigmoid(scale[0] * mix[i] + base[i]) + eps, rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(post[..., i].double(), 2 * sigmoid(scale[1] * mix[n + i] + base[n + i]),
                                   rtol=1e-5, atol=1e-6)
    for si in range(s):
        for bi in range(b):
            logits = torch.tensor([[float(scale[2] * mix[2 * n + i * n + j][si, bi] + base[2 * n + i * n + j])
                                    for j in range(n)] for i in range(n)])
            torch.testing.assert_close(res[si, bi].double(), ref_sinkhorn(logits, cfg.hc_sinkhorn_iters, eps),
                                       rtol=1e-5, atol=1e-6)


def test_hyper_connection_collapse_and_expand(debug_cfg):
    """collapse: x = sum_i pre[i] X[i]; expand: X'[j] = post[j] * F + sum_i res[i, j] X[i] (note: res^T X)."""
    cfg = debug_cfg
    n = cfg.hc_mult
    torch.manual_seed(0)
    hc = HyperConnection(cfg)
    _randomize_hc(hc)
    streams = torch.randn(3, 2, n, cfg.hidden_size)
    pre, post, res = hc.weights(streams)
    x = hc.collapse(streams, pre)
    ref_x = sum(pre[..., i:i + 1].double() * streams[:, :, i].double() for i in range(n))
    torch.testing.assert_close(x.double(), ref_x, rtol=1e-5, atol=1e-6)
    f = torch.randn(3, 2, cfg.hidden_size)
    new = hc.expand(f, streams, post, res)
    assert new.shape == streams.shape
    for j in range(n):
        ref_j = post[..., j:j + 1].double() * f.double() + sum(
            res[..., i, j:j + 1].double() * streams[:, :, i].double() for i in range(n))
        torch.testing.assert_close(new[:, :, j].double(), ref_j, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(res, res.transpose(-1, -2), atol=1e-3)  # the transpose is actually tested


def test_hyper_connection_gradients_match_plain_autograd(debug_cfg):
    """Gradients through weights, collapse and expand (to the streams, fn, base and scale) equal autograd through
    the textbook form: normalise, then project; broadcast-and-sum collapse; C F + B^T X expand."""
    cfg = debug_cfg
    n, eps = cfg.hc_mult, cfg.hc_eps
    torch.manual_seed(0)
    hc = HyperConnection(cfg)
    _randomize_hc(hc)
    streams = torch.randn(5, 2, n, cfg.hidden_size, requires_grad=True)
    sublayer = torch.randn(cfg.hidden_size, cfg.hidden_size) / cfg.hidden_size ** 0.5

    def textbook(x_streams, fn, base, scale):
        mixes = rms_normalize(x_streams.flatten(-2), cfg.rms_norm_eps) @ fn.t()
        pre, post, res = mixes.split([n, n, n * n], dim=-1)
        pre = torch.sigmoid(pre * scale[0] + base[:n]) + eps
        post = 2 * torch.sigmoid(post * scale[1] + base[n:2 * n])
        res = autograd_sinkhorn((res * scale[2] + base[2 * n:]).unflatten(-1, (n, n)), cfg.hc_sinkhorn_iters, eps)
        out = torch.tanh((pre.unsqueeze(-1) * x_streams).sum(-2) @ sublayer)
        return post.unsqueeze(-1) * out.unsqueeze(-2) + res.transpose(-1, -2) @ x_streams

    def ours(x_streams):
        pre, post, res = hc.weights(x_streams)
        return hc.expand(torch.tanh(hc.collapse(x_streams, pre) @ sublayer), x_streams, post, res)

    grad_out = torch.randn_like(streams)
    params = [hc.fn, hc.base, hc.scale]
    got = torch.autograd.grad(ours(streams), [streams, *params], grad_out)
    want = torch.autograd.grad(textbook(streams, *params), [streams, *params], grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_hyper_head_matches_spec(debug_cfg):
    """HyperHead: y = sum_i (sigmoid(a * xhat W_i + S_i) + eps) X[i]."""
    cfg = debug_cfg
    n = cfg.hc_mult
    torch.manual_seed(0)
    head = HyperHead(cfg)
    _randomize_hc(head)
    streams = torch.randn(4, 2, n, cfg.hidden_size)
    mix = ref_mixes(streams, head.fn, cfg.rms_norm_eps)
    pre = [sigmoid(head.scale.double()[0] * mix[i] + head.base.double()[i]) + cfg.hc_eps for i in range(n)]
    ref = sum(pre[i].unsqueeze(-1) * streams[:, :, i].double() for i in range(n))
    torch.testing.assert_close(head(streams).double(), ref, rtol=1e-5, atol=1e-6)


# --- multi-token prediction ---------------------------------------------------------------------------------------


def test_mtp_block_matches_spec(debug_cfg, ctx):
    """MTPBlock (reference `MTPBlock.forward`): X = e_proj(enorm(e)) + h_proj(hnorm(X_prev)), X = block(X), and the
    head's input is the block's OWN final norm of its hc_head collapse: norm_k(hc_head_k(X))."""
    from dsv4.model.block import MTPBlock

    cfg, eps = debug_cfg, debug_cfg.rms_norm_eps
    s, b, n, d = 16, 2, cfg.hc_mult, cfg.hidden_size
    torch.manual_seed(0)
    mtp = MTPBlock(cfg, ctx, 1).eval()
    _randomize_hc(mtp.hc_head)
    with torch.no_grad():
        for norm in (mtp.enorm, mtp.hnorm, mtp.norm):
            norm.weight.copy_(torch.rand(d) + 0.5)
    rope = RotaryEmbedding(cfg)
    streams, embedded = torch.randn(s, b, n, d), torch.randn(s, b, d)
    ids = torch.randint(0, cfg.vocab_size, (s, b))
    with torch.no_grad():
        new_streams, hidden = mtp(streams, embedded, ids, rope)
        # The block itself is tested on its own; here the MTP wiring around it, in float64 where it is ours.
        e = ref_rms(embedded, eps, mtp.enorm.weight).float() @ mtp.e_proj.weight.t()  # [s, b, d]
        h = ref_rms(streams, eps, mtp.hnorm.weight).float() @ mtp.h_proj.weight.t()  # [s, b, n, d]
        want_streams = mtp.block(e.unsqueeze(-2) + h, ids, rope)
        want_hidden = ref_rms(mtp.hc_head(want_streams), eps, mtp.norm.weight)
    torch.testing.assert_close(new_streams, want_streams, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.double(), want_hidden, rtol=1e-5, atol=1e-5)


def test_mtp_losses_use_the_mtp_norm_not_the_main_norm(groups):
    """The main model's final norm feeds only the main head; each MTP depth's logits go through its own norm
    (`mtp.<i>.norm`, as in DeepSeek's checkpoints): changing one moves only its own loss, bit for bit."""
    import dsv4

    model = dsv4.build_model("debug", ["mtp_depth=2", "compress_ratios=[0,0,4,16,4,16,0,0]"], groups=groups)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, 1)

    def losses():
        with torch.no_grad():
            out = model(ids, labels=labels)
        return out.lm_loss, out.mtp_losses

    lm0, mtp0 = losses()
    with torch.no_grad():
        model.norm.weight.mul_(1.5)
    lm1, mtp1 = losses()
    assert not torch.equal(lm1, lm0)
    assert all(torch.equal(a, b) for a, b in zip(mtp1, mtp0))
    with torch.no_grad():
        model.mtp[1].norm.weight.mul_(1.5)
    lm2, mtp2 = losses()
    assert torch.equal(lm2, lm1) and torch.equal(mtp2[0], mtp1[0]) and not torch.equal(mtp2[1], mtp1[1])


# --- quantization simulation --------------------------------------------------------------------------------------


def pow2_scale(amax: float, qmax: float) -> float:
    """The smallest power of two s with amax / s <= qmax, by exact float arithmetic."""
    e = math.ceil(math.log2(amax / qmax))
    while amax / 2.0 ** (e - 1) <= qmax:
        e -= 1
    while amax / 2.0 ** e > qmax:
        e += 1
    return 2.0 ** e


def _blocks_with_ranges(rows: int, block: int, seed: int) -> torch.Tensor:
    """Rows of blocks spanning many magnitudes (down to values that land in the e4m3 subnormals)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4 * block, generator=g)
    mags = torch.tensor([1e-3, 1.0, 37.0, 1e4])
    x = x * mags.repeat_interleave(block)
    x[0, :block] *= torch.logspace(-6, 0, block)  # wide range inside one block
    return x


def test_fp8_qdq_is_exactly_representable_with_pow2_scale():
    """fp8_e4m3_qdq: per 1x64 block, value/scale (scale the smallest power of two with amax/scale <= 448)
    round-trips through torch.float8_e4m3fn unchanged."""
    x = _blocks_with_ranges(6, 64, 0)
    y = fp8_e4m3_qdq(x, 64)
    for r in range(x.shape[0]):
        for blk in range(x.shape[1] // 64):
            xs, ys = x[r, blk * 64:(blk + 1) * 64], y[r, blk * 64:(blk + 1) * 64]
            q = ys.double() / pow2_scale(float(xs.abs().max()), 448.0)
            assert q.abs().max() <= 448
            assert torch.equal(q.float().to(torch.float8_e4m3fn).double(), q)


def test_fp8_qdq_error_within_half_ulp():
    """|x/s - q| <= half an e4m3 ulp at x/s (3 mantissa bits; subnormal ulp 2^-9), and q is the nearest of all
    finite e4m3 values (brute force)."""
    x = _blocks_with_ranges(6, 64, 1)
    y = fp8_e4m3_qdq(x, 64)
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    grid = codes[torch.isfinite(codes)].unique()
    for r in range(x.shape[0]):
        for blk in range(x.shape[1] // 64):
            sl = slice(blk * 64, (blk + 1) * 64)
            scale = pow2_scale(float(x[r, sl].abs().max()), 448.0)
            v, q = x[r, sl].double() / scale, y[r, sl].double() / scale
            exp = torch.floor(torch.log2(v.abs().clamp_min(2.0 ** -6)))
            ulp = torch.exp2(exp - 3)
            assert ((q - v).abs() <= ulp / 2).all()
            nearest = grid[(v.unsqueeze(-1) - grid).abs().argmin(-1)]
            assert torch.equal(q, nearest)


def test_fp4_qdq_values_on_grid_and_round_to_nearest():
    """fp4_e2m1_qdq: per 1x32 block with the power-of-two scale (amax/scale <= 6), every value/scale is in
    {0, +-0.5, +-1, +-1.5, +-2, +-3, +-4, +-6} and is the grid point nearest to x/scale (brute force)."""
    x = _blocks_with_ranges(5, 32, 2)
    y = fp4_e2m1_qdq(x, 32)
    pos = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    grid = torch.tensor(sorted(set(pos + [-p for p in pos])), dtype=torch.float64)
    for r in range(x.shape[0]):
        for blk in range(x.shape[1] // 32):
            sl = slice(blk * 32, (blk + 1) * 32)
            scale = pow2_scale(float(x[r, sl].abs().max()), 6.0)
            v, q = x[r, sl].double() / scale, y[r, sl].double() / scale
            assert all(float(val) in grid.tolist() for val in q)
            for vi, qi in zip(v.tolist(), q.tolist()):
                dist = [abs(vi - g) for g in grid.tolist()]
                nearest = grid.tolist()[dist.index(min(dist))]
                assert qi == nearest, (vi, qi, nearest)


def test_fp4_qdq_ties_go_to_even_code():
    """Midpoints round to the even e2m1 code: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4."""
    vals = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    want = [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    x = torch.tensor(vals + [-v for v in vals] + [0.0] * 16)  # one block of 32, amax 6 -> scale 1
    y = fp4_e2m1_qdq(x, 32)
    assert y[:16].tolist() == want + [-w for w in want]


def test_straight_through_identity_gradient():
    """straight_through: forward is qdq(x), gradient is the identity."""
    torch.manual_seed(0)
    x = torch.randn(4, 64, requires_grad=True)
    y = straight_through(x, lambda t: fp8_e4m3_qdq(t, 64))
    assert torch.equal(y.detach(), fp8_e4m3_qdq(x.detach(), 64))
    g = torch.randn(4, 64)
    y.backward(g)
    assert torch.equal(x.grad, g)


def test_hadamard_is_orthogonal_and_involutory():
    """hadamard_rotate applies a Sylvester H / sqrt(n) with entries +-n^-1/2: H H = I and dot products are kept."""
    n = 16
    H = hadamard_rotate(torch.eye(n, dtype=torch.float64))
    assert torch.equal(H.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))
    torch.testing.assert_close(H @ H, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.manual_seed(0)
    a, b = torch.randn(5, n, dtype=torch.float64), torch.randn(5, n, dtype=torch.float64)
    torch.testing.assert_close((hadamard_rotate(a) * hadamard_rotate(b)).sum(-1), (a * b).sum(-1), rtol=1e-12,
                               atol=1e-12)
