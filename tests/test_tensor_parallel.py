"""The model split over 2 tensor-parallel ranks (gloo, CPU) equals the unsplit model.

Query heads, indexer heads, output groups and the vocabulary are split; a model built with the same seed is the
same model for every tensor-parallel size, so the TP=2 logits, losses and gradients must match TP=1's.
"""

import torch

from dist_utils import run_workers


def _tp2_matches_tp1(rank, world_size):
    import torch.distributed as dist

    import dsv4
    from dsv4.parallel.state import init_distributed

    groups = init_distributed(tp=2)
    # A single-rank group per rank, for the reference model (every rank must create every group).
    solo = [dist.new_group([r]) for r in range(world_size)][rank]

    def build(tp_group):
        torch.manual_seed(0)
        from dsv4.model.transformer import DSV4Model

        return DSV4Model(dsv4.model_config("debug"), tp_group).train()

    split, whole = build(groups.tp), build(solo)
    ids = torch.randint(0, 1024, (2, 128), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, 1)
    out_split, out_whole = split(ids, labels, return_logits=True), whole(ids, labels, return_logits=True)
    torch.testing.assert_close(out_split.logits, out_whole.logits, atol=2e-5, rtol=0)
    for name in ("loss", "lm_loss", "indexer_loss", "balance_loss"):
        torch.testing.assert_close(getattr(out_split, name), getattr(out_whole, name), atol=2e-5, rtol=0)
    out_split.loss.backward()
    out_whole.loss.backward()
    whole_params = dict(whole.named_parameters())
    checked = 0
    for name, p in split.named_parameters():
        ref = whole_params[name].grad
        if getattr(p, "tensor_model_parallel", False):
            ref = ref.chunk(2, dim=p.partition_dim)[rank]
        assert (p.grad is None) == (ref is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref, atol=1e-5, rtol=1e-4, msg=name)
            checked += 1
    assert checked > 50


def test_tensor_parallel_2_equals_unsplit_model():
    run_workers(_tp2_matches_tp1, 2, timeout=300)
