"""Activation recomputation (`parallel.recompute=block`): the same losses, gradients and router counts as keeping
every activation, far fewer bytes saved for the backward pass, and the collectives of tensor and expert
parallelism replayed correctly."""

import pytest
import torch

from dist_utils import run_workers

from dsv4.conf.schema import ConfigError, compose_config


def _models(groups, **kw):
    import dsv4
    from dsv4.model.transformer import DSV4Model

    cfg = dsv4.model_config("debug")
    return (DSV4Model(cfg, groups.tp, seed=0, **kw).train(), DSV4Model(cfg, groups.tp, seed=0, recompute=True,
                                                                         **kw).train())


def _batch(b=2, s=128):
    ids = torch.randint(0, 1024, (b, s), generator=torch.Generator().manual_seed(3))
    return ids, torch.roll(ids, -1, 1)


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while fn() runs (a storage counted once while it lives)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _saved_count(fn) -> int:
    """How many tensors autograd saves for backward while fn() runs."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        out = fn()
    return out, len(saved)


def test_recomputed_blocks_give_the_same_loss_gradients_and_router_counts(groups):
    plain, recomputed = _models(groups)
    ids, labels = _batch()
    (out_p, saved_p), (out_r, saved_r) = (_saved_bytes(lambda m=m: m(ids, labels)) for m in (plain, recomputed))
    out_p.loss.backward()
    out_r.loss.backward()
    assert torch.equal(out_p.loss, out_r.loss)
    for (name, p), r in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
        assert (p.grad is None) == (r.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(r.grad, p.grad, rtol=0, atol=0, msg=name)
    counts = [(m.gate.tokens_per_expert.clone(), n.gate.tokens_per_expert.clone())
              for m, n in zip(plain.modules(), recomputed.modules()) if hasattr(m, "gate")
              and hasattr(m.gate, "tokens_per_expert")]
    assert counts and all(torch.equal(a, b) and a.sum() > 0 for a, b in counts)  # the replay does not count again
    # What backward keeps: each block's input streams instead of all its activations.
    assert saved_r < saved_p / 4, (saved_r, saved_p)


def test_recompute_is_off_in_evaluation_and_without_grad(groups):
    """Nothing to save for backward: evaluation and no-grad forwards run the blocks directly, same results."""
    plain, recomputed = _models(groups)
    ids, labels = _batch()
    with torch.no_grad():
        assert torch.equal(plain(ids, labels).loss, recomputed(ids, labels).loss)
    plain.eval(), recomputed.eval()
    (out_p, saved_p), (out_r, saved_r) = (_saved_count(lambda m=m: m(ids, labels)) for m in (plain, recomputed))
    assert torch.equal(out_p.loss, out_r.loss) and saved_r == saved_p > 100


def test_training_with_recompute_follows_the_same_losses(cache_dir, tmp_path, groups):
    from dsv4.train.loop import train

    common = ["run.steps=4", "run.eval_interval=0", "run.progress_bar=false", "optim.warmup_steps=1",
              "data.seq_length=128", "data.micro_batch_size=2", "data.global_batch_size=4", "run.save_interval=0",
              f"data.cache_dir={cache_dir}"]
    runs = [train(compose_config(overrides=[*common, f"run.output_dir={tmp_path / mode}",
                                            f"parallel.recompute={mode}"])).history for mode in ("none", "block")]
    assert [h["loss"] for h in runs[0]] == [h["loss"] for h in runs[1]]
    assert [h["grad_norm"] for h in runs[0]] == [h["grad_norm"] for h in runs[1]]


def test_bad_recompute_value_is_rejected():
    with pytest.raises(ConfigError, match=r"parallel.recompute.*none, block.*'layer'"):
        compose_config(overrides=["parallel.recompute=layer"])


def _tp_ep_recompute(rank, world_size):
    """tp2 + sp with the experts spread over ep2: the replayed blocks re-run the all-gathers, reduce-scatters and
    all-to-alls in the backward pass; gradients equal those of keeping every activation."""
    from dsv4.parallel.grads import finalize_grads
    from dsv4.parallel.state import init_distributed

    groups = init_distributed(tp=2, ep=2)
    plain, recomputed = _models(groups, ep_group=groups.ep, sequence_parallel=True)
    ids, labels = _batch()
    for model in (plain, recomputed):
        model(ids, labels).loss.backward()
        finalize_grads([model], groups)
    for (name, p), r in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(r.grad, p.grad, rtol=0, atol=0, msg=name)


def test_recompute_under_tensor_sequence_and_expert_parallelism():
    run_workers(_tp_ep_recompute, 2, timeout=300)
