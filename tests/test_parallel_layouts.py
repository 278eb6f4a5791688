"""Every parallel layout trains like one process (gloo, several processes on this machine, fp32).

For each layout the first step's gradients of every parameter (reassembled from the tensor-, expert- and
pipeline-parallel shards) and the losses and gradient norms of 10 optimizer steps must equal a single process
running the same global batch (12 sequences of 128 tokens, 3 micro-batches per replica):
  - first-step gradients: atol 2e-5, rtol 1e-4 (float32 sums in another order);
  - per-step LM loss, total loss and gradient norm over 10 steps: rtol 2e-4;
  - the validation loss of the initial weights over the same 12 validation sequences (run.eval_iters counts the
    job's micro-batches, split over the data-parallel ranks): abs 1e-6;
  - every parameter after the 10 steps: atol 2e-4, rtol 1e-3 (weights of scale ~0.1 that moved ~1e-2; Adam divides
    each element's gradient by its own RMS, so an element whose gradient is ~0 moves by noise, up to ~lr = 1e-3).
The same holds for V4's Muon + AdamW (`optim=muon`, Newton-Schulz in fp32 for the comparison). The first-step
gradients are taken with an all-reduce even under the distributed optimizer (which only keeps its
shard); the 10 training steps run the layout's real path (reduce-scatter, sharded AdamW, parameter all-gather).
"""

import json
import os

import pytest
import torch

from dist_utils import run_workers

STEPS = 10
# The seed: the model routes tokens and picks compressed entries by top-k, so a float sum taken in another order
# (~1e-7, what a layout changes) flips a choice whose two scores are that close, and the runs then part by far more
# than rounding (seen: with seed 1234 and the query-block attention, ep2 moved one layer's router and experts by 1e-3
# over 10 steps while a near-tie-free seed agrees to 1e-7). That is not a layout bug, so the runs use a seed whose 10
# steps hold no such near-tie under any layout here; a real layout bug shows at every seed. No checkpoints: saving is
# tested in test_checkpoint.py.
VALID_SEQUENCES = 12  # validation sequences of the initial weights, evaluated by every layout
COMMON = [f"run.steps={STEPS}", "optim.warmup_steps=2", "data.seq_length=128", "data.global_batch_size=12",
          "run.eval_interval=0", "run.log_interval=5", "run.progress_bar=false", "optim.lr=1e-3", "run.seed=1",
          "run.save_interval=0"]

# name -> (world size, overrides); micro-batch size x dp x 3 micro-batches = 12 sequences. AdamW (megatron-core's
# optimizer, distributed by default).
LAYOUTS = {
    "tp2": (2, ["parallel.tp=2", "data.micro_batch_size=4"]),
    "tp2-no-sp": (2, ["parallel.tp=2", "parallel.sp=false", "data.micro_batch_size=4"]),
    "pp2": (2, ["parallel.pp=2", "data.micro_batch_size=4"]),
    "pp3-vpp2": (3, ["parallel.pp=3", "parallel.vpp=2", "data.micro_batch_size=4", "run.eval_iters=3"]),
    "ep2": (2, ["parallel.ep=2", "data.micro_batch_size=2"]),
    "ep2-etp2": (4, ["parallel.ep=2", "parallel.etp=2", "data.micro_batch_size=1"]),
    "dp2-distopt": (2, ["data.micro_batch_size=2"]),
    "dp2-distopt-overlap": (2, ["data.micro_batch_size=2", "parallel.overlap_grad_reduce=true"]),
    "tp2-pp2": (4, ["parallel.tp=2", "parallel.pp=2", "data.micro_batch_size=4"]),
    "tp2-ep2": (4, ["parallel.tp=2", "parallel.ep=2", "data.micro_batch_size=2"]),
    "tp2-pp2-ep2-dp2": (8, ["parallel.tp=2", "parallel.pp=2", "parallel.ep=2", "data.micro_batch_size=2"]),
}

# V4's Muon + AdamW (dsv4.optim.distributed), state sharded by whole tensors over the replicas. Newton-Schulz in
# fp32 here: in bf16 (V4's default) gradients summed in another order round differently and layouts agree to ~1e-3.
MUON = ["optim=muon", "optim.lr=1e-3", "optim.warmup_steps=2", "optim.muon_ns_dtype=float32"]
MUON_LAYOUTS = {
    "muon-dp2": (2, [*MUON, "data.micro_batch_size=2"]),
    "muon-tp2": (2, [*MUON, "parallel.tp=2", "data.micro_batch_size=4"]),
    "muon-ep2": (2, [*MUON, "parallel.ep=2", "data.micro_batch_size=2"]),
    "muon-tp2-dp2": (4, [*MUON, "parallel.tp=2", "data.micro_batch_size=2"]),
    "muon-pp2": (2, [*MUON, "parallel.pp=2", "data.micro_batch_size=4"]),
    "muon-ep2-etp2": (4, [*MUON, "parallel.ep=2", "parallel.etp=2", "data.micro_batch_size=1"]),
}


