"""The blocked attention (model/attention.py) against the dense computation it replaced, and its memory bound.

`dense_reference` is the attention layer as it was computed before the query-blocked version: one [b, s, s + T] mask
over [every window token ; every compressed entry] and one [b, h, s, s + T] softmax, with the indexer's scores,
top-k, KL loss and recall written out densely too (its softmax is the model's dense `sink_attention`). It lives only
here, as the reference. Checked:
- for every layer kind (SWA, CSA, HCA) and attention phase (dense, indexer_warmup, sparse), with and without packed
  documents, at lengths that are and are not multiples of the query block and of the compression ratios, shorter
  than the window, and with queries that see fewer than top-k entries: the output, the indexer's KL loss and every
  parameter gradient equal the reference's to fp32 rounding; so does the indexer recall statistic;
- the sparse top-k picks what topk over whole [T] rows picks even where index scores tie at the k-th place;
- the two blocked autograd functions (attention with the sink, index scores) pass torch.autograd.gradcheck in fp64;
- at 8192 tokens no tensor the layer creates in forward + backward has s * s elements (a dispatch mode records
  every tensor), and the window-only layer stays linear in s.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsv4.model.attention import (Attention, KeyPattern, _BlockedSinkAttention, compressed_visibility,
                                  same_document_entries, sink_attention, sliding_window_mask)
from dsv4.model.compressor import QUERY_BLOCK, index_scores
from dsv4.model.config import ATTENTION_PHASES
from dsv4.model.norm import rms_normalize
from dsv4.model.quant import simulate_indexer_fp4, simulate_kv_fp8
from dsv4.model.rope import RotaryEmbedding, apply_rope
from dsv4.parallel.layers import make_layer_context

LAYER = {"swa": 0, "csa": 2, "hca": 3}  # debug schedule [0, 0, 4, 16, 4, 16, 0]


# --- the dense reference (the layer before query blocking) --------------------------------------------------------
# Its core is the model's dense `sink_attention` (checked against the explicit formula in test_primitives.py).


def dense_index_scores(indexer, x, q_latent, rope, doc_ids=None):
    """[b, s, T]: every query against every compressed entry, through [b, s, h, T] (single rank)."""
    s, b, _ = x.shape
    keys = indexer.compressor(x, rope, doc_ids).float()  # [T, b, c]
    q = indexer.wq_b(q_latent).view(s, b, indexer.n_local_heads, indexer.head_dim)
    cos, sin = rope(torch.arange(s), "compress")
    q = apply_rope(q, cos, sin)
    if indexer.quant_sim:
        q = simulate_indexer_fp4(q, indexer.fp4_block)
    scores = torch.relu(torch.einsum("sbhc,tbc->bsht", q.float(), keys)) * indexer.score_scale
    weights = indexer.weights_proj(x).float() * indexer.weight_scale  # [s, b, h]
    return (scores * weights.permute(1, 0, 2).unsqueeze(-1)).sum(dim=2)


def dense_select_topk(scores, visible, k):
    k = min(k, scores.shape[-1])
    idx = scores.masked_fill(~visible, float("-inf")).topk(k, dim=-1).indices
    return torch.zeros_like(visible.expand_as(scores)).scatter(-1, idx, True) & visible


def dense_indexer_kl_loss(probs, scores, candidates):
    teacher = probs.detach().sum(dim=1).masked_fill(~candidates, 0.0)
    mass = teacher.sum(-1, keepdim=True)
    valid = candidates.any(-1) & (mass.squeeze(-1) > 0)
    teacher = teacher / mass.clamp_min(torch.finfo(teacher.dtype).tiny)
    log_q = torch.log_softmax(scores.masked_fill(~candidates, float("-inf")), dim=-1)
    kl = torch.where(teacher > 0, teacher * (torch.log(teacher.clamp_min(1e-30)) - log_q), 0.0).sum(-1)
    return kl[valid].mean() if valid.any() else kl.sum() * 0.0


@torch.no_grad()
def dense_indexer_recall(attn, x, q_latent, q, keys, window_mask, visible, scores, rope, doc_ids):
    s, b = x.shape[:2]
    dense_mask = torch.cat([window_mask.expand(b, s, s), visible.expand(b, -1, -1)], dim=-1)
    _, probs = sink_attention(q, keys.transpose(0, 1), dense_mask, attn.attn_sink, attn.scale)
    teacher = probs[..., s:].sum(dim=1)
    if scores is None:
        scores = dense_index_scores(attn.indexer, x, q_latent, rope, doc_ids)
    k = attn.index_topk
    hits = (dense_select_topk(scores, visible, k) & dense_select_topk(teacher, visible, k)).sum(-1).float() / k
    counted = (visible.sum(-1) > k).expand_as(hits)
    return hits[counted].mean() if counted.any() else torch.ones(())


def dense_reference(attn, x, rope, aux=None, doc_ids=None):
    """The layer's forward computed densely (single rank): what `Attention.forward` computed before blocking."""
    s, b, _ = x.shape
    cos, sin = rope(torch.arange(s), attn.rope_type)
    q_latent = attn.q_norm(attn.wq_a(x))
    q = attn.wq_b(q_latent).view(s, b, attn.n_local_heads, attn.head_dim)
    q = apply_rope(rms_normalize(q, attn.eps), cos, sin)
    kv = apply_rope(attn.kv_norm(attn.wkv(x)), cos, sin)
    if attn.quant_sim:
        kv = simulate_kv_fp8(kv, attn.rope_dim, attn.fp8_block)
    keys, n, visible = kv, 0, None
    mask = sliding_window_mask(s, attn.window).unsqueeze(0)  # [1, s, s]
    if doc_ids is not None:
        mask = mask & (doc_ids.t().unsqueeze(2) == doc_ids.t().unsqueeze(1))
    scores = candidates = None
    if attn.compressor is not None:
        compressed = attn.compressor(x, rope, doc_ids)  # [T, b, D]
        n = compressed.shape[0]
        visible = compressed_visibility(s, n, attn.ratio).unsqueeze(0)
        if doc_ids is not None:
            visible = visible & same_document_entries(doc_ids, n, attn.ratio)
        comp_mask = visible.expand(b, s, n)
        needs_scores = attn.phase == "sparse" or (attn.phase == "indexer_warmup" and attn.training)
        if attn.indexer is not None and n > 0 and needs_scores:
            scores = dense_index_scores(attn.indexer, x.detach(), q_latent.detach(), rope, doc_ids)
            if attn.phase == "sparse":
                comp_mask = dense_select_topk(scores.detach(), visible, attn.index_topk)
            candidates = comp_mask
        keys = torch.cat([kv, compressed], dim=0)
        mask = torch.cat([mask.expand(b, s, s), comp_mask], dim=-1)  # [b, s, s + T]
    q = q.permute(1, 2, 0, 3)
    out, probs = sink_attention(q, keys.transpose(0, 1), mask, attn.attn_sink, attn.scale)
    if scores is not None and attn.training and aux is not None:
        aux.setdefault("indexer", []).append(dense_indexer_kl_loss(probs[..., s:], scores, candidates))
    if aux is not None and aux.get("record_stats") and attn.indexer is not None and n > 0:
        aux.setdefault("indexer_recall", []).append(
            dense_indexer_recall(attn, x, q_latent, q, keys, mask[..., :s], visible, scores, rope, doc_ids))
    out = apply_rope(out.permute(2, 0, 1, 3), cos, sin, inverse=True)
    out = out.reshape(s, b, attn.n_local_groups, -1)
    wo_a = attn.wo_a.view(attn.n_local_groups, attn.o_lora_rank, -1)
    return attn.wo_b(torch.einsum("sbgi,gri->sbgr", out, wo_a).flatten(2))


