"""Attention phases (dense -> indexer_warmup -> sparse) and the indexer's training signal.

- ModelConfig.attention_phase follows dense_attention_steps / indexer_warmup_steps; model.set_step applies it.
- dense: no indexer loss; a CSA layer attends to every visible compressed entry (checked against a naive
  per-query attention over window + compressed entries, like an HCA layer), whatever the indexer holds.
- indexer_warmup: dense attention, only the indexer's parameters receive gradients, through its KL loss.
- sparse: top-k attention (checked against the naive attention over the brute-force top-k); the main model learns
  from the LM loss, the indexer only from its KL loss.
- indexer_kl_loss against the explicit KL formula.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_model

from dsv4.model.attention import Attention, indexer_kl_loss
from dsv4.model.rope import RotaryEmbedding
from dsv4.parallel.layers import make_layer_context

LAYER = {"swa": 0, "csa": 2, "hca": 3}  # debug schedule [0, 0, 4, 16, 4, 16, 0]


@pytest.fixture()
def debug_cfg(debug_cfg):
    """The debug preset with the quantization simulation off, so the naive attention references are exact."""
    return debug_cfg.replace(quant_sim=False)


# --- naive reference of one attention sublayer --------------------------------------------------------------------


def ref_rms(x, eps, weight=None):
    x = x.double()
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight.detach().double()


def ref_rope(x, positions, inv_freq, inverse=False):
    """Interleaved RoPE on the last 2*len(inv_freq) dims as complex multiplication (float64)."""
    x = x.double()
    r = 2 * inv_freq.numel()
    pairs = torch.view_as_complex(x[..., -r:].reshape(*x.shape[:-1], r // 2, 2).contiguous())
    angle = positions.double().unsqueeze(-1) * inv_freq.double()
    angle = angle.view(angle.shape[0], *([1] * (x.dim() - 2)), r // 2)
    rot = torch.polar(torch.ones_like(angle), -angle if inverse else angle)
    return torch.cat([x[..., :-r], torch.view_as_real(pairs * rot).flatten(-2)], dim=-1)


def ref_attention(attn: Attention, cfg, x, rope: RotaryEmbedding, entries_of) -> torch.Tensor:
    """One attention sublayer written out query by query (float64).

    entries_of(b, t) -> the compressed entries query t of sequence b attends to (besides its window).
    q = rope(rmsnorm_weightless(wq_b(q_norm(wq_a x)))), kv = rope(kv_norm(wkv x)); per head the sink softmax
    over window tokens t-W+1..t and the chosen entries; inverse rope at t; per group wo_a, then wo_b.
    """
    s, b, _ = x.shape
    H, D, G, R = cfg.num_heads, cfg.head_dim, cfg.o_groups, cfg.o_lora_rank
    inv = rope.main_inv_freq if attn.kind == "swa" else rope.compress_inv_freq
    pos = torch.arange(s)
    w = lambda lin: lin.weight.detach().double()  # noqa: E731
    q_lat = ref_rms(x.double() @ w(attn.wq_a).t(), cfg.rms_norm_eps, attn.q_norm.weight)
    q = ref_rope(ref_rms((q_lat @ w(attn.wq_b).t()).view(s, b, H, D), cfg.rms_norm_eps), pos, inv)
    kv = ref_rope(ref_rms(x.double() @ w(attn.wkv).t(), cfg.rms_norm_eps, attn.kv_norm.weight), pos, inv)
    comp = attn.compressor(x, rope).detach().double() if attn.compressor is not None else None
    sinks = attn.attn_sink.detach().double()
    o = torch.zeros(s, b, H, D, dtype=torch.float64)
    for bi in range(b):
        for t in range(s):
            keys = [kv[j, bi] for j in range(max(0, t - cfg.sliding_window + 1), t + 1)]
            keys += [comp[i, bi] for i in entries_of(bi, t)]
            keys = torch.stack(keys)
            for h in range(H):
                logits = keys @ q[t, bi, h] * D ** -0.5
                top = max(float(logits.max()), float(sinks[h]))
                e = torch.exp(logits - top)
                o[t, bi, h] = (e.unsqueeze(-1) * keys).sum(0) / (e.sum() + math.exp(float(sinks[h]) - top))
    o = ref_rope(o, pos, inv, inverse=True)
    wo_a = attn.wo_a.detach().double()
    per_group = H // G
    mid = torch.cat([o[:, :, g * per_group:(g + 1) * per_group].flatten(-2) @ wo_a[g * R:(g + 1) * R].t()
                     for g in range(G)], dim=-1)  # [s, b, G * R]
    return mid @ w(attn.wo_b).t()


def _attention(cfg, groups, kind, seed=0):
    torch.manual_seed(seed)
    attn = Attention(cfg, make_layer_context(groups.tp, cfg.init_std), LAYER[kind])
    with torch.no_grad():
        attn.attn_sink.copy_(torch.randn_like(attn.attn_sink))
        for name, p in attn.named_parameters():
            if name.endswith("ape"):
                p.copy_(torch.randn_like(p))
            elif name.endswith("wgate.weight"):
                p.mul_(20)
    return attn


def visible_entries(t, m, n):
    return [i for i in range(n) if (i + 1) * m - 1 <= t]


# --- schedule -----------------------------------------------------------------------------------------------------


def test_attention_phase_schedule(debug_cfg):
    """attention_phase(step): dense for dense_attention_steps, then indexer_warmup for indexer_warmup_steps,
    then sparse; with both 0 it is sparse from step 0."""
    cfg = debug_cfg.replace(dense_attention_steps=2, indexer_warmup_steps=3)
    assert [cfg.attention_phase(i) for i in range(7)] == ["dense"] * 2 + ["indexer_warmup"] * 3 + ["sparse"] * 2
    assert debug_cfg.attention_phase(0) == "sparse"
    only_warmup = debug_cfg.replace(indexer_warmup_steps=2)
    assert [only_warmup.attention_phase(i) for i in range(3)] == ["indexer_warmup"] * 2 + ["sparse"]


def test_set_step_switches_phase_and_trainable_params(debug_cfg, groups):
    """set_step applies the scheduled phase to every block (MTP included), freezes the idle indexers in the dense
    phase and all but the indexers in indexer_warmup; the sparse phase makes everything trainable again."""
    cfg = debug_cfg.replace(dense_attention_steps=1, indexer_warmup_steps=1)
    model = build_model(cfg, groups)
    indexer = {id(p) for p in model.indexer_parameters()}
    assert indexer and len(indexer) < len(list(model.parameters()))
    for step, phase in [(0, "dense"), (1, "indexer_warmup"), (2, "sparse"), (1, "indexer_warmup"), (0, "dense")]:
        assert model.set_step(step) == phase
        assert model.phase == phase
        assert all(block.attn.phase == phase for block in model.blocks())
        assert len(list(model.blocks())) == cfg.num_layers + cfg.mtp_depth
        for p in model.parameters():
            expected = {"dense": id(p) not in indexer, "indexer_warmup": id(p) in indexer, "sparse": True}[phase]
            assert p.requires_grad == expected, (phase, id(p) in indexer)
    with pytest.raises(ValueError):
        model.set_attention_phase("warmup")


# --- the indexer warm-up in the training loop: nothing but the indexers changes -----------------------------------

# step 0 dense (all but the indexers train and get optimizer state), steps 1-2 indexer warm-up, steps 3-4 sparse.
WARMUP = ["model.dense_attention_steps=1", "model.indexer_warmup_steps=2", "run.steps=5", "optim.warmup_steps=1",
          "optim.schedule=constant", "optim.lr=1e-3", "data.seq_length=128", "data.micro_batch_size=2",
          "data.global_batch_size=4", "run.eval_interval=0", "run.save_interval=0", "run.progress_bar=false"]


def _copy(state: dict) -> dict:
    return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in state.items()}


def _optimizer_state(optimizer) -> dict:
    """{id(model parameter): copies of its optimizer state on this rank}: AdamW moments, step count and the main
    (fp32 master / shard) parameter of megatron's optimizers, or DistributedMuon's momentum / moments / master."""
    from dsv4.optim.distributed import DistributedMuon
    from dsv4.train import loop

    if isinstance(optimizer, DistributedMuon):
        return {id(e.param): _copy(e.state) for e in optimizer.entries}
    out = {}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for model_param, main in loop._main_params(opt):
            out[id(model_param)] = {"main": main.detach().clone(), **_copy(opt.optimizer.state.get(main, {}))}
    return out


def _same(a, b) -> bool:
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def check_indexer_warmup_freezes_the_rest(cfg, groups, seed: int = 0) -> None:
    """Train the WARMUP schedule through the loop's train_step; in the warm-up every non-indexer parameter and its
    optimizer state stay bit-identical and every indexer parameter moves; in the sparse phase all train again."""
    from dsv4.train import loop

    chunks = loop.build_model(cfg, groups)
    optimizer = loop.build_optimizer(chunks, cfg, groups)
    models = [loop.unwrap(c) for c in chunks]
    named = [(m.global_name(n), p) for m in models for n, p in m.named_parameters()]
    indexer = {id(p) for m in models for p in m.indexer_parameters()}
    assert indexer and len(indexer) < len(named)
    gen = torch.Generator().manual_seed(seed)
    n_micro = cfg.data.global_batch_size // (cfg.data.micro_batch_size * groups.dp_size)

    def step(i):
        assert {m.set_step(i) for m in models} == {cfg.model.attention_phase(i)}
        batches = []
        for _ in range(n_micro):
            ids = torch.randint(0, cfg.model.vocab_size, (cfg.data.micro_batch_size, cfg.data.seq_length + 1),
                                generator=gen)
            batches.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:],
                            "loss_mask": torch.ones(ids.shape[0], ids.shape[1] - 1)})
        metrics = loop.train_step(chunks, optimizer, batches, cfg, groups, i)
        assert not metrics["skipped"]
        return metrics

    params = {id(p): p.detach().clone() for _, p in named}
    history = [step(0)]  # dense: all but the idle indexers train (so those tensors have optimizer state to keep)
    for name, p in named:
        assert torch.equal(p, params[id(p)]) == (id(p) in indexer), f"{name}: wrong tensors trained in the dense phase"
    params = {id(p): p.detach().clone() for _, p in named}
    state = _optimizer_state(optimizer)
    warm = [step(i) for i in (1, 2)]
    history += warm
    state_now = _optimizer_state(optimizer)
    for name, p in named:
        if id(p) in indexer:
            assert not torch.equal(p, params[id(p)]), f"{name}: the indexer did not train in its warm-up"
            continue
        assert torch.equal(p, params[id(p)]), f"{name} changed in the indexer warm-up"
        # (under ZeRO-1 a rank holds state only for the parameters its range of the buffer touches)
        before, now = state.get(id(p), {}), state_now.get(id(p), {})
        assert now.keys() == before.keys(), f"{name}: optimizer state {sorted(before)} -> {sorted(now)}"
        for key, value in now.items():
            assert _same(value, before[key]), f"{name}: optimizer state {key} changed in the warm-up"
    # The gradient norm is that of the indexers alone: their loss is the only one with a gradient.
    assert all(0 < m["grad_norm"] for m in warm)
    params = {id(p): p.detach().clone() for _, p in named}
    history.append(step(3))  # sparse: the whole model trains again
    moved = [name for name, p in named if not torch.equal(p, params[id(p)])]
    assert len(moved) == len(named), sorted({n for n, _ in named} - set(moved))
    history.append(step(4))  # a second sparse step: megatron's overlapped reduction is back in its normal mode
    return [p.detach().clone() for _, p in named], history


@pytest.mark.parametrize("overrides", [[], ["parallel.distributed_optimizer=false"], ["precision=bf16"],
                                       ["precision=bf16", "parallel.distributed_optimizer=false"],
                                       ["optim=muon"], ["optim=muon", "parallel.distributed_optimizer=false"]],
                         ids=["adamw-distopt", "adamw", "adamw-distopt-bf16", "adamw-bf16", "muon", "muon-unsharded"])
def test_indexer_warmup_changes_nothing_but_the_indexers(groups, overrides):
    """indexer_warmup through the training loop, one process: AdamW (megatron's distributed optimizer, its plain
    fp32 optimizer, bf16 parameters with fp32 master weights) and Muon: non-indexer parameters and their optimizer
    state (moments, step counts, master copies, momentum) bit-identical, the indexers trained; sparse: all train."""
    from dsv4.conf.schema import compose_config

    check_indexer_warmup_freezes_the_rest(compose_config("debug", [*WARMUP, *overrides]), groups)


def _warmup_worker(rank, world_size, overrides):
    from dsv4.conf.schema import compose_config
    from dsv4.parallel.state import init_distributed

    cfg = compose_config("debug", [*WARMUP, *overrides], world_size=world_size)
    p = cfg.parallel
    groups = init_distributed(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, vpp=p.vpp)
    params, history = check_indexer_warmup_freezes_the_rest(cfg, groups, seed=rank)
    if p.overlap_grad_reduce:  # the same run without overlapping the reduction: bit-identical
        plain = compose_config("debug", [*WARMUP, *overrides, "parallel.overlap_grad_reduce=false"],
                               world_size=world_size)
        params_plain, history_plain = check_indexer_warmup_freezes_the_rest(plain, groups, seed=rank)
        assert [m["loss"] for m in history] == [m["loss"] for m in history_plain]
        assert all(torch.equal(a, b) for a, b in zip(params, params_plain))


@pytest.mark.parametrize("overrides", [["data.micro_batch_size=1"], ["optim=muon", "data.micro_batch_size=1"],
                                       ["parallel.tp=2"],
                                       ["data.micro_batch_size=1", "parallel.overlap_grad_reduce=true"]],
                         ids=["dp2-adamw-distopt", "dp2-muon-sharded", "tp2-adamw", "dp2-adamw-distopt-overlap"])
def test_indexer_warmup_changes_nothing_but_the_indexers_on_two_ranks(overrides):
    """The same on 2 gloo ranks: data parallel with ZeRO-1 AdamW and with Muon sharded by whole tensors, and tensor
    parallel; every rank checks its own tensors and state. With megatron's overlapped gradient reduction (which
    learns which parameters get gradients, and must learn it again as the phases freeze and thaw tensors:
    `loop.relearn_overlapped_reduction`) the phases train bit-identically to the run without overlap."""
    from dist_utils import run_workers

    run_workers(_warmup_worker, 2, overrides, timeout=300)


# --- the phases in the model --------------------------------------------------------------------------------------


def _loss(model, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (2, 128), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (2, 128), generator=g)
    return model(ids, labels=labels)


def _has_grad(p) -> bool:
    return p.grad is not None and bool((p.grad != 0).any())


def test_indexer_warmup_trains_only_the_indexer(debug_cfg, groups):
    """indexer_warmup: the KL loss is present, and after loss.backward() only indexer parameters have gradients
    (every indexer tensor a non-zero one)."""
    model = build_model(debug_cfg, groups)
    model.set_attention_phase("indexer_warmup")
    out = _loss(model, debug_cfg)
    assert out.indexer_loss is not None and torch.isfinite(out.indexer_loss) and out.indexer_loss > 0
    out.loss.backward()
    indexer = {id(p) for p in model.indexer_parameters()}
    for name, p in model.named_parameters():
        if id(p) in indexer:
            assert _has_grad(p), name
        else:
            assert p.grad is None, name


def test_dense_phase_has_no_indexer_loss(debug_cfg, groups):
    """dense: no indexer loss, the indexers get no gradient, the rest of the model does."""
    model = build_model(debug_cfg, groups)
    model.set_attention_phase("dense")
    out = _loss(model, debug_cfg)
    assert out.indexer_loss is None
    out.loss.backward()
    indexer = {id(p) for p in model.indexer_parameters()}
    for name, p in model.named_parameters():
        if id(p) in indexer:
            assert p.grad is None or not (p.grad != 0).any(), name
    assert _has_grad(model.embed.weight) and _has_grad(model.layers[2].attn.wq_a.weight)
    assert _has_grad(model.layers[2].attn.compressor.wkv.weight)


def test_sparse_phase_trains_main_model_and_indexer(debug_cfg, groups):
    """sparse: the indexer loss is present; main parameters and indexer parameters all get gradients."""
    model = build_model(debug_cfg, groups)
    model.set_attention_phase("sparse")
    out = _loss(model, debug_cfg)
    assert out.indexer_loss is not None and out.indexer_loss > 0
    out.loss.backward()
    for p in model.indexer_parameters():
        assert _has_grad(p)
    csa = model.layers[2].attn
    for p in (model.embed.weight, model.head.weight, csa.wq_a.weight, csa.wq_b.weight, csa.wkv.weight,
              csa.compressor.wkv.weight, csa.attn_sink, model.layers[3].attn.compressor.wgate.weight):
        assert _has_grad(p)


def test_sparse_indexer_learns_only_from_its_loss(debug_cfg, groups):
    """sparse: the LM loss gives the indexers no gradient (their inputs are detached and the top-k is not
    differentiable), and the indexer loss gives the main model none (the teacher is detached)."""
    model = build_model(debug_cfg, groups)
    out = _loss(model, debug_cfg)
    (out.loss - debug_cfg.indexer_loss_coef * out.indexer_loss).backward(retain_graph=True)
    indexer = {id(p) for p in model.indexer_parameters()}
    for name, p in model.named_parameters():
        if id(p) in indexer:
            assert p.grad is None or not (p.grad != 0).any(), name
    model.zero_grad(set_to_none=True)
    out.indexer_loss.backward()
    for name, p in model.named_parameters():
        if id(p) not in indexer:
            assert p.grad is None or not (p.grad != 0).any(), name


def test_sparse_zero_indexer_coef_gives_indexer_no_gradient(debug_cfg, groups):
    """With indexer_loss_coef = 0 the total loss leaves every indexer gradient zero or None."""
    cfg = debug_cfg.replace(indexer_loss_coef=0.0)
    model = build_model(cfg, groups)
    out = _loss(model, cfg)
    assert out.indexer_loss is not None
    out.loss.backward()
    for p in model.indexer_parameters():
        assert p.grad is None or not (p.grad != 0).any()
    assert _has_grad(model.layers[2].attn.wq_a.weight)


# --- the phases in one CSA layer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["swa", "hca"])
def test_swa_and_hca_attention_match_naive(debug_cfg, groups, kind):
    """SWA: window only; HCA: window + every visible compressed entry (naive per-query attention)."""
    cfg = debug_cfg
    attn = _attention(cfg, groups, kind)
    rope = RotaryEmbedding(cfg)
    s = 48  # longer than the window (32), three HCA entries
    x = torch.randn(s, 2, cfg.hidden_size)
    m = attn.ratio
    entries = (lambda b, t: []) if kind == "swa" else (lambda b, t: visible_entries(t, m, s // m))
    with torch.no_grad():
        got = attn(x, rope)
    torch.testing.assert_close(got.double(), ref_attention(attn, cfg, x, rope, entries), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("phase", ["dense", "indexer_warmup"])
def test_dense_csa_attends_to_all_visible_entries(debug_cfg, groups, phase):
    """dense / indexer_warmup: a CSA layer attends to its window plus every visible compressed entry, like an HCA
    layer (naive per-query attention), and its output does not depend on the indexer's weights."""
    cfg = debug_cfg
    attn = _attention(cfg, groups, "csa")
    attn.phase = phase
    rope = RotaryEmbedding(cfg)
    s, m = 48, cfg.csa_ratio
    x = torch.randn(s, 2, cfg.hidden_size)
    with torch.no_grad():
        got = attn(x, rope)
        ref = ref_attention(attn, cfg, x, rope, lambda b, t: visible_entries(t, m, s // m))
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)
        for p in attn.indexer.parameters():
            p.add_(torch.randn_like(p))
        assert torch.equal(attn(x, rope), got)


def test_sparse_csa_attends_to_topk_entries(debug_cfg, groups):
    """sparse: a CSA layer attends to its window plus the top-k visible entries by indexer score (brute-force
    per-query sort), and the result differs from dense attention.

    Index scores tie whenever ReLU zeroes every head of a query-entry pair (score exactly 0); a query whose k-th
    and (k+1)-th best visible scores tie has no unique top-k, so such queries are left out of the comparison."""
    cfg = debug_cfg
    attn = _attention(cfg, groups, "csa")
    rope = RotaryEmbedding(cfg)
    s, m, k = 64, cfg.csa_ratio, cfg.index_topk
    n = s // m
    x = torch.randn(s, 2, cfg.hidden_size)
    with torch.no_grad():
        q_latent = attn.q_norm(attn.wq_a(x))
        scores = attn.indexer(x, q_latent, rope)  # [b, s, T], checked against brute force in test_primitives

        def ranked(b, t):
            return sorted(visible_entries(t, m, n), key=lambda i: -float(scores[b, t, i]))

        def unique_topk(b, t) -> bool:
            r = ranked(b, t)
            return len(r) <= k or float(scores[b, t, r[k - 1]]) != float(scores[b, t, r[k]])

        attn.phase = "sparse"
        got = attn(x, rope)
        ref = ref_attention(attn, cfg, x, rope, lambda b, t: ranked(b, t)[:k])
        compared = 0
        for b in range(2):
            for t in range(s):
                if unique_topk(b, t):
                    torch.testing.assert_close(got[t, b].double(), ref[t, b], rtol=1e-4, atol=1e-5)
                    compared += len(visible_entries(t, m, n)) > k
        assert compared >= 40, compared  # most queries that really select are checked
        attn.phase = "dense"
        assert not torch.allclose(attn(x, rope), got)


def test_sparse_equals_dense_when_topk_covers_all_entries(debug_cfg, groups):
    """With index_topk >= the number of compressed entries, sparse attention is exactly dense attention."""
    s = 128
    cfg = debug_cfg.replace(index_topk=s // debug_cfg.csa_ratio)
    attn = _attention(cfg, groups, "csa")
    rope = RotaryEmbedding(cfg)
    x = torch.randn(s, 2, cfg.hidden_size)
    with torch.no_grad():
        attn.phase = "sparse"
        sparse = attn(x, rope)
        attn.phase = "dense"
        assert torch.equal(sparse, attn(x, rope))


# --- the KL loss ----------------------------------------------------------------------------------------------------


def ref_kl(probs, scores, candidates) -> float:
    """Per query with candidates: p = sum_h probs / sum over candidates, q = softmax of the scores over the
    candidates, KL = sum_{c: p_c > 0} p_c log(p_c / q_c); mean over those queries."""
    b, h, s, T = probs.shape
    kls = []
    for bi in range(b):
        for t in range(s):
            cand = [c for c in range(T) if candidates[bi, t, c]]
            if not cand:
                continue
            p = {c: float(probs[bi, :, t, c].sum()) for c in cand}
            total = sum(p.values())
            if total == 0:
                continue
            z = sum(math.exp(float(scores[bi, t, c])) for c in cand)
            kl = 0.0
            for c in cand:
                pc = p[c] / total
                if pc > 0:
                    kl += pc * math.log(pc / (math.exp(float(scores[bi, t, c])) / z))
            kls.append(kl)
    return sum(kls) / len(kls)


def test_indexer_kl_loss_matches_formula(groups):
    """indexer_kl_loss = mean over queries with candidates of KL(p || softmax(I)); a query without candidates and
    a candidate with zero teacher mass are handled; the gradient reaches only the index scores."""
    torch.manual_seed(0)
    b, h, s, T = 2, 3, 4, 5
    probs = torch.rand(b, h, s, T, dtype=torch.float64).requires_grad_()
    scores = torch.randn(b, s, T, dtype=torch.float64).requires_grad_()
    candidates = torch.rand(b, s, T) < 0.6
    candidates[0, 0] = False  # no candidates: excluded from the mean
    candidates[1, 2] = True
    with torch.no_grad():
        probs[1, :, 2, 3] = 0.0  # a candidate the main attention gives no mass
    loss = indexer_kl_loss(probs, scores, candidates, groups.tp)
    assert float(loss.detach()) == pytest.approx(ref_kl(probs.detach(), scores.detach(), candidates), rel=1e-10)
    loss.backward()
    assert probs.grad is None
    assert scores.grad is not None and (scores.grad[~candidates] == 0).all()


def test_indexer_kl_loss_zero_when_indexer_matches_teacher(groups):
    """If softmax(I) over the candidates equals the normalised teacher, the KL is 0."""
    torch.manual_seed(1)
    probs = torch.rand(1, 2, 3, 4, dtype=torch.float64)
    candidates = torch.ones(1, 3, 4, dtype=torch.bool)
    scores = torch.log(probs.sum(1)) + 0.7  # any shift: softmax is shift invariant
    loss = indexer_kl_loss(probs, scores, candidates, groups.tp)
    assert abs(float(loss)) < 1e-12