def _whole_gradients(chunks, groups, of=None) -> dict:
    """Every parameter's gradient (or `of(param)`) as in the unsplit model (on rank 0; None elsewhere). Copies of
    one slice held by several ranks (replicas, the embedding's MTP copy) must agree."""
    import torch.distributed as dist

    from dsv4.parallel.grads import param_grad
    from dsv4.train.loop import unwrap

    local = []
    for chunk in map(unwrap, chunks):
        for name, p in chunk.named_parameters():
            grad = param_grad(p) if of is None else of(p)
            if grad is None:
                continue
            expert = not getattr(p, "allreduce", True)
            split = getattr(p, "tensor_model_parallel", False)
            shard = (dist.get_rank(groups.etp) if expert else groups.tp_rank) if split else 0
            local.append((chunk.global_name(name), groups.ep_rank if expert else 0, shard,
                          getattr(p, "partition_dim", None) if split else None, grad.detach().float().cpu().clone()))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    if dist.get_rank() != 0:
        return None
    pieces: dict = {}
    for name, ep_rank, shard, dim, grad in (entry for rank_entries in gathered for entry in rank_entries):
        slot = pieces.setdefault(name, {})
        key = (ep_rank, shard)
        if key in slot:
            torch.testing.assert_close(grad, slot[key][1], atol=2e-5, rtol=1e-4, msg=f"copies of {name} differ")
        else:
            slot[key] = (dim, grad)
    whole = {}
    for name, slot in pieces.items():
        per_ep = []
        for ep_rank in sorted({e for e, _ in slot}):
            shards = [slot[(e, s)] for e, s in sorted(slot) if e == ep_rank]
            dim = shards[0][0]
            per_ep.append(shards[0][1] if dim is None else torch.cat([g for _, g in shards], dim=dim))
        whole[name] = per_ep[0] if len(per_ep) == 1 else torch.cat(per_ep, dim=0)
    return whole


def _run_layout(rank, world_size, cache_dir, out_dir, overrides):
    """A worker: the first step's whole gradients, then 10 training steps; rank 0 writes both."""
    from dsv4.conf.schema import compose_config
    from dsv4.parallel.grads import finalize_grads
    from dsv4.parallel.state import init_distributed
    from dsv4.train import loop
    from dsv4.train.data import build_data
    from dsv4.train.schedules import mtp_loss_weight

    args = [f"data.cache_dir={cache_dir}", f"run.output_dir={out_dir}/run", *COMMON, *overrides]
    mbs = compose_config("debug", args, world_size=world_size).data.micro_batch_size
    # run.eval_iters counts the job's validation micro-batches: VALID_SEQUENCES sequences under every layout.
    cfg = compose_config("debug", [*args, f"run.eval_iters={VALID_SEQUENCES // mbs}"], world_size=world_size)
    p = cfg.parallel
    groups = init_distributed(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, vpp=p.vpp)
    chunks = loop.build_model(cfg, groups)
    for chunk in chunks:
        loop.unwrap(chunk).set_step(0)
    data = build_data(cfg, dp_rank=groups.dp_rank, dp_size=groups.dp_size)
    valid = loop.evaluate(chunks, data.valid(), cfg, groups)["valid/lm_loss"]  # the initial weights: the same
    train = iter(data.train)
    n_micro = cfg.data.global_batch_size // (cfg.data.micro_batch_size * groups.dp_size)
    batches = [next(train) for _ in range(n_micro)]
    w_mtp = mtp_loss_weight(cfg.optim, cfg.model.mtp_loss_weight, 0, cfg.run.steps)
    loop._run_schedule(chunks, batches, cfg, forward_only=False, mtp_loss_weight=w_mtp)
    finalize_grads(chunks, groups, force_all_reduce=True)
    grads = _whole_gradients(chunks, groups)
    del chunks

    result = loop.train(cfg)
    history = result.history
    params = _whole_gradients(result.chunks, groups, of=lambda p: p)
    if rank == 0:
        torch.save({"grads": grads, "params": params, "valid": valid}, os.path.join(out_dir, "grads.pt"))
        with open(os.path.join(out_dir, "history.json"), "w") as f:
            json.dump([{k: m[k] for k in ("lm_loss", "loss", "grad_norm")} for m in history], f)


def _results(cache_dir, out_dir, world_size, overrides):
    run_workers(_run_layout, world_size, cache_dir, str(out_dir), overrides, timeout=900)
    with open(out_dir / "history.json") as f:
        history = json.load(f)
    saved = torch.load(out_dir / "grads.pt")
    return saved["grads"], saved["params"], history, saved["valid"]


@pytest.fixture(scope="module")
def single(cache_dir, tmp_path_factory):
    """The reference: one process, micro-batch 12 in 3 micro-batches of 4, every expert, the whole model."""
    return _results(cache_dir, tmp_path_factory.mktemp("single"), 1, ["data.micro_batch_size=4"])