# --- helpers --------------------------------------------------------------------------------------------------------


@pytest.fixture()
def debug_cfg(debug_cfg):
    """The debug preset without the quantization simulation and with 16 indexer heads instead of 4: an index score
    is exactly 0 when ReLU zeroes every head, which with 4 heads happens to 1 in 16 query-entry pairs, and such
    ties at the k-th place leave the top-k to the sort's tie-breaking (both implementations are right, but they
    may differ); with 16 heads it is 1 in 65536, and `assert_no_boundary_ties` checks each case."""
    return debug_cfg.replace(quant_sim=False, index_n_heads=16)


def make_attention(cfg, groups, kind, phase, block, seed=0):
    """A layer with non-trivial sinks, position biases, norm gains and sharp compressor gates."""
    torch.manual_seed(seed)
    attn = Attention(cfg, make_layer_context(groups.tp, cfg.init_std), LAYER[kind]).train()
    attn.phase, attn.query_block = phase, block
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if name.endswith(("attn_sink", "ape")):
                p.copy_(torch.randn_like(p))
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("wgate.weight"):
                p.mul_(20)
    return attn


def packed_docs(s, b, boundaries):
    ids = torch.zeros(s, b, dtype=torch.long)
    for p in boundaries:
        ids[p:] += 1
    return ids


