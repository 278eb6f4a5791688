"""FP8 GEMMs and V4's FP4 expert QAT on CPU (dsv4/parallel/fp8.py, model/moe.py): tile quantization against a
naive per-tile reference and per-format error bounds, the three GEMMs of an FP8 linear against their explicit
quantize-dequantize composition, PyTorch's scaled_mm (tensorwise, which runs on CPU) against the emulation, the
straight-through gradient, the choice of backend with TransformerEngine absent, config validation, start-up errors,
and short training runs with the emulated FP8 path."""

import math
import os
import subprocess
import sys

import pytest
import torch

from dsv4.conf.schema import compose_config
from dsv4.model.config import ConfigError
from dsv4.model.quant import fp4_e2m1_qdq, straight_through
from dsv4.parallel.fp8 import Fp8Plan, dequantize_tiles, fp8_linear, quantize_tiles, resolve_fp8

FMAX = {"e4m3": 448.0, "e5m2": 57344.0}
# Half a step of the format: relative for normal values (3 / 2 mantissa bits), absolute (times the tile's scale)
# for subnormal ones (smallest step 2^-9 / 2^-16).
REL = {"e4m3": 2.0 ** -4, "e5m2": 2.0 ** -3}
SUB = {"e4m3": 2.0 ** -10, "e5m2": 2.0 ** -17}


def _naive_tiles(t, tile, fmt, scale_kind):
    """Quantize-dequantize tile by tile in Python loops: the reference for quantize_tiles."""
    dtype = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]
    m, k = t.shape
    r, c = tile or (m, k)
    out = torch.empty(m, k)
    for i in range(0, m, r):
        for j in range(0, k, c):
            block = t[i:i + r, j:j + c].float()
            scale = block.abs().max().clamp_min(1e-12) / FMAX[fmt]  # fp32 arithmetic, as the scales are fp32
            if scale_kind == "e8m0":
                scale = torch.exp2(torch.ceil(torch.log2(scale)))
            out[i:i + r, j:j + c] = (block / scale).clamp(-FMAX[fmt], FMAX[fmt]).to(dtype).float() * scale
    return out


CASES = [((1, 128), "e4m3", "fp32"), ((128, 128), "e4m3", "fp32"), (None, "e4m3", "fp32"), (None, "e5m2", "fp32"),
         ((1, 32), "e4m3", "e8m0"), ((1, 128), "e5m2", "fp32")]


@pytest.mark.parametrize("tile, fmt, scale_kind", CASES)
def test_tile_quantization_matches_naive_reference_and_error_bound(tile, fmt, scale_kind):
    g = torch.Generator().manual_seed(0)
    # Rows of very different magnitudes (outliers), and sizes that are not multiples of the tiles (edge tiles).
    t = torch.randn(200, 300, generator=g) * torch.logspace(-3, 2, 200).unsqueeze(1)
    q, scale = quantize_tiles(t, tile, fmt, scale_kind)
    assert q.dtype == {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]
    r, c = tile or t.shape
    assert scale.shape == (math.ceil(200 / r), math.ceil(300 / c))
    back = dequantize_tiles(q, scale, tile)
    assert torch.equal(back, _naive_tiles(t, tile, fmt, scale_kind))
    full_scale = scale.repeat_interleave(r, 0).repeat_interleave(c, 1)[:200, :300]
    bound = torch.maximum(REL[fmt] * t.abs(), SUB[fmt] * full_scale) * (1 + 1e-6)
    assert ((back - t).abs() <= bound).all()
    if scale_kind == "fp32":  # each tile's largest magnitude lands on the format's largest value
        assert torch.allclose((q.float().abs()).amax(), torch.tensor(FMAX[fmt]))


def _explicit(plan, a, a_kind, b, b_kind):
    fa, ta, ka = plan.tiles(a_kind)
    fb, tb, kb = plan.tiles(b_kind)
    return (dequantize_tiles(*quantize_tiles(a, ta, fa, ka), ta) @
            dequantize_tiles(*quantize_tiles(b, tb, fb, kb), tb).t())


