"""Activation recomputation of whole blocks (`parallel.recompute=block`; Megatron's "full" granularity per layer).

A recomputed block keeps only its input streams from the forward pass; its activations are rebuilt from them when
the backward pass reaches the block (`torch.utils.checkpoint`, non-reentrant, RNG state restored), so at most one
block's activations exist at a time, for about one more forward of compute. The replay must save the same tensors
as the forward did, so it runs the same code; only state that the forward *changes* must not change twice: the
router's token counts for the bias update (`replaying()` tells it). Auxiliary losses the replay recomputes are
discarded (the forward's ones are already in the loss).
"""

from __future__ import annotations

import threading

from torch.utils.checkpoint import checkpoint

_state = threading.local()


def replaying() -> bool:
    """True while a recomputed block is being replayed in the backward pass."""
    return getattr(_state, "replaying", False)


def recomputed(fn, *args):
    """fn(*args), keeping only the inputs for the backward pass and replaying fn there."""
    calls = 0

    def run(*inner):
        nonlocal calls
        calls += 1
        before, _state.replaying = replaying(), calls > 1
        try:
            return fn(*inner)
        finally:
            _state.replaying = before

    return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)
