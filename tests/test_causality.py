"""Causality: changing the inputs after position t never changes any output at positions <= t.

Checked for the attention sublayer of each layer kind (SWA-only, CSA, HCA) in every attention phase and for the
whole debug model's logits, at 128 tokens and at block boundaries of both compression ratios (t = m-1, m, 2m-1)
as well as mid-block positions. The comparison is exact (torch.equal): a compressed entry is visible only once its
block is complete, and the CSA top-k can only pick visible entries, so nothing of the future enters the arithmetic
of an earlier position.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_model

from dsv4.model.attention import Attention
from dsv4.model.config import ATTENTION_PHASES
from dsv4.model.rope import RotaryEmbedding
from dsv4.parallel.layers import make_layer_context

SEQ = 128
LAYER = {"swa": 0, "csa": 2, "hca": 3}  # debug schedule [0, 0, 4, 16, 4, 16, 0]


def cut_points(cfg) -> list[int]:
    """Block boundaries of both ratios (m-1, m, 2m-1), mid-block positions, and a few later ones."""
    pts = set()
    for m in (cfg.csa_ratio, cfg.hca_ratio):
        pts |= {m - 1, m, 2 * m - 1, m + m // 2}
    pts |= {cfg.sliding_window, 64, SEQ - 2}
    return sorted(pts)


@pytest.fixture()
def one_thread():
    """torch's intra-op parallelism at one thread for the test (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize(module: torch.nn.Module) -> None:
    """Non-zero sinks and position biases, sharper gates: the default init leaves some of them trivial."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("ape"):
                p.copy_(torch.randn_like(p))
            elif name.endswith("attn_sink"):
                p.copy_(torch.randn_like(p))
            elif name.endswith("wgate.weight"):
                p.mul_(20)


def test_cut_points_cover_block_boundaries(debug_cfg):
    """The debug preset has the schedule these tests assume, and the cut points include both ratios' boundaries."""
    cfg = debug_cfg
    assert [cfg.layer_kind(i) for i in LAYER.values()] == list(LAYER)
    assert cfg.index_topk < SEQ // cfg.csa_ratio  # the top-k really selects at this length
    pts = cut_points(cfg)
    for m in (4, 16):
        assert {m - 1, m, 2 * m - 1} <= set(pts)


@pytest.mark.parametrize("phase", ATTENTION_PHASES)
@pytest.mark.parametrize("kind", ["swa", "csa", "hca"])
def test_attention_is_causal(debug_cfg, groups, kind, phase):
    """Attention of a SWA / CSA / HCA layer: out[:t+1] is bit-identical when x[t+1:] is replaced; out[t+1:] does
    change (the check is not vacuous)."""
    cfg = debug_cfg
    torch.manual_seed(0)
    attn = Attention(cfg, make_layer_context(groups.tp, cfg.init_std), LAYER[kind])
    attn.phase = phase
    _randomize(attn)
    rope = RotaryEmbedding(cfg)
    x = torch.randn(SEQ, 2, cfg.hidden_size)
    with torch.no_grad():
        base = attn(x, rope, {})
        for t in cut_points(cfg):
            x2 = x.clone()
            x2[t + 1:] = torch.randn(SEQ - t - 1, 2, cfg.hidden_size)
            out = attn(x2, rope, {})
            assert torch.equal(out[: t + 1], base[: t + 1]), f"{kind}/{phase}: position <= {t} saw the future"
            assert not torch.allclose(out[t + 1:], base[t + 1:])


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_attention_causal_within_incomplete_block(debug_cfg, groups, kind):
    """Changing only the rest of the block that contains t (t+1 .. end of block) leaves out[:t+1] unchanged:
    the incomplete block's compressed entry is not visible yet."""
    cfg = debug_cfg
    m = cfg.layer_ratio(LAYER[kind])
    torch.manual_seed(1)
    attn = Attention(cfg, make_layer_context(groups.tp, cfg.init_std), LAYER[kind])
    _randomize(attn)
    rope = RotaryEmbedding(cfg)
    x = torch.randn(SEQ, 1, cfg.hidden_size)
    with torch.no_grad():
        base = attn(x, rope)
        for t in (m, 2 * m + 1, 5 * m - 2):
            end = (t // m + 1) * m  # first token of the next block
            x2 = x.clone()
            x2[t + 1:end] += torch.randn(end - t - 1, 1, cfg.hidden_size)
            out = attn(x2, rope)
            assert torch.equal(out[: t + 1], base[: t + 1])
            assert not torch.allclose(out[end:], base[end:])  # later queries do see the completed block


@pytest.mark.parametrize("phase,quant_sim", [("sparse", False), ("dense", False), ("sparse", True)])
def test_full_model_logits_are_causal(debug_cfg, groups, phase, quant_sim, one_thread):
    """model(ids).logits [b, s, vocab]: logits[:, :t+1] are bit-identical when ids[:, t+1:] are replaced (with and
    without the FP8/FP4 simulation, whose tiles run along channels, never across tokens).

    At one intra-op thread: replacing later tokens changes how many rows each routed expert's GEMM gets, and with
    several threads the GEMM then splits its rows differently and may round an earlier token's row differently
    (measured on a 2-core AMD EPYC: layer 5's MoE output at t <= 32 differed in the last bit; every attention
    output was equal). That is arithmetic, not information flowing from the future, which this test is about."""
    cfg = debug_cfg.replace(quant_sim=quant_sim)
    model = build_model(cfg, groups, seed=0)
    _randomize(model)
    model.set_attention_phase(phase)
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=g)
    with torch.no_grad():
        base = model(ids).logits
        assert base.shape == (2, SEQ, cfg.vocab_size)
        for t in cut_points(cfg):
            ids2 = ids.clone()
            ids2[:, t + 1:] = torch.randint(0, cfg.vocab_size, (2, SEQ - t - 1), generator=g)
            logits = model(ids2).logits
            assert torch.equal(logits[:, : t + 1], base[:, : t + 1]), f"{phase}: position <= {t} saw the future"
            assert not torch.allclose(logits[:, t + 1:], base[:, t + 1:])