@pytest.mark.parametrize("recipe", ["blockwise", "tensorwise", "mxfp8"])
def test_fp8_linear_gemms_are_the_quantized_compositions(recipe):
    """fprop x W^T, dgrad dy W, wgrad dy^T x, each on operands quantized along their contraction dimension."""
    plan = Fp8Plan(recipe, "emulate", ("attention",), block=32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 50, 96, generator=g, requires_grad=True)
    w = (torch.randn(64, 96, generator=g) * 0.05).requires_grad_()
    dy = torch.randn(3, 50, 64, generator=g)
    y = fp8_linear(x, w, plan)
    y.backward(dy)
    x2, dy2 = x.detach().reshape(-1, 96), dy.reshape(-1, 64)
    assert torch.allclose(y.detach().reshape(-1, 64), _explicit(plan, x2, "act", w.detach(), "weight"), atol=1e-6)
    assert torch.allclose(x.grad.reshape(-1, 96), _explicit(plan, dy2, "grad", w.detach().t(), "weight"), atol=1e-6)
    assert torch.allclose(w.grad, _explicit(plan, dy2.t(), "grad", x2.t(), "act"), atol=1e-5)
    # Close to the exact GEMMs, but not equal: the rounding is really applied.
    exact = x.detach() @ w.detach().t()
    rel = (y.detach() - exact).norm() / exact.norm()
    assert 0 < rel < 0.08, rel


def test_blockwise_weight_blocks_serve_w_and_w_transposed():
    """128 x 128 weight blocks are the same blocks of W^T: dgrad reuses the forward's quantized weight."""
    plan = Fp8Plan("blockwise", "emulate", ("attention",), block=16)
    w = torch.randn(48, 80)
    fmt, tile, kind = plan.tiles("weight")
    assert torch.equal(dequantize_tiles(*quantize_tiles(w, tile, fmt, kind), tile).t(),
                       dequantize_tiles(*quantize_tiles(w.t(), tile, fmt, kind), tile))


