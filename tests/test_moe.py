"""MoE (spec section 5) against naive per-token references: the sqrt-softplus router with its selection-only
bias, hash routing, the clamped SwiGLU experts, routed + shared output, the aux-loss-free bias update and the
sequence-wise balance loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dsv4.model.moe import (
    GroupedExperts,
    MoE,
    Router,
    make_tid2eid,
    sequence_balance_loss,
    sqrt_softplus,
    update_expert_bias,
)
from dsv4.parallel.layers import make_layer_context

HASH_LAYER, SCORED_LAYER = 0, 3  # debug preset: num_hash_layers = 2


@pytest.fixture()
def ctx(groups):
    return make_layer_context(groups.tp, 0.02)


def ref_scores(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """s = sqrt(softplus(x W^T)) = sqrt(log(1 + e^z)) in float64."""
    z = x.double() @ weight.detach().double().t()
    return torch.sqrt(torch.log1p(torch.exp(z)))


def ref_route(scores: torch.Tensor, bias: torch.Tensor | None, k: int, scaling: float,
              indices: torch.Tensor | None = None) -> torch.Tensor:
    """Dense gate weights [N, E]: experts = top-k of scores + bias (or the given indices), weight = unbiased score
    at the chosen experts, normalised to sum 1, times `scaling`; token by token."""
    N, E = scores.shape
    dense = torch.zeros(N, E, dtype=torch.float64)
    for n in range(N):
        if indices is None:
            key = [float(scores[n, e]) + (0.0 if bias is None else float(bias[e])) for e in range(E)]
            chosen = sorted(range(E), key=lambda e: -key[e])[:k]
        else:
            chosen = indices[n].tolist()
        total = sum(float(scores[n, e]) for e in chosen)
        for e in chosen:
            dense[n, e] = float(scores[n, e]) / total * scaling
    return dense


def dense_gates(indices: torch.Tensor, weights: torch.Tensor, n_experts: int) -> torch.Tensor:
    return torch.zeros(indices.shape[0], n_experts, dtype=torch.float64).scatter(1, indices, weights.double())


def ref_swiglu_expert(x, w1, w3, w2, limit):
    """w2 (silu(min(w1 x, limit)) * clamp(w3 x, -limit, limit)) for one token; no clamp when limit is 0."""
    g, u = w1.double() @ x.double(), w3.double() @ x.double()
    if limit > 0:
        g = torch.minimum(g, torch.tensor(limit, dtype=torch.float64))
        u = u.clamp(-limit, limit)
    return w2.double() @ (g / (1 + torch.exp(-g)) * u)


def ref_grouped_experts(x, indices, weights, experts: GroupedExperts, limit):
    out = torch.zeros(x.shape, dtype=torch.float64)
    for n in range(x.shape[0]):
        for j in range(indices.shape[1]):
            e = int(indices[n, j])
            out[n] += float(weights[n, j]) * ref_swiglu_expert(x[n], experts.w1[e].detach(), experts.w3[e].detach(),
                                                               experts.w2[e].detach(), limit)
    return out


# --- router -------------------------------------------------------------------------------------------------------


def test_sqrt_softplus_matches_formula():
    """sqrt_softplus(z) = sqrt(log(1 + e^z)), in fp32 whatever the input dtype."""
    z = torch.linspace(-20, 20, 101)
    got = sqrt_softplus(z.bfloat16().float())
    assert got.dtype == torch.float32
    ref = torch.tensor([math.sqrt(math.log1p(math.exp(v))) for v in z.bfloat16().float().tolist()], dtype=torch.float64)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)


def test_scored_router_bias_steers_selection_but_not_weights(debug_cfg, ctx):
    """Scored router: indices = top-k of (scores + bias); weights = the *unbiased* scores at those indices,
    normalised to sum 1, times routed_scaling_factor. The bias here changes the selection of most tokens."""
    cfg = debug_cfg
    torch.manual_seed(0)
    router = Router(cfg, ctx, SCORED_LAYER)
    assert not router.is_hash
    x = torch.randn(32, cfg.hidden_size)
    s = ref_scores(x, router.weight)
    weakest = int(s.mean(0).argmin())
    with torch.no_grad():
        router.bias.copy_(torch.randn(cfg.n_routed_experts) * 0.01)
        router.bias[weakest] = 1.0
    scores, weights, indices = router(x, None)
    torch.testing.assert_close(scores.double(), s, rtol=1e-5, atol=1e-6)
    assert (indices == weakest).any(-1).all()  # the bias put the weakest expert into every selection
    unbiased = ref_route(s, None, cfg.n_activated_experts, cfg.routed_scaling_factor)
    assert ((unbiased > 0) != (dense_gates(indices, weights, cfg.n_routed_experts) > 0)).any(-1).sum() > 16
    ref = ref_route(s, router.bias, cfg.n_activated_experts, cfg.routed_scaling_factor)
    torch.testing.assert_close(dense_gates(indices, weights, cfg.n_routed_experts), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.sum(-1).double(), torch.full((32,), cfg.routed_scaling_factor,
                                                                    dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_hash_router_uses_tid2eid(debug_cfg, ctx):
    """Hash router (layer < num_hash_layers): indices = tid2eid[token_ids]; weights are still the normalised
    scores at those experts times routed_scaling_factor; it has no bias."""
    cfg = debug_cfg
    torch.manual_seed(0)
    router = Router(cfg, ctx, HASH_LAYER)
    assert router.is_hash and not hasattr(router, "bias")
    x = torch.randn(40, cfg.hidden_size)
    ids = torch.randint(0, cfg.vocab_size, (40,))
    scores, weights, indices = router(x, ids)
    assert torch.equal(indices, router.tid2eid[ids])
    ref = ref_route(ref_scores(x, router.weight), None, cfg.n_activated_experts, cfg.routed_scaling_factor,
                    indices=router.tid2eid[ids])
    torch.testing.assert_close(dense_gates(indices, weights, cfg.n_routed_experts), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        router(x, None)


def _check_tid2eid(vocab, n_experts, k):
    table = make_tid2eid(vocab, n_experts, k, seed=0)
    assert table.shape == (vocab, k)
    assert ((table >= 0) & (table < n_experts)).all()
    assert all(len(set(row)) == k for row in table.tolist())  # k distinct experts per token
    load = torch.bincount(table.flatten(), minlength=n_experts)
    assert int(load.max() - load.min()) <= 1, load.tolist()  # balanced within 1


@pytest.mark.parametrize("vocab,n_experts,k", [(1024, 8, 2), (129280, 256, 6), (1000, 7, 3), (1001, 10, 3),
                                               (997, 12, 5), (50, 6, 6)])
def test_tid2eid_distinct_and_balanced(vocab, n_experts, k):
    """make_tid2eid: every row holds k distinct experts and expert loads differ by at most 1."""
    _check_tid2eid(vocab, n_experts, k)


def test_tid2eid_balanced_for_uneven_sizes():
    """vocab = 803, E = 16, k = 6: k divides neither E nor vocab * k / E; loads still differ by at most 1."""
    _check_tid2eid(803, 16, 6)


def test_tid2eid_expert_sets_are_diverse():
    """Tokens do not share a handful of fixed expert groups: most of the C(8, 2) = 28 pairs occur."""
    table = make_tid2eid(1024, 8, 2, seed=0)
    assert len({tuple(sorted(row)) for row in table.tolist()}) >= 25


def test_tid2eid_deterministic_per_seed(debug_cfg, ctx):
    """The table depends only on the seed (not on the global RNG); hash layer l uses hash_seed + l."""
    cfg = debug_cfg
    torch.manual_seed(1)
    a = make_tid2eid(cfg.vocab_size, cfg.n_routed_experts, cfg.n_activated_experts, seed=5)
    torch.manual_seed(2)
    b = make_tid2eid(cfg.vocab_size, cfg.n_routed_experts, cfg.n_activated_experts, seed=5)
    assert torch.equal(a, b)
    assert not torch.equal(a, make_tid2eid(cfg.vocab_size, cfg.n_routed_experts, cfg.n_activated_experts, seed=6))
    for layer in range(cfg.num_hash_layers):
        torch.manual_seed(100 + layer)
        router = Router(cfg, ctx, layer)
        assert torch.equal(router.tid2eid, make_tid2eid(cfg.vocab_size, cfg.n_routed_experts,
                                                        cfg.n_activated_experts, cfg.hash_seed + layer))


# --- experts and the MoE layer ------------------------------------------------------------------------------------


def _experts_and_inputs(cfg, ctx, seed=0):
    torch.manual_seed(seed)
    experts = GroupedExperts(cfg, ctx)
    with torch.no_grad():  # large pre-activations so the clamp is active
        experts.w1.mul_(10)
        experts.w3.mul_(10)
    N, k = 24, cfg.n_activated_experts
    x = torch.randn(N, cfg.hidden_size) * 3
    indices = torch.stack([torch.randperm(cfg.n_routed_experts)[:k] for _ in range(N)])
    weights = torch.rand(N, k)
    return experts, x, indices, weights


def combine(experts, x, indices, weights):
    """sum_j weights[:, j] * expert_{indices[:, j]}(x) through GroupedExperts' row interface."""
    k = indices.shape[1]
    out = experts(x.repeat_interleave(k, dim=0), indices.flatten())
    return (out.view(-1, k, x.shape[1]) * weights.unsqueeze(-1)).sum(1)