def run(fn, attn, x, grad_out, **kw):
    """Output, indexer loss and every parameter's gradient of d(out . grad_out + indexer loss)."""
    attn.zero_grad(set_to_none=True)
    aux: dict = {}
    out = fn(attn, x, aux=aux, **kw) if fn is dense_reference else fn(x, aux=aux, **kw)
    loss = (out * grad_out).sum()
    kl = aux["indexer"][0] if "indexer" in aux else None
    if kl is not None:
        loss = loss + kl
    loss.backward()
    grads = {name: p.grad.clone() for name, p in attn.named_parameters() if p.grad is not None}
    return out.detach(), kl, grads


def assert_no_boundary_ties(attn, x, rope, doc_ids):
    """The sparse top-k is unique for every query (else both implementations may rightly pick different entries)."""
    with torch.no_grad():
        q_latent = attn.q_norm(attn.wq_a(x))
        scores = dense_index_scores(attn.indexer, x, q_latent, rope, doc_ids)
    s, n, k = x.shape[0], scores.shape[-1], attn.index_topk
    visible = compressed_visibility(s, n, attn.ratio).unsqueeze(0)
    if doc_ids is not None:
        visible = visible & same_document_entries(doc_ids, n, attn.ratio)
    if n <= k:
        return
    top = scores.masked_fill(~visible, float("-inf")).topk(k + 1, dim=-1).values
    rows = visible.sum(-1).expand(scores.shape[:2]) > k
    kth, next_ = top[..., k - 1][rows], top[..., k][rows]
    # Both compute the scores in fp32 in different orders: a gap of a few ulps could still swap them.
    assert (kth - next_ > 1e-5 * torch.maximum(kth.abs(), next_.abs()) + 1e-9).all(), "tied top-k: change the seed"


# --- blocked == dense -----------------------------------------------------------------------------------------------

# (seq length, query block): several blocks with a partial last one and lengths off the ratios (99); every length a
# multiple of everything (128); shorter than the window and with fewer entries than top-k (20); the default block
# with a partial last block (300).
LENGTHS = [(20, 16), (99, 16), (128, 16), (300, QUERY_BLOCK)]