def test_torch_scaled_mm_tensorwise_equals_emulation():
    """The torch backend's GEMM (torch.nn.functional.scaled_mm, tensorwise: the recipe PyTorch runs on CPU) gives the
    emulation's result, forward and backward, up to the order of accumulation."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 128, generator=g)
    w = torch.randn(96, 128, generator=g) * 0.05
    dy = torch.randn(64, 96, generator=g)
    results = {}
    for backend in ("torch", "emulate"):
        xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8_linear(xb, wb, Fp8Plan("tensorwise", backend, ("attention",)))
        y.backward(dy)
        results[backend] = (y.detach(), xb.grad, wb.grad)
    for a, b in zip(results["torch"], results["emulate"]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_fp4_expert_qat_is_straight_through():
    w = torch.randn(16, 64, requires_grad=True)
    x = torch.randn(8, 64)
    y = x @ straight_through(w, lambda t: fp4_e2m1_qdq(t, 32)).t()
    y.sum().backward()
    assert torch.equal(w.grad, torch.ones(8, 16).t() @ x)  # the gradient of x @ w^T, as if unquantized
    assert torch.equal(y.detach(), x @ fp4_e2m1_qdq(w.detach(), 32).t())  # the forward sees FP4 weights


@pytest.mark.parametrize("kwargs, backend", [
    (dict(cuda_available=True, capability=(9, 0), te_available=True), "te"),
    (dict(cuda_available=True, capability=(8, 0), te_available=True), "te"),
    (dict(cuda_available=True, capability=(9, 0), te_available=False), "torch"),
    (dict(cuda_available=True, capability=(10, 0), te_available=False), "torch"),
])
def test_auto_backend_choice(kwargs, backend):
    assert resolve_fp8("blockwise", "auto", ["attention"], **kwargs).backend == backend


@pytest.mark.parametrize("recipe, backend, kwargs, needles", [
    ("blockwise", "auto", dict(cuda_available=False, capability=None, te_available=False),
     ["precision.fp8=blockwise", "no GPU", "TransformerEngine is not installed", "Hopper", "precision=bf16",
      "precision.fp8_backend=emulate"]),
    ("blockwise", "auto", dict(cuda_available=True, capability=(8, 0), te_available=False),
     ["compute capability 8.0", "TransformerEngine is not installed", "Hopper"]),
    ("mxfp8", "auto", dict(cuda_available=True, capability=(9, 0), te_available=False), ["mxfp8", "Hopper"]),
    ("blockwise", "te", dict(cuda_available=False, capability=None, te_available=False),
     ["precision.fp8_backend=te", "not installed", "CUDA GPU"]),
    ("blockwise", "torch", dict(cuda_available=True, capability=(8, 9), te_available=False),
     ["compute capability 9.0 or newer", "8.9"]),
    ("mxfp8", "torch", dict(cuda_available=True, capability=(10, 0), te_available=False),
     ["precision.fp8=mxfp8", "TransformerEngine"]),
    ("delayed", "emulate", dict(cuda_available=False, capability=None, te_available=False), ["amax histories"]),
])
def test_backend_that_cannot_run_is_refused_with_the_fix(recipe, backend, kwargs, needles):
    with pytest.raises(ConfigError) as err:
        resolve_fp8(recipe, backend, ["attention"], **kwargs)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_plan_details():
    cpu = dict(cuda_available=False, capability=None, te_available=False)
    assert resolve_fp8("none", "auto", ["attention"], **cpu) is None
    plan = resolve_fp8("tensorwise", "emulate", ["attention", "experts"], block=32, **cpu)
    assert plan.covers("experts") and not plan.covers("indexer") and not plan.covers(None)
    assert plan.tiles("grad")[0] == "e5m2" and plan.tiles("act")[0] == "e4m3"
    with pytest.raises(ConfigError, match="precision.fp8_block=32: the torch backend's blockwise GEMMs use 128"):
        resolve_fp8("blockwise", "torch", ["attention"], block=32, cuda_available=True, capability=(9, 0),
                    te_available=False)


@pytest.mark.parametrize("override, key", [
    ("precision.fp8=fp4", "precision.fp8"), ("precision.fp8_backend=cutlass", "precision.fp8_backend"),
    ("precision.fp8_modules=[router]", "precision.fp8_modules"), ("precision.fp8_modules=[]", "precision.fp8_modules"),
    ("precision.fp8_block=0", "precision.fp8_block"), ("precision.params_dtype=float16", "precision.params_dtype"),
])
def test_precision_config_rejects_bad_values(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_config(overrides=[override])


def test_precision_presets():
    cfg = compose_config()
    assert cfg.precision.params_dtype == "auto" and cfg.precision.fp8 == "none"
    assert cfg.precision.torch_params_dtype(cuda_available=False) == torch.float32
    assert cfg.precision.torch_params_dtype(cuda_available=True) == torch.bfloat16
    fp8 = compose_config(overrides=["precision=fp8"]).precision
    assert (fp8.params_dtype, fp8.fp8, fp8.fp8_backend, fp8.fp8_modules) == ("bfloat16", "blockwise", "auto",
                                                                              ["attention"])
    with pytest.raises(ConfigError, match="quant_fp4_block"):
        compose_config(overrides=["model.quant_sim_experts=true", "model.quant_fp4_block=48"])


def test_fp8_on_cpu_stops_at_start_up_with_the_fix(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-m", "dsv4.train", "precision=fp8", f"run.output_dir={run_dir}",
                           f"data.cache_dir={cache_dir}", "run.steps=30"], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=300)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: precision=fp8 may run here")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "dsv4-train: precision.fp8=blockwise: no FP8 GEMMs on this machine (no GPU)" in done.stderr
    assert "precision.fp8_backend=emulate" in done.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()


TRAIN = ["run.steps=6", "run.eval_interval=0", "run.progress_bar=false", "optim.warmup_steps=1",
         "data.seq_length=64", "data.micro_batch_size=2", "data.global_batch_size=2", "run.save_interval=0"]


def _losses(overrides, cache_dir, tmp_path, name):
    """Losses of a short run in this process's single-process world (the session's `groups`, which `train` reuses:
    tearing it down here would leave later tests holding dead groups)."""
    from dsv4.train.loop import train

    cfg = compose_config(overrides=[*TRAIN, f"data.cache_dir={cache_dir}", f"run.output_dir={tmp_path / name}",
                                    *overrides])
    return [h["loss"] for h in train(cfg).history]


def test_training_with_emulated_fp8_and_fp4_expert_qat_stays_close_to_fp32(cache_dir, tmp_path, groups):
    """Six steps of the debug model with every FP8 module group (blockwise, 32-wide tiles: the debug model is
    narrower than 128) and with FP4 expert QAT: finite losses within 2% of the fp32 run's, and not equal to them."""
    base = _losses([], cache_dir, tmp_path, "fp32")
    fp8 = _losses(["precision.fp8=blockwise", "precision.fp8_backend=emulate", "precision.fp8_block=32",
                   "precision.fp8_modules=[attention,indexer,experts]"], cache_dir, tmp_path, "fp8")
    qat = _losses(["model.quant_sim_experts=true"], cache_dir, tmp_path, "qat")
    for other in (fp8, qat):
        assert len(other) == len(base) == 6
        assert all(math.isfinite(v) for v in other)
        assert other != base
        assert max(abs(a - b) / b for a, b in zip(other, base)) < 0.02, (other, base)