def test_grouped_experts_match_per_token_loop_with_clamp(debug_cfg, ctx):
    """GroupedExperts = sum_j w_j expert_{e_j}(x), expert(x) = w2 (silu(min(w1 x, L)) * clamp(w3 x, -L, L)),
    with inputs large enough that both clamps bite."""
    cfg = debug_cfg
    experts, x, indices, weights = _experts_and_inputs(cfg, ctx)
    L = cfg.swiglu_limit
    pre_gate = torch.einsum("td,eid->tei", x, experts.w1.detach())
    pre_up = torch.einsum("td,eid->tei", x, experts.w3.detach())
    assert (pre_gate > L).any() and (pre_up > L).any() and (pre_up < -L).any()
    got = combine(experts, x, indices, weights)
    torch.testing.assert_close(got.double(), ref_grouped_experts(x, indices, weights, experts, L), rtol=1e-5, atol=1e-4)


def test_swiglu_limit_zero_disables_clamp(debug_cfg, ctx):
    """swiglu_limit = 0: plain SwiGLU (and it differs from the clamped result on these inputs)."""
    cfg = debug_cfg.replace(swiglu_limit=0.0)
    experts, x, indices, weights = _experts_and_inputs(cfg, ctx)
    got = combine(experts, x, indices, weights)
    torch.testing.assert_close(got.double(), ref_grouped_experts(x, indices, weights, experts, 0.0), rtol=1e-5,
                               atol=1e-4)
    clamped = ref_grouped_experts(x, indices, weights, experts, debug_cfg.swiglu_limit)
    assert not torch.allclose(got.double(), clamped, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("layer", [HASH_LAYER, SCORED_LAYER])
def test_moe_forward_is_routed_plus_shared(debug_cfg, ctx, layer):
    """MoE(x) = sum_j gate_j expert_{e_j}(x) + shared(x), token by token, shared with the same clamp; in
    training a scored layer adds seq_aux_loss_coef * balance loss to aux['balance'], a hash layer adds none."""
    cfg = debug_cfg
    torch.manual_seed(0)
    moe = MoE(cfg, ctx, layer)
    with torch.no_grad():
        for p in (moe.experts.w1, moe.experts.w3, moe.shared_experts.w1.weight, moe.shared_experts.w3.weight):
            p.mul_(10)
        if not moe.gate.is_hash:
            moe.gate.bias.copy_(torch.randn(cfg.n_routed_experts) * 0.05)
    s, b = 6, 2
    x = torch.randn(s, b, cfg.hidden_size) * 3
    ids = torch.randint(0, cfg.vocab_size, (s, b))
    aux: dict = {}
    out = moe(x, ids, aux)

    flat, flat_ids = x.reshape(-1, cfg.hidden_size), ids.reshape(-1)
    scores = ref_scores(flat, moe.gate.weight)
    if moe.gate.is_hash:
        gates = ref_route(scores, None, cfg.n_activated_experts, cfg.routed_scaling_factor,
                          indices=moe.gate.tid2eid[flat_ids])
    else:
        gates = ref_route(scores, moe.gate.bias, cfg.n_activated_experts, cfg.routed_scaling_factor)
    L, sh = cfg.swiglu_limit, moe.shared_experts
    ref = torch.zeros(flat.shape, dtype=torch.float64)
    for n in range(flat.shape[0]):
        for e in range(cfg.n_routed_experts):
            if gates[n, e] > 0:
                ref[n] += gates[n, e] * ref_swiglu_expert(flat[n], moe.experts.w1[e].detach(),
                                                          moe.experts.w3[e].detach(), moe.experts.w2[e].detach(), L)
        ref[n] += ref_swiglu_expert(flat[n], sh.w1.weight.detach(), sh.w3.weight.detach(), sh.w2.weight.detach(), L)
    torch.testing.assert_close(out.double(), ref.view(s, b, -1), rtol=1e-5, atol=1e-4)

    if moe.gate.is_hash:
        assert "balance" not in aux
    else:
        indices = torch.stack([torch.nonzero(gates[n] > 0).flatten() for n in range(flat.shape[0])])
        want = cfg.seq_aux_loss_coef * ref_sequence_balance_loss(scores, indices, cfg.n_routed_experts,
                                                                 cfg.n_activated_experts, b)
        assert len(aux["balance"]) == 1
        assert float(aux["balance"][0].detach()) == pytest.approx(want, rel=1e-5)


# --- load balancing -----------------------------------------------------------------------------------------------


def test_update_expert_bias_rule(debug_cfg, ctx):
    """b_i += rate * sign(mean load - load_i) for every scored router (0 at the mean), counts reset to 0; hash
    routers have no bias and their table is untouched."""
    cfg = debug_cfg
    torch.manual_seed(0)
    routers = nn.ModuleList([Router(cfg, ctx, SCORED_LAYER), Router(cfg, ctx, SCORED_LAYER + 1),
                             Router(cfg, ctx, HASH_LAYER)])
    loads = [torch.tensor([4.0, 2, 3, 3, 5, 1, 3, 3]), torch.tensor([0.0, 0, 0, 8, 0, 0, 0, 0])]
    start = []
    for r, load in zip(routers[:2], loads):
        r.bias.copy_(torch.randn(cfg.n_routed_experts))
        r.tokens_per_expert.copy_(load)
        start.append(r.bias.clone())
    table = routers[2].tid2eid.clone()
    update_expert_bias(routers, rate=0.01)
    expected_sign = [[-1, 1, 0, 0, -1, 1, 0, 0], [1, 1, 1, -1, 1, 1, 1, 1]]
    for r, b0, sign in zip(routers[:2], start, expected_sign):
        torch.testing.assert_close(r.bias, b0 + 0.01 * torch.tensor(sign, dtype=torch.float32), rtol=0, atol=1e-7)
        assert (r.tokens_per_expert == 0).all()
    assert torch.equal(routers[2].tid2eid, table) and not hasattr(routers[2], "bias")


def test_router_counts_accumulate_only_in_training(debug_cfg, ctx):
    """tokens_per_expert counts the routed (token, expert) pairs in training mode only."""
    cfg = debug_cfg
    torch.manual_seed(0)
    router = Router(cfg, ctx, SCORED_LAYER)
    x = torch.randn(30, cfg.hidden_size)
    router.eval()
    router(x, None)
    assert (router.tokens_per_expert == 0).all()
    router.train()
    _, _, idx = router(x, None)
    router(x, None)
    expected = 2 * torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts).float()
    assert torch.equal(router.tokens_per_expert, expected)
    assert router.tokens_per_expert.sum() == 2 * 30 * cfg.n_activated_experts