@pytest.mark.parametrize("s,block", LENGTHS)
@pytest.mark.parametrize("docs", [False, True], ids=["one-doc", "packed"])
@pytest.mark.parametrize("phase", ATTENTION_PHASES)
@pytest.mark.parametrize("kind", list(LAYER))
def test_blocked_attention_equals_dense_reference(debug_cfg, groups, kind, phase, docs, s, block):
    cfg, b = debug_cfg, 2
    if kind != "csa" and phase != "sparse" and s == 300:
        pytest.skip("SWA and HCA do not depend on the phase; the long case runs once for them")
    attn = make_attention(cfg, groups, kind, phase, block)
    rope = RotaryEmbedding(cfg)
    g = torch.Generator().manual_seed(s)
    x = torch.randn(s, b, cfg.hidden_size, generator=g)
    grad_out = torch.randn(s, b, cfg.hidden_size, generator=g)
    doc_ids = packed_docs(s, b, [s // 3, s // 3 + 7]) if docs else None
    if kind == "csa" and phase == "sparse":
        assert_no_boundary_ties(attn, x, rope, doc_ids)

    out, kl, grads = run(attn, attn, x, grad_out, rope=rope, doc_ids=doc_ids)
    ref_out, ref_kl, ref_grads = run(dense_reference, attn, x, grad_out, rope=rope, doc_ids=doc_ids)

    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert (kl is None) == (ref_kl is None) == (kind != "csa" or phase == "dense")
    if kl is not None:
        torch.testing.assert_close(kl, ref_kl, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        # A weight's gradient sums s * b products: its fp32 rounding scales with the largest entry, not with each.
        ref = ref_grads[name]
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6 * max(1.0, float(ref.abs().max())), msg=name)
    if kind == "csa" and phase != "dense":
        assert any(name.startswith("indexer.") for name in grads)  # the KL loss reached the indexer


@pytest.mark.parametrize("phase", ATTENTION_PHASES)
@pytest.mark.parametrize("docs", [False, True], ids=["one-doc", "packed"])
def test_indexer_recall_equals_dense_reference(debug_cfg, groups, phase, docs):
    """The recall statistic (record_stats), computed block by block, equals the dense computation."""
    cfg, s, b = debug_cfg, 160, 2
    attn = make_attention(cfg, groups, "csa", phase, block=32).eval()
    rope = RotaryEmbedding(cfg)
    x = torch.randn(s, b, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    doc_ids = packed_docs(s, b, [90]) if docs else None
    with torch.no_grad():
        aux, ref_aux = {"record_stats": True}, {"record_stats": True}
        attn(x, rope, aux, doc_ids)
        dense_reference(attn, x, rope, ref_aux, doc_ids)
    recall, ref_recall = aux["indexer_recall"][0], ref_aux["indexer_recall"][0]
    assert 0 < float(ref_recall) < 1  # a real statistic, not the empty-case 1
    torch.testing.assert_close(recall, ref_recall, rtol=1e-6, atol=1e-6)


def test_sparse_picks_break_ties_like_topk_over_whole_rows(groups):
    """With the preset's 4 indexer heads many index scores are exactly 0 (ReLU zeroes every head) and tie at the
    k-th place; the blocked selection still picks exactly what torch.topk over each query's whole [T] row picks, as
    the dense reference and transformers do."""
    from dsv4.conf.schema import compose_config

    cfg = compose_config("debug").model.replace(quant_sim=False)
    attn = make_attention(cfg, groups, "csa", "sparse", block=16)
    rope = RotaryEmbedding(cfg)
    s, b, k = 256, 2, cfg.index_topk
    x = torch.randn(s, b, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        parts = attn.indexer.project(x, attn.q_norm(attn.wq_a(x)), rope)
        scores = index_scores(*parts)  # [b, s, T], the same numbers the blocks compute
        n = scores.shape[-1]
        pattern = KeyPattern(s, attn.window, 16, x.device, None, attn.ratio, n)
        attn._select(parts, pattern)
    visible = compressed_visibility(s, n, attn.ratio).unsqueeze(0)
    masked = scores.masked_fill(~visible, float("-inf"))
    top = masked.topk(k + 1, dim=-1).values
    ties = (top[..., k - 1] == top[..., k]) & top[..., k].isfinite()
    assert ties.sum() >= 10, "the check needs queries with a tie at the k-th place"
    want = masked.topk(k, dim=-1).indices
    picks = pattern.picks - (torch.arange(b) * n).view(b, 1, 1)
    for bi in range(b):
        for t in range(s):
            got = {int(i) for i, ok in zip(picks[bi, t], pattern.valid[bi, t]) if ok}
            assert got == {int(i) for i in want[bi, t] if visible[0, t, i]}, (bi, t)


# --- the autograd functions in fp64 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("entries", ["none", "visible", "picked"])
@pytest.mark.parametrize("docs", [False, True], ids=["one-doc", "packed"])
def test_blocked_sink_attention_gradcheck(entries, docs):
    torch.manual_seed(0)
    b, s, h, D, window, ratio, block = 2, 13, 2, 4, 4, 2, 5
    n = s // ratio
    doc_ids = packed_docs(s, b, [6]).t() if docs else None
    pattern = KeyPattern(s, window, block, torch.device("cpu"), doc_ids, ratio, 0 if entries == "none" else n)
    if entries == "picked":  # 3 picks per query among its visible entries, fewer (invalid slots) early on
        scores = torch.randn(b, s, n, dtype=torch.float64)
        visible = compressed_visibility(s, n, ratio).unsqueeze(0)
        if docs:
            visible = visible & same_document_entries(doc_ids.t(), n, ratio)
        idx = scores.masked_fill(~visible, float("-inf")).topk(3, dim=-1).indices
        pattern.picks = idx + (torch.arange(b) * n).view(b, 1, 1)
        pattern.valid = visible.expand(b, s, n).gather(-1, idx)
        assert not pattern.valid.all() and pattern.valid.any()
    q = torch.randn(b, s, h, D, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(b, s, D, dtype=torch.float64, requires_grad=True)
    comp = None if entries == "none" else torch.randn(b, n, D, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(h, dtype=torch.float64, requires_grad=True)

    def f(q, kv, comp, sinks):
        return _BlockedSinkAttention.apply(q, kv, comp, sinks, pattern, 0.7, False)[0]

    assert torch.autograd.gradcheck(f, (q, kv, comp, sinks))


@pytest.mark.parametrize("picked", [False, True])
def test_index_scores_gradcheck(picked):
    torch.manual_seed(0)
    b, s, h, c, n, block = 2, 11, 3, 4, 6, 4
    q = torch.randn(b, s, h, c, dtype=torch.float64, requires_grad=True)
    w = torch.randn(b, s, h, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(b, n, c, dtype=torch.float64, requires_grad=True)
    picks = None
    if picked:
        picks = torch.rand(b, s, n).argsort(-1)[..., :3] + (torch.arange(b) * n).view(b, 1, 1)
    dense = torch.einsum("bsh,bshn->bsn", w, torch.relu(torch.einsum("bshc,bnc->bshn", q, keys)))
    got = index_scores(q, w, keys, picks, block)
    want = dense if picks is None else dense.reshape(b * s, n).gather(
        -1, (picks - (torch.arange(b) * n).view(b, 1, 1)).reshape(b * s, -1)).view(b, s, -1)
    torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(lambda q, w, k: index_scores(q, w, k, picks, block), (q, w, keys))


# --- memory at long context ---------------------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("kind,phase", [("swa", "sparse"), ("hca", "sparse"), ("csa", "sparse"), ("csa", "dense"),
                                        ("csa", "indexer_warmup")])
def test_long_sequence_never_materialises_s_by_s(debug_cfg, groups, kind, phase):
    """8192 tokens, forward + backward (with the indexer's KL loss): the largest tensor has fewer than s * s
    elements; without compressed entries (SWA) it is O(s): a few hundred numbers per token."""
    cfg, s = debug_cfg, 8192
    attn = make_attention(cfg, groups, kind, phase, block=QUERY_BLOCK)
    rope = RotaryEmbedding(cfg)
    x = torch.randn(s, 1, cfg.hidden_size, requires_grad=True)
    largest = LargestTensor()
    with largest:
        aux = {}
        out = attn(x, rope, aux)
        loss = out.square().mean() + sum(aux.get("indexer", []))
        loss.backward()
    assert ("indexer" in aux) == (kind == "csa" and phase != "dense")
    assert largest.numel < s * s, largest.numel
    if kind == "swa":
        assert largest.numel <= 512 * s, largest.numel