@pytest.fixture(scope="module")
def single_muon(cache_dir, tmp_path_factory):
    """The Muon reference: one process, as `single`."""
    return _results(cache_dir, tmp_path_factory.mktemp("single-muon"), 1, [*MUON, "data.micro_batch_size=4"])


PARAM_TOL = {"atol": 2e-4, "rtol": 1e-3}


def _assert_same_run(layout, got, ref, param_tol):
    grads, params, history, valid = got
    ref_grads, ref_params, ref_history, ref_valid = ref
    # The same validation sequences under every layout (weighted by their loss tokens): the same loss.
    assert valid == pytest.approx(ref_valid, abs=1e-6, rel=0), f"{layout}: validation loss of the initial weights"
    assert set(grads) == set(ref_grads) and set(params) == set(ref_params)
    for name, want in ref_grads.items():
        torch.testing.assert_close(grads[name], want, atol=2e-5, rtol=1e-4, msg=f"{layout}: gradient of {name}")
    for step, (g, r) in enumerate(zip(history, ref_history, strict=True), start=1):
        for key in ("lm_loss", "loss", "grad_norm"):
            assert g[key] == pytest.approx(r[key], rel=2e-4), f"{layout}: {key} at step {step}"
    for name, want in ref_params.items():
        torch.testing.assert_close(params[name], want, **param_tol, msg=f"{layout}: parameter {name} after training")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_trains_like_one_process(cache_dir, tmp_path, single, layout):
    world_size, overrides = LAYOUTS[layout]
    _assert_same_run(layout, _results(cache_dir, tmp_path, world_size, overrides), single, PARAM_TOL)


@pytest.mark.parametrize("layout", list(MUON_LAYOUTS))
def test_muon_layout_trains_like_one_process(cache_dir, tmp_path, single_muon, layout):
    """Distributed Muon (whole-tensor ownership, tensor-parallel gathers, expert-local blocks) == one process."""
    world_size, overrides = MUON_LAYOUTS[layout]
    _assert_same_run(layout, _results(cache_dir, tmp_path, world_size, overrides), single_muon, PARAM_TOL)


def test_pipeline_stages_split_layers_evenly_in_interleaved_order():
    from dsv4.model.transformer import layer_split, pipeline_stages

    assert layer_split(6, 2) == [3, 3]
    assert layer_split(7, 3) == [3, 2, 2]  # the remainder on the first stages: the last also runs head and MTP
    assert layer_split(6, 2, [4, 2]) == [4, 2]
    # pp 3 x vpp 2: rank r holds virtual stages r and 3 + r (megatron's interleaving order).
    chunks = pipeline_stages(6, pp=3, pp_rank=1, vpp=2)
    assert [(c.first_layer, c.end_layer, c.vp_stage) for c in chunks] == [(1, 2, 0), (4, 5, 1)]
    assert not any(c.pre_process or c.post_process for c in chunks)
    first, last = pipeline_stages(6, pp=3, pp_rank=0, vpp=2)[0], pipeline_stages(6, pp=3, pp_rank=2, vpp=2)[1]
    assert first.pre_process and not first.post_process and (first.first_layer, first.end_layer) == (0, 1)
    assert last.post_process and not last.pre_process and (last.first_layer, last.end_layer) == (5, 6)
    for bad in ([3, 2], [4, 1, 1], [6, 0]):
        with pytest.raises(ValueError, match="parallel.pp_layers"):
            layer_split(6, 2, bad)
    with pytest.raises(ValueError, match="cannot fill 8 pipeline stages"):
        layer_split(6, 8)


def test_pipeline_chunks_hold_their_blocks_with_global_kinds(debug_cfg, groups):
    """A stage builds only its blocks, each with its global index (attention kind, hash routing), with the same
    weights as the whole model; the last stage holds the head, MTP and an embedding copy equal to the first's."""
    from dsv4.model.transformer import DSV4Model, pipeline_stages

    whole = DSV4Model(debug_cfg, groups.tp, seed=3)
    first, last = (DSV4Model(debug_cfg, groups.tp, stage=s, seed=3)
                   for s in (pipeline_stages(6, pp=2, pp_rank=0)[0], pipeline_stages(6, pp=2, pp_rank=1)[0]))
    assert len(first.layers) == len(last.layers) == 3 and last.layer_offset == 3
    assert [b.attn.kind for b in last.layers] == [b.attn.kind for b in whole.layers[3:]]
    assert first.mtp is not None and len(first.mtp) == 0 and len(last.mtp) == len(whole.mtp)
    whole_params = dict(whole.named_parameters())
    for chunk in (first, last):
        for name, p in chunk.named_parameters():
            assert torch.equal(p, whole_params[chunk.global_name(name)]), name
    assert last.embed.weight.shared and not getattr(first.embed.weight, "shared", False)