def test_fp8_proxy_script(tmp_path):
    """bench/fp8_proxy.py (the H200 run): its proxy configuration is valid, and its smoke mode (tiny model, CPU,
    emulated FP8) runs end to end and reports both runs."""
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    sys.path.insert(0, bench)
    try:
        from fp8_proxy import PROXY
    finally:
        sys.path.remove(bench)
    cfg = compose_config("flash", [o for o in PROXY if not o.startswith("model=")] + ["precision=bf16"])
    assert cfg.model.num_layers == 12 and cfg.data.seq_length == 4096
    done = subprocess.run([sys.executable, os.path.join(bench, "fp8_proxy.py"), "--smoke"], capture_output=True,
                          text=True, cwd=str(tmp_path), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| fp8-blockwise-emulate |" in done.stdout and "relative loss gap" in done.stdout


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _fp8_tp2_matches_tp1(rank, world_size, sequence_parallel):
    """With blockwise FP8 tiles that align with the tensor-parallel split, the split model computes the unsplit
    one's FP8 GEMMs, up to the float rounding of the tensor-parallel sums, which FP8 rounding downstream can
    amplify for a few elements. In backward, the layers inside a region that every rank holds whole (q down-
    projection, K=V head, compressors) see per-rank partial output gradients, each quantized on its own before the
    sum, which moves every gradient upstream of them by a fraction of FP8's own effect. So the split model is
    compared with the unsplit one against that effect (unsplit FP8 vs unsplit fp32): logits below a quarter of it, gradients
    below half of it; a wrong collective or a misplaced tile shows up at its scale or above."""
    import torch.distributed as dist

    import dsv4
    from dsv4.model.transformer import DSV4Model
    from dsv4.parallel.fp8 import Fp8Plan
    from dsv4.parallel.grads import finalize_grads
    from dsv4.parallel.state import init_distributed

    groups = init_distributed(tp=2)
    solo = [dist.new_group([r]) for r in range(world_size)][rank]
    plan = Fp8Plan("blockwise", "emulate", ("attention", "indexer", "experts"), block=16)
    build = lambda group: DSV4Model(dsv4.model_config("debug"), group, sequence_parallel=sequence_parallel, seed=0,
                                    fp8=plan).train()
    split, whole = build(groups.tp), build(solo)
    assert any(type(m).__name__.startswith("_Fp8") for m in split.modules())
    ids = torch.randint(0, 1024, (2, 128), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, 1)
    out_split, out_whole = split(ids, labels, return_logits=True), whole(ids, labels, return_logits=True)
    # A last-bit difference of a row-parallel sum can move an element across an FP8 rounding boundary downstream,
    # so the split model agrees to well below the FP8 rounding itself (the gap to an unquantized model), not bitwise.
    exact = DSV4Model(dsv4.model_config("debug"), solo, sequence_parallel=sequence_parallel, seed=0).train()
    fp8_gap = _rel(whole(ids, labels, return_logits=True).logits, exact(ids, labels, return_logits=True).logits)
    assert _rel(out_split.logits, out_whole.logits) < fp8_gap / 4, (fp8_gap, _rel(out_split.logits,
                                                                                   out_whole.logits))
    torch.testing.assert_close(out_split.loss, out_whole.loss, atol=1e-3, rtol=0)
    for model in (split, whole, exact):
        model(ids, labels).loss.backward()
    finalize_grads([split], groups)
    # All gradients as one vector (split weights compared with their shard of the unsplit gradient): the split
    # model's distance to the unsplit FP8 model is well below FP8's own effect (the unsplit FP8 vs fp32 model).
    whole_params, exact_params = dict(whole.named_parameters()), dict(exact.named_parameters())
    parts = {True: ([], [], []), False: ([], [], [])}  # split weights / replicated ones: this model, unsplit, fp32
    for name, p in split.named_parameters():
        g, g_exact = whole_params[name].grad, exact_params[name].grad
        is_split = getattr(p, "tensor_model_parallel", False) and getattr(p, "allreduce", True)
        if is_split:
            g, g_exact = g.chunk(2, dim=p.partition_dim)[rank], g_exact.chunk(2, dim=p.partition_dim)[rank]
        for bucket, t in zip(parts[is_split], (p.grad, g, g_exact)):
            bucket.append(t.flatten())
    gaps = {}
    for is_split, (mine, ref, ref_exact) in parts.items():
        mine, ref, ref_exact = torch.cat(mine), torch.cat(ref), torch.cat(ref_exact)
        gaps[is_split] = (_rel(mine, ref), _rel(ref, ref_exact))
    print(f"rank {rank}: logits {_rel(out_split.logits, out_whole.logits):.2e} (FP8 vs fp32 {fp8_gap:.2e}); "
          f"gradients of split weights {gaps[True][0]:.2e} (FP8 vs fp32 {gaps[True][1]:.2e}), replicated "
          f"{gaps[False][0]:.2e} (FP8 vs fp32 {gaps[False][1]:.2e})")
    assert gaps[True][0] < gaps[True][1] / 2, gaps
    assert gaps[False][0] < gaps[False][1] / 2, gaps


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_fp8_tensor_parallel_2_equals_unsplit_model(sequence_parallel):
    from dist_utils import run_workers

    run_workers(_fp8_tp2_matches_tp1, 2, sequence_parallel, timeout=300)
