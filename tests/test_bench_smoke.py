"""The benchmarks of bench/ run end to end at tiny sizes (their figures are in bench/RESULTS.md, not checked here):
the KV cache accounting, one training step of dsv4 and of the matched megatron-core GPT, and the overhead variants
that change the model (plain residual, no MTP); and `--device cuda` on a machine without a GPU stops at once."""

import math
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, BENCH)
    import kv_cache
    import overheads
    import throughput

    yield {"kv_cache": kv_cache, "throughput": throughput, "overheads": overheads}
    sys.path.remove(BENCH)


def test_kv_cache_bench(bench, capsys):
    assert bench["kv_cache"].main(["--tokens", "65536", "--real-tokens", "2048"]) == 0  # meta == real everywhere
    out = capsys.readouterr().out
    for row in ("| flash | bf16 |", "| pro | reference |", "| v3.2 | bf16 |", "| debug | 1,024 | bf16 |"):
        assert row in out


def test_throughput_workers_train_a_step_with_matched_parameters(bench):
    tp = bench["throughput"]
    script = os.path.join(BENCH, "throughput.py")
    runs = {system: tp.run_worker([script, "--worker", system, "--models", "debug", "--lengths", "128", "--steps",
                                   "1"], timeout=300) for system in tp.SYSTEMS}
    for system, r in runs.items():
        assert "step_s" in r and math.isfinite(r["loss"]), (system, r)
    # The megatron baseline has as many parameters as dsv4 touches per token (within 1%).
    assert abs(runs["megatron"]["params"] / runs["dsv4"]["active"] - 1) < 0.01
    assert runs["megatron"]["shape"]["dsv4_active"] == runs["dsv4"]["active"]
    # --recompute: both systems recompute their layers; dsv4's training is unchanged by it (same loss after a step).
    again = {system: tp.run_worker([script, "--worker", system, "--models", "debug", "--lengths", "128", "--steps",
                                    "1", "--recompute"], timeout=300) for system in tp.SYSTEMS}
    assert again["dsv4"]["loss"] == runs["dsv4"]["loss"]
    assert math.isfinite(again["megatron"]["loss"]), again["megatron"]


@pytest.mark.parametrize("variant", ["plain_residual", "no_mtp"])
def test_overhead_comparisons_train_both_models(bench, variant):
    ov = bench["overheads"]
    r = bench["throughput"].run_worker([os.path.join(BENCH, "overheads.py"), "--worker", variant, "--points",
                                        "debug:128", "--steps", "2"], timeout=300)
    assert len(r["v4_s"]) == len(r["variant_s"]) == 2, r
    assert math.isfinite(r["v4"]["loss"]) and math.isfinite(r["variant"]["loss"])
    base = ov.variant_config("v4", "debug", 128, 2).model
    cfg = ov.variant_config(variant, "debug", 128, 2).model
    if variant == "no_mtp":
        assert cfg.mtp_depth == 0 and cfg.compress_ratios == base.compress_ratios[:base.num_layers]
        assert r["variant"]["params"] < r["v4"]["params"]
    else:
        # One stream and no mixing weights: the variant has none of mHC's parameters.
        assert cfg.hc_mult == 1
        n, d, blocks = base.hc_mult, base.hidden_size, base.num_layers + base.mtp_depth
        mhc = 2 * blocks * ((2 + n) * n * n * d + (2 + n) * n + 3) + (1 + base.mtp_depth) * (n * n * d + n + 1)
        assert r["v4"]["params"] - r["variant"]["params"] == mhc


def test_plain_residual_is_x_plus_f_of_x(bench):
    import torch

    ov = bench["overheads"]
    streams, out = torch.randn(5, 2, 1, 8), torch.randn(5, 2, 8)
    res = ov.PlainResidual(None)
    pre, post, mix = res.weights(streams)
    assert torch.equal(res.collapse(streams, pre), streams[:, :, 0])
    assert torch.equal(res.expand(out, streams, post, mix), streams + out.unsqueeze(-2))
    assert torch.equal(ov.PlainHead(None)(streams), streams[:, :, 0])


@pytest.mark.parametrize("script", ["attention_scaling.py", "throughput.py"])
def test_device_cuda_without_a_gpu_exits_2_naming_the_fix(bench, script):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run([sys.executable, os.path.join(BENCH, script), "--device", "cuda"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert done.stderr.strip().splitlines()[-1] == bench["throughput"].NO_CUDA
    assert "no CUDA device visible to torch" in done.stderr and "use --device cpu" in done.stderr
    assert done.stdout == ""  # nothing measured, no subprocess started


def test_profile_step_reports_the_top_operators(tmp_path):
    """bench/profile_step.py profiles one debug step (in a fresh process: it builds a single-process world) and
    appends a table of operators by self CPU time, with call counts."""
    out = tmp_path / "r.md"
    done = subprocess.run([sys.executable, os.path.join(BENCH, "profile_step.py"), "--length", "128", "--top", "5",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = out.read_text()
    assert "### Profile of one training step" in report and "operator calls" in report
    rows = [line for line in report.splitlines() if line.startswith("| `")]
    assert len(rows) == 5 and all(float(r.split("|")[2]) >= 0 for r in rows)
    assert "--out" not in report
