"""The progress line of train/metrics.py's Monitor: the ETA of a resumed run comes from this process's steps."""

import sys

from dsv4.train.metrics import Monitor


class FakeClock:
    """Seconds that advance only when the test says so."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_eta_of_a_resumed_run_uses_the_rate_of_this_process(tmp_path, capsys):
    """Resumed at step 50 of 100: 10 steps in 20 s here is 2 s a step, so 40 steps left take 80 s (counting the 50
    resumed steps as done would give 20 s / 60 steps x 40 = 13 s)."""
    clock = FakeClock()
    monitor = Monitor(str(tmp_path), 100, enabled=True, progress_bar=False, start_step=50, clock=clock)
    clock.now += 20.0
    monitor.progress(60, "loss 1.0")
    monitor.close()
    line = capsys.readouterr().out.strip()
    assert line.startswith("step     60/100 loss 1.0") and line.endswith("eta 0:01:20"), line


def test_eta_of_a_fresh_run(tmp_path, capsys):
    clock = FakeClock()
    monitor = Monitor(str(tmp_path), 100, enabled=True, progress_bar=False, clock=clock)
    clock.now += 30.0
    monitor.progress(10, "x")
    monitor.close()
    assert capsys.readouterr().out.strip().endswith("eta 0:04:30")  # 3 s a step, 90 steps left


def test_progress_bar_of_a_resumed_run_starts_at_the_resumed_step(tmp_path, monkeypatch):
    """tqdm computes its rate from the steps after `initial`: the bar starts at the resumed step."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monitor = Monitor(str(tmp_path), 100, enabled=True, progress_bar=True, start_step=50)
    try:
        assert monitor.bar is not None and monitor.bar.format_dict["initial"] == 50 and monitor.bar.n == 50
    finally:
        monitor.close()
