"""The FP8/FP4 simulation in the model: it changes the numerics a little, and training passes straight through."""

import torch

import dsv4
from dsv4.model.attention import Attention
from dsv4.model.compressor import Compressor
from dsv4.model.quant import fp8_e4m3_qdq, hadamard_rotate
from dsv4.model.rope import RotaryEmbedding
from dsv4.parallel.layers import make_layer_context


def test_simulated_model_is_close_to_the_exact_one_and_trains(groups):
    exact = dsv4.build_model("debug", ["quant_sim=false"], groups=groups, seed=3)
    sim = dsv4.build_model("debug", ["quant_sim=true"], groups=groups, seed=3)
    sim.load_state_dict(exact.state_dict())
    ids = torch.randint(0, 1024, (2, 128), generator=torch.Generator().manual_seed(0))
    a, b = dsv4.logits(exact, ids), dsv4.logits(sim, ids)
    assert not torch.equal(a, b)
    # FP8/FP4 rounding (and the top-k picks it flips) moves the logits by a few percent, not more.
    assert (a - b).norm() < 0.15 * a.norm()

    sim.train()
    out = sim(ids, labels=torch.roll(ids, -1, 1))
    out.loss.backward()
    for name, p in sim.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    indexer_grad = sim.layers[2].attn.indexer.wq_b.weight.grad
    assert indexer_grad.abs().sum() > 0  # the FP4-simulated q passes its gradient straight through


def test_compressed_kv_non_rope_dims_are_fp8_values(groups, debug_cfg):
    cfg = debug_cfg.replace(quant_sim=True)
    torch.manual_seed(0)
    comp = Compressor(cfg, make_layer_context(groups.tp, 0.02), cfg.hca_ratio, cfg.head_dim, overlap=False)
    c = comp(torch.randn(64, 2, cfg.hidden_size), RotaryEmbedding(cfg))
    nope = c[..., : -cfg.rope_head_dim]
    assert torch.equal(fp8_e4m3_qdq(nope, cfg.quant_fp8_block), nope)  # already on the FP8 grid: a fixed point
    rope = c[..., -cfg.rope_head_dim:]
    assert not torch.equal(fp8_e4m3_qdq(rope, cfg.quant_fp8_block), rope)  # RoPE dims stay full precision


def test_hadamard_rotation_alone_leaves_indexer_scores_unchanged():
    """Why the rotation is skipped without the simulation: (Hq).(Hk) = q.k for the orthogonal H."""
    q, k = torch.randn(5, 16, dtype=torch.float64), torch.randn(7, 16, dtype=torch.float64)
    torch.testing.assert_close(hadamard_rotate(q) @ hadamard_rotate(k).T, q @ k.T)


def test_window_kv_is_simulated_too(groups, debug_cfg):
    """Like the reference (`act_quant(kv[..., :-rd])` right after RoPE), SWA-only layers see FP8 K=V as well."""
    ctx = make_layer_context(groups.tp, 0.02)
    rope = RotaryEmbedding(debug_cfg)
    torch.manual_seed(0)
    exact = Attention(debug_cfg.replace(quant_sim=False), ctx, layer=0)
    sim = Attention(debug_cfg.replace(quant_sim=True), ctx, layer=0)
    sim.load_state_dict(exact.state_dict())
    x = torch.randn(64, 2, debug_cfg.hidden_size)
    a, b = exact(x, rope), sim(x, rope)
    assert not torch.equal(a, b)
    assert (a - b).norm() < 0.1 * a.norm()