def ref_sequence_balance_loss(scores, indices, n_experts, k, batch, interleaved: bool = True) -> float:
    """Per sequence (rows r with r % batch == b in the [s, b] layout), T tokens:
    f_i = E / (k T) * count_i, P_i = mean_t s_i / sum_j s_j, L_b = sum_i f_i P_i; mean over sequences.
    interleaved=False groups contiguous rows instead (the wrong layout, for a negative check)."""
    scores = scores.double()
    total = 0.0
    N = scores.shape[0]
    for b in range(batch):
        rows = [r for r in range(N) if (r % batch == b if interleaved else r // (N // batch) == b)]
        T = len(rows)
        loss_b = 0.0
        for i in range(n_experts):
            count = sum(1 for r in rows if i in indices[r].tolist())
            f = n_experts / (k * T) * count
            P = sum(float(scores[r, i] / scores[r].sum()) for r in rows) / T
            loss_b += f * P
        total += loss_b
    return total / batch


def test_sequence_balance_loss_matches_per_sequence_formula():
    """sequence_balance_loss = mean over sequences of sum_i f_i P_i, sequences interleaved as in [s, b]."""
    torch.manual_seed(0)
    s, b, E, k = 7, 3, 8, 2
    scores = torch.rand(s * b, E) + 0.01
    # Make the sequences route differently so that mixing up rows would change the loss.
    scores[torch.arange(s * b) % b == 0, 0] += 3.0
    indices = scores.topk(k, dim=-1).indices
    got = sequence_balance_loss(scores, indices, E, k, b)
    assert float(got) == pytest.approx(ref_sequence_balance_loss(scores, indices, E, k, b), rel=1e-6)
    # A wrong grouping (contiguous rows per sequence) gives a different value for these inputs.
    wrong = ref_sequence_balance_loss(scores, indices, E, k, b, interleaved=False)
    assert float(got) != pytest.approx(wrong, rel=1e-3)


def test_sequence_balance_loss_is_one_when_uniform():
    """Uniform scores and perfectly balanced routing give sum_i f_i P_i = sum_i 1 * 1/E = 1."""
    E, k, T = 4, 2, 4
    scores = torch.ones(T, E)
    indices = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert float(sequence_balance_loss(scores, indices, E, k, 1)) == pytest.approx(1.0)
