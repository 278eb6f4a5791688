"""Learning-rate schedules and the loss-weight schedule that follows them (spec section 7).

V4: 2000 linear warm-up steps, then cosine decay of the peak LR to a tenth. The MTP loss weight drops from 0.3 to
0.1 at optim.mtp_weight_switch_step, by default where a warm-up-stable-decay (WSD) schedule starts its decay, under
every schedule (V3 switched when its constant-LR phase ended, after 10T of 14.8T tokens). WSD is offered for runs
whose length is not fixed up front.
"""

from __future__ import annotations

import math

from dsv4.conf.groups import OptimConfig


def wsd_decay_start(optim: OptimConfig, total_steps: int) -> int:
    """The first step of a WSD schedule's decay: the last decay_fraction of the run, after the warm-up."""
    return max(optim.warmup_steps, total_steps - int(round(optim.decay_fraction * total_steps)))


def decay_start(optim: OptimConfig, total_steps: int) -> int:
    """The first step of the decay phase (total_steps: never, for the constant schedule)."""
    if optim.schedule == "wsd":
        return wsd_decay_start(optim, total_steps)
    if optim.schedule == "cosine":
        return optim.warmup_steps
    return total_steps


def learning_rate(optim: OptimConfig, step: int, total_steps: int) -> float:
    """LR for optimizer step `step` (0-based) of a `total_steps` run."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    start = decay_start(optim, total_steps)
    if step < start:
        return optim.lr
    progress = min(1.0, (step - start) / max(1, total_steps - 1 - start))
    if optim.schedule == "cosine":
        return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress))
    return optim.lr + (optim.min_lr - optim.lr) * progress  # wsd: linear decay


def mtp_weight_switch(optim: OptimConfig, total_steps: int) -> int:
    """The first step with the lowered MTP loss weight: optim.mtp_weight_switch_step, or (-1) the WSD decay start."""
    if optim.mtp_weight_switch_step >= 0:
        return optim.mtp_weight_switch_step
    return wsd_decay_start(optim, total_steps)


def mtp_loss_weight(optim: OptimConfig, model_weight: float, step: int, total_steps: int) -> float:
    """model.mtp_loss_weight before the switch step, optim.mtp_loss_weight_after_decay from it on."""
    return model_weight if step < mtp_weight_switch(optim, total_steps) else optim.mtp_loss_weight_after_decay
