"""The model split over 2 tensor-parallel ranks (gloo, CPU) equals the unsplit model, with and without sequence
parallelism.

Query heads, indexer heads, output groups, the shared expert and the vocabulary are split; a model built with the
same seed is the same model for every tensor-parallel size, so the TP=2 logits, losses and gradients (after
`finalize_grads` sums the partial gradients of replicated parameters) must match TP=1's.
"""

import pytest
import torch

from dist_utils import run_workers


def _tp2_matches_tp1(rank, world_size, sequence_parallel):
    import torch.distributed as dist

    import dsv4
    from dsv4.parallel.grads import finalize_grads
    from dsv4.parallel.state import init_distributed

    groups = init_distributed(tp=2)
    # A single-rank group per rank, for the reference model (every rank must create every group).
    solo = [dist.new_group([r]) for r in range(world_size)][rank]

    def build(tp_group):
        from dsv4.model.transformer import DSV4Model

        return DSV4Model(dsv4.model_config("debug"), tp_group, sequence_parallel=sequence_parallel, seed=0).train()

    split, whole = build(groups.tp), build(solo)
    ids = torch.randint(0, 1024, (2, 128), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, 1)
    out_split, out_whole = split(ids, labels, return_logits=True), whole(ids, labels, return_logits=True)
    torch.testing.assert_close(out_split.logits, out_whole.logits, atol=2e-5, rtol=0)
    for name in ("loss", "lm_loss", "indexer_loss", "balance_loss"):
        torch.testing.assert_close(getattr(out_split, name), getattr(out_whole, name), atol=2e-5, rtol=0)
    out_split.loss.backward()
    out_whole.loss.backward()
    finalize_grads([split], groups)
    whole_params = dict(whole.named_parameters())
    checked = 0
    for name, p in split.named_parameters():
        ref = whole_params[name].grad
        # Dense split parameters are tp shards; routed experts (allreduce=False) are split over etp, 1 here.
        if getattr(p, "tensor_model_parallel", False) and getattr(p, "allreduce", True):
            ref = ref.chunk(2, dim=p.partition_dim)[rank]
        assert (p.grad is None) == (ref is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref, atol=1e-5, rtol=1e-4, msg=name)
            checked += 1
    assert checked > 50


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_tensor_parallel_2_equals_unsplit_model(sequence_parallel):
    run_workers(_tp2_matches_tp1, 2, sequence_parallel, timeout=300)
