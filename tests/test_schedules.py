"""LR schedules, the MTP-weight schedule, and the FLOPs model."""

import math

import pytest

from dsv4.conf.groups import OptimConfig
from dsv4.conf.schema import compose_config
from dsv4.train.flops import _mean_visible, _mean_window, training_flops_per_token
from dsv4.train.schedules import decay_start, learning_rate, mtp_loss_weight


def test_cosine_warms_up_linearly_then_decays_to_min_lr():
    o = OptimConfig(lr=1.0, min_lr=0.1, schedule="cosine", warmup_steps=10)
    lrs = [learning_rate(o, s, 110) for s in range(110)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1)
    assert lrs[60] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 50 / 99)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_wsd_is_stable_then_decays_linearly_over_the_last_fraction():
    o = OptimConfig(lr=1.0, min_lr=0.0, schedule="wsd", warmup_steps=5, decay_fraction=0.2)
    lrs = [learning_rate(o, s, 100) for s in range(100)]
    assert decay_start(o, 100) == 80
    assert lrs[5:80] == pytest.approx([1.0] * 75)
    assert lrs[99] == pytest.approx(0.0)
    assert lrs[90] == pytest.approx(1 - 10 / 19)


def test_constant_schedule_after_warmup():
    o = OptimConfig(lr=2.0, schedule="constant", warmup_steps=2)
    assert [learning_rate(o, s, 10) for s in range(4)] == pytest.approx([1.0, 2.0, 2.0, 2.0])
    assert learning_rate(o, 9, 10) == 2.0


def test_mtp_weight_drops_when_lr_decay_starts():
    """V4: MTP loss weight 0.3, then 0.1 once the WSD learning-rate decay starts."""
    o = OptimConfig(schedule="wsd", warmup_steps=5, decay_fraction=0.5, mtp_loss_weight_after_decay=0.1)
    assert [mtp_loss_weight(o, 0.3, s, 20) for s in (0, 9, 10, 19)] == [0.3, 0.3, 0.1, 0.1]


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_mtp_weight_switches_at_the_wsd_decay_start_under_every_schedule(schedule):
    """Default (-1): the switch is where a WSD decay would start (here step 80 of 100), not the end of warm-up
    (cosine decays from step 10): V3 kept 0.3 until its constant-LR phase ended."""
    o = OptimConfig(schedule=schedule, warmup_steps=10, decay_fraction=0.2)
    assert o.mtp_weight_switch_step == -1
    assert [mtp_loss_weight(o, 0.3, s, 100) for s in (0, 10, 79, 80, 99)] == [0.3, 0.3, 0.3, 0.1, 0.1]


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_mtp_weight_switch_step_explicit(schedule):
    o = OptimConfig(schedule=schedule, warmup_steps=10, mtp_weight_switch_step=30, mtp_loss_weight_after_decay=0.05)
    assert [mtp_loss_weight(o, 0.3, s, 100) for s in (0, 29, 30, 99)] == [0.3, 0.3, 0.05, 0.05]
    never = OptimConfig(schedule=schedule, warmup_steps=10, mtp_weight_switch_step=100)
    assert {mtp_loss_weight(never, 0.3, s, 100) for s in range(100)} == {0.3}


def test_mtp_weight_switch_step_bad_value_is_refused():
    from dsv4.conf.schema import ConfigError

    with pytest.raises(ConfigError, match=r"optim.mtp_weight_switch_step.*-1 for the WSD decay start, got -2"):
        compose_config("debug", ["optim.mtp_weight_switch_step=-2"])
    assert compose_config("debug", ["optim.mtp_weight_switch_step=5"]).optim.mtp_weight_switch_step == 5


@pytest.mark.parametrize("s,r,cap", [(128, 4, None), (128, 4, 8), (131, 16, None), (7, 4, 3), (1000, 128, 2),
                                     (5, 8, None)])
def test_visible_entry_count_matches_brute_force(s, r, cap):
    brute = sum(min((t + 1) // r, cap if cap is not None else s) for t in range(s)) / s
    assert _mean_visible(s, r, cap) == pytest.approx(brute)


@pytest.mark.parametrize("s,w", [(10, 32), (100, 32), (32, 32)])
def test_window_count_matches_brute_force(s, w):
    assert _mean_window(s, w) == pytest.approx(sum(min(t + 1, w) for t in range(s)) / s)


def test_flops_model_of_flash_is_near_six_times_active_parameters():
    """At 4K tokens attention is a small share: FLOPs/token ~ 6 x 13B active (plus attention, MTP and head)."""
    cfg = compose_config("flash", ["data.seq_length=4096"]).model
    f = training_flops_per_token(cfg, 4096)
    assert 6 * 13e9 < f < 6 * 13e9 * 1.3


def test_sparse_attention_is_cheaper_than_dense_at_long_context():
    """CSA's top-k caps what a query attends to: at 1M tokens sparse costs less than dense compressed attention."""
    cfg = compose_config("flash", ["data.seq_length=4096"]).model
    assert training_flops_per_token(cfg, 1 << 20, "sparse") < training_flops_per_token(cfg, 1 << 20, "dense")
