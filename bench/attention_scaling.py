"""Attention cost vs sequence length: DeepSeek-V4's attention sublayers against dense causal attention (CPU or GPU).

    python bench/attention_scaling.py [--lengths 4096 8192 16384 32768 65536] [--repeats 3] [--threads 1]
                                      [--device cpu|cuda] [--dtype bfloat16|float32] [--out bench/RESULTS.md]

One V4 attention sublayer of each kind, SWA (window only), CSA in the sparse phase (window + the indexer's top-k,
training mode, so its KL loss and the indexer's backward are included) and HCA (window + every visible m'=128 entry),
against a dense sublayer: the same module's projections (wq_a, q_norm, wq_b, wkv, kv_norm, RoPE, grouped wo_a / wo_b)
around torch's scaled_dot_product_attention(is_causal=True) over all tokens, with the same query heads and head_dim
(the one K=V head broadcast to every head). So the whole sublayer is timed on both sides with equal projections;
only the attention core (and V4's compressors and indexer) differ. The V4 mix is the flash schedule's share of each
kind (`compress_ratios` of conf/model/flash.yaml over its 43 blocks) applied to the measured per-kind figures.

Dims are V4-shaped but reduced so that 64K tokens run in minutes on 2 cores (`BENCH_DIMS`). Every measurement is one
forward + backward in a fresh subprocess (after a short warm-up at 1024 tokens); peak memory is that process's peak
resident set (ru_maxrss) minus its resident set just before the timed step. Each length runs `--repeats` rounds; in
each round every kind and the dense sublayer run back to back (side by side, so a noisy neighbour hits both), and
the median over rounds is reported. A measurement longer than `--single-above` seconds is not repeated (marked).
A fifth sublayer, `proj`, is the dense one with the attention core replaced by q + kv: the projections, norms and
RoPE every variant pays, i.e. the floor under any attention core. Analytic forward FLOPs (`forward_flops`) count the
projections, the attention-core matrix products over the keys each query really sees, the compressors and the
indexer.

Threads: one by default. On a VM whose cores other jobs share, two OpenMP threads make every small parallel op wait
for the thread that lost its core: the blocked V4 layers run thousands of such ops (CSA at 8K tokens: 77 s with 2
threads vs 8 s with 1), while one SDPA call does not notice (7.3 s vs 7.6 s).

`--device cuda` (one GPU; the default is the CPU, as above): the same sublayers and dims on the GPU, parameters and
inputs in `--dtype` (bfloat16 by default; norms, sinks and compressors stay fp32 as in the model, and V4's blocked
attention core computes in fp32 whatever the input), dense SDPA through torch's CUDA kernels. There the timed step
follows a warm-up step at the same length (kernels' first calls and the caching allocator's growth are not timed)
and is timed between `torch.cuda.synchronize()` calls; peak memory is `torch.cuda.max_memory_allocated()` after
`torch.cuda.reset_peak_memory_stats()`, minus the memory allocated before the step. A further table gives the
achieved model TFLOP/s and MFU: training FLOPs = 3 x the analytic forward FLOPs, over the time, over the GPU's dense
peak for the dtype (`GPU_PEAK_TFLOPS` of bench/throughput.py: H200 989.5 bf16, 67 fp32). The report's header names
the GPU, torch, CUDA and the dtype.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import gpu_description, gpu_peak_flops, require_cuda  # noqa: E402  the benches' GPU helpers

KINDS = ("swa", "csa", "hca", "dense", "proj")
LAYER = {"swa": 0, "csa": 2, "hca": 3, "dense": 0, "proj": 0}  # flash schedule: blocks 0-1 SWA, then CSA / HCA alternating
BENCH_DIMS = ["model.hidden_size=512", "model.num_heads=8", "model.head_dim=128", "model.rope_head_dim=64",
              "model.q_lora_rank=256", "model.o_groups=2", "model.o_lora_rank=256", "model.sliding_window=128",
              "model.csa_ratio=4", "model.hca_ratio=128", "model.index_n_heads=8", "model.index_head_dim=64",
              "model.index_topk=512", "model.quant_sim=false"]


def bench_config():
    from dsv4.conf.schema import compose_config

    return compose_config("flash", [*BENCH_DIMS, "data.seq_length=4096"]).model


def forward_flops(cfg, kind: str, s: int) -> dict:
    """Analytic forward FLOPs of one sublayer at s tokens (2 per multiply-add), by part."""
    d, h, D, W = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.sliding_window
    proj = 2 * s * (d * cfg.q_lora_rank + cfg.q_lora_rank * h * D + d * D + h * D * cfg.o_lora_rank
                    + cfg.o_groups * cfg.o_lora_rank * d)
    window_pairs = sum(min(t + 1, W) for t in range(min(s, W))) + max(0, s - W) * W

    def visible_pairs(m, cap=None):  # sum over queries of the entries they see (complete blocks), capped at top-k
        return sum(min(cap, (t + 1) // m) if cap else (t + 1) // m for t in range(s))

    parts = {"projections": proj, "core": 0, "compressor": 0, "indexer": 0}
    if kind in ("dense", "proj"):
        parts["core"] = 4 * h * D * s * (s + 1) // 2 if kind == "dense" else 0  # q.k and p.v, causal pairs
        return parts
    if kind == "swa":
        parts["core"] = 4 * h * D * window_pairs
    elif kind == "hca":
        parts["core"] = 4 * h * D * (window_pairs + visible_pairs(cfg.hca_ratio))
        parts["compressor"] = 2 * 2 * s * d * D  # wkv and wgate, d -> D
    else:
        hi, c, k = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        picked = visible_pairs(cfg.csa_ratio, k)
        parts["core"] = 4 * h * D * (window_pairs + picked)
        parts["compressor"] = 2 * 2 * s * d * 2 * D  # overlapped: wkv and wgate, d -> 2D
        per_score = 2 * hi * c + 2 * hi  # q.k for every indexer head, then the weighted head sum
        parts["indexer"] = (2 * s * cfg.q_lora_rank * hi * c + 2 * s * d * hi + 2 * 2 * s * d * 2 * c
                            + per_score * (visible_pairs(cfg.csa_ratio) + picked))  # select, then KL on the picks
    return parts


# --- one measurement (in its own process) ---------------------------------------------------------------------------


def dense_forward(attn, x, rope, core: str = "sdpa"):
    """The V4 sublayer's projections around dense causal SDPA over all tokens (no window, sink or compression);
    core "none" replaces the attention by q + kv (the projections' share)."""
    import torch
    import torch.nn.functional as F

    from dsv4.model.norm import rms_normalize
    from dsv4.model.rope import apply_rope

    s, b, _ = x.shape
    cos, sin = rope(torch.arange(s, device=x.device), attn.rope_type)
    q = attn.wq_b(attn.q_norm(attn.wq_a(x))).view(s, b, attn.n_local_heads, attn.head_dim)
    q = apply_rope(rms_normalize(q, attn.eps), cos, sin).permute(1, 2, 0, 3)  # [b, h, s, D]
    kv = apply_rope(attn.kv_norm(attn.wkv(x)), cos, sin).transpose(0, 1).unsqueeze(1)  # [b, 1, s, D]
    if core == "sdpa":
        kv = kv.expand(b, attn.n_local_heads, s, attn.head_dim)
        out = F.scaled_dot_product_attention(q, kv, kv, is_causal=True, scale=attn.scale)  # [b, h, s, D]
    else:
        out = q + kv
    out = apply_rope(out.permute(2, 0, 1, 3), cos, sin, inverse=True).reshape(s, b, attn.n_local_groups, -1)
    wo_a = attn.wo_a.view(attn.n_local_groups, attn.o_lora_rank, -1)
    return attn.wo_b(torch.einsum("sbgi,gri->sbgr", out, wo_a).flatten(2))


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(kind: str, s: int, threads: int, device: str = "cpu", dtype: str = "float32") -> dict:
    import torch

    from dsv4.model.attention import Attention
    from dsv4.model.rope import RotaryEmbedding
    from dsv4.parallel.layers import make_layer_context
    from dsv4.parallel.state import init_distributed

    torch.set_num_threads(threads)
    cfg = bench_config()
    groups = init_distributed()
    torch.manual_seed(0)
    attn = Attention(cfg, make_layer_context(groups.tp, cfg.init_std, getattr(torch, dtype)), LAYER[kind]).train()
    attn.phase = "sparse"
    rope = RotaryEmbedding(cfg)
    if device == "cuda":
        attn.cuda()
        rope.cuda()

    def step(n: int) -> None:
        x = torch.randn(n, 1, cfg.hidden_size, device=device, dtype=getattr(torch, dtype), requires_grad=True)
        aux: dict = {}
        if kind in ("dense", "proj"):
            out = dense_forward(attn, x, rope, "sdpa" if kind == "dense" else "none")
        else:
            out = attn(x, rope, aux)
        loss = out.square().mean() + sum(aux.get("indexer", []))
        loss.backward()

    if device == "cuda":
        return cuda_timed_step(attn, step, s)
    step(1024)  # warm-up: library initialisation, first-call allocations
    attn.zero_grad(set_to_none=True)
    base = current_rss_mb()
    t0 = time.perf_counter()
    step(s)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"seconds": seconds, "peak_mb": peak - base}


def cuda_timed_step(attn, step, s: int) -> dict:
    """The GPU measurement: a warm-up step at the measured length, then one step between synchronisations; its peak
    allocation above what was allocated before it."""
    import torch

    step(s)
    attn.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    step(s)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}


def measure(kind: str, s: int, threads: int, device: str = "cpu", dtype: str = "float32") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, str(s), "--threads", str(threads)]
    if device == "cuda":
        cmd += ["--device", device, "--dtype", dtype]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} at {s} tokens failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the report -------------------------------------------------------------------------------------------------------


def schedule_shares(cfg) -> dict:
    kinds = [cfg.layer_kind(i) for i in range(cfg.num_layers)]
    return {k: kinds.count(k) / len(kinds) for k in ("swa", "csa", "hca")}


def slope(xs: list, ys: list) -> float:
    """Growth exponent between the first and the last point: d log y / d log x (nan for a single length)."""
    if xs[-1] == xs[0]:
        return float("nan")
    return math.log(ys[-1] / ys[0]) / math.log(xs[-1] / xs[0])


NAMES = {"swa": "SWA", "csa": "CSA", "hca": "HCA", "mix": "V4 mix", "dense": "dense", "proj": "proj only"}
GOAL_LENGTH, GOAL_RATIO = 32768, 0.15


def table(lengths: list, values: dict, unit: str, fmt: str, marks: dict | None = None) -> str:
    """Rows per length: every column's value, then SWA/CSA/HCA/mix over dense; last row the growth exponents."""
    cols, rel = ("swa", "csa", "hca", "mix", "dense", "proj"), ("swa", "csa", "hca", "mix")
    lines = ["| tokens | " + " | ".join(f"{NAMES[k]} {unit}" for k in cols) + " | "
             + " | ".join(f"{NAMES[k]} / dense" for k in rel) + " |", "|---" * (1 + len(cols) + len(rel)) + "|"]
    for s in lengths:
        mark = (lambda k: (marks or {}).get((k, s), ""))
        lines.append(f"| {s} | " + " | ".join(format(values[k][s], fmt) + mark(k) for k in cols) + " | "
                     + " | ".join(f"{values[k][s] / values['dense'][s]:.3f}" for k in rel) + " |")
    lines.append(f"| exponent {lengths[0]}-{lengths[-1]} | "
                 + " | ".join(f"{slope(lengths, [max(values[k][s], 1e-9) for s in lengths]):.2f}" for k in cols)
                 + " |" + " |" * len(rel))
    return "\n".join(lines)


def report(cfg, lengths: list, results: dict, args, wall_s: float) -> str:
    import torch

    shares = schedule_shares(cfg)
    med, mem, marks = {}, {}, {}
    for k in KINDS:
        med[k] = {s: statistics.median(r["seconds"] for r in results[k][s]) for s in lengths}
        mem[k] = {s: statistics.median(r["peak_mb"] for r in results[k][s]) for s in lengths}
        marks.update({(k, s): f" ({len(results[k][s])} run)" for s in lengths if len(results[k][s]) != args.repeats})
    flops = {k: {s: sum(forward_flops(cfg, k, s).values()) / 1e9 for s in lengths} for k in KINDS}
    for values in (med, mem, flops):
        values["mix"] = {s: sum(shares[k] * values[k][s] for k in shares) for s in lengths}

    verdict = "not measured at 32768 tokens"
    if GOAL_LENGTH in lengths:
        ratio = med["mix"][GOAL_LENGTH] / med["dense"][GOAL_LENGTH]
        verdict = (f"V4 mix / dense at {GOAL_LENGTH} tokens = {ratio:.3f} "
                   f"({'met' if ratio <= GOAL_RATIO else 'not met'}: goal <= {GOAL_RATIO}); growth exponent of the "
                   f"mix {slope(lengths, [med['mix'][s] for s in lengths]):.2f} from {lengths[0]} to {lengths[-1]} "
                   f"tokens (1 = linear; dense {slope(lengths, [med['dense'][s] for s in lengths]):.2f})")
    csa = {s: forward_flops(cfg, "csa", s) for s in lengths}
    indexer_share = ", ".join(f"{csa[s]['indexer'] / sum(csa[s].values()):.0%}" for s in lengths)
    dims = textwrap.fill(", ".join(o.split(".", 1)[1] for o in BENCH_DIMS), 116, subsequent_indent="  ")
    cmd = " ".join(["python bench/attention_scaling.py", *sys.argv[1:]])
    if args.device == "cuda":
        return gpu_report(lengths, args, wall_s, cmd, dims, shares, med, mem, flops, marks, verdict, indexer_share)
    return f"""
## Attention scaling: V4 attention sublayers vs dense SDPA (`bench/attention_scaling.py`)

{datetime.date.today().isoformat()} · {os.cpu_count()}-core Xeon VM (shared), CPU only · torch {torch.__version__},
{args.threads} thread(s) · `{cmd}` · {wall_s / 60:.0f} min in all

Dims (V4-shaped, reduced):
  {dims}.
Flash schedule shares (43 blocks): SWA {shares['swa']:.3f}, CSA {shares['csa']:.3f}, HCA {shares['hca']:.3f}. One forward + backward of one sublayer, batch 1, fp32, one fresh
process per measurement; median of {args.repeats} rounds, each round running SWA, CSA (sparse phase, with the
indexer's KL loss and backward), HCA, dense and proj-only back to back at that length (side by side, so load from
other jobs on the shared VM hits all of them alike). Dense = the same projections around
`scaled_dot_product_attention(is_causal=True)` (torch's CPU flash kernel) over all tokens; proj only = the same
with the core replaced by q + kv, the floor every variant pays. V4 mix = the shares applied to SWA, CSA, HCA.

**Goal** (hybrid attention at 32K <= {GOAL_RATIO}x dense time, cost close to linear from 4K to 64K): {verdict}.

Forward + backward time (s); exponent = log-log slope between the first and last length:

{table(lengths, med, "s", ".3g", marks)}

Peak memory of the step (MB above the process's resident set before it):

{table(lengths, mem, "MB", ".0f")}

Analytic forward FLOPs (GFLOP; projections + attention core over the keys each query sees + compressors + indexer;
the indexer's share of CSA by length: {indexer_share}):

{table(lengths, flops, "GFLOP", ".1f")}
"""


def mfu_table(lengths: list, med: dict, flops: dict, peak: float | None) -> str:
    """Rows per length: every column's achieved model TFLOP/s (3 x forward GFLOP / time) and, with a known peak, the
    MFU in brackets. The mix's is its FLOPs over its time (both share-weighted)."""
    cols = ("swa", "csa", "hca", "mix", "dense", "proj")
    lines = ["| tokens | " + " | ".join(f"{NAMES[k]} TFLOP/s" + (" (MFU)" if peak else "") for k in cols) + " |",
             "|---" * (1 + len(cols)) + "|"]
    for s in lengths:
        cells = []
        for k in cols:
            rate = 3 * flops[k][s] * 1e9 / med[k][s]
            cells.append(f"{rate / 1e12:.2f}" + (f" ({rate / peak:.2%})" if peak else ""))
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gpu_report(lengths, args, wall_s, cmd, dims, shares, med, mem, flops, marks, verdict, indexer_share) -> str:
    """The report of a --device cuda run: the CPU report's tables (GPU memory instead of resident memory) and the
    achieved TFLOP/s and MFU."""
    peak, peak_note = gpu_peak_flops(args.dtype)
    return f"""
## Attention scaling on one GPU: V4 attention sublayers vs dense SDPA (`bench/attention_scaling.py --device cuda`)

{datetime.date.today().isoformat()} · {gpu_description(args.dtype)} · `{cmd}` · {wall_s / 60:.1f} min in all

Dims (V4-shaped, reduced):
  {dims}.
Flash schedule shares (43 blocks): SWA {shares['swa']:.3f}, CSA {shares['csa']:.3f}, HCA {shares['hca']:.3f}.
One forward + backward of one sublayer, batch 1, {args.dtype} parameters and inputs (norms, sinks and compressors
fp32; V4's blocked core computes in fp32), one fresh process per measurement, the timed step after a warm-up step at
the same length, between torch.cuda.synchronize() calls; median of {args.repeats} round(s), each running SWA, CSA
(sparse phase, with the indexer's KL loss and backward), HCA, dense and proj-only back to back at that length.
Dense = the same projections around `scaled_dot_product_attention(is_causal=True)` (torch's CUDA kernels) over all
tokens; proj only = the same with the core replaced by q + kv, the floor every variant pays. V4 mix = the shares
applied to SWA, CSA, HCA.

**Goal** (hybrid attention at 32K <= {GOAL_RATIO}x dense time, cost close to linear from 4K to 64K): {verdict}.

Forward + backward time (s); exponent = log-log slope between the first and last length:

{table(lengths, med, "s", ".3g", marks)}

Peak GPU memory of the step (MB: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the memory
allocated before the step):

{table(lengths, mem, "MB", ".0f")}

Analytic forward FLOPs (GFLOP; projections + attention core over the keys each query sees + compressors + indexer;
the indexer's share of CSA by length: {indexer_share}):

{table(lengths, flops, "GFLOP", ".1f")}

Achieved model TFLOP/s (training FLOPs = 3 x the forward FLOPs above, over the time) and MFU ({peak_note}):

{mfu_table(lengths, med, flops, peak)}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per measurement (see the docstring)")
    p.add_argument("--single-above", type=float, default=900.0,
                   help="a measurement longer than this many seconds is not repeated")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="measure on the CPU or on one GPU")
    p.add_argument("--dtype", choices=["bfloat16", "float32"],
                   help="parameters and inputs on cuda (default bfloat16); the CPU runs float32")
    p.add_argument("--out", help="append the report to this markdown file (else print it)")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "LENGTH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device == "cuda":
        require_cuda()  # one line and exit code 2 without a GPU, before any subprocess
    elif args.dtype not in (None, "float32"):
        p.error("--dtype bfloat16 needs --device cuda (the CPU figures are fp32)")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.threads, args.device, args.dtype)))
        return

    cfg = bench_config()
    start = time.perf_counter()
    results = {k: {s: [] for s in args.lengths} for k in KINDS}
    for s in args.lengths:
        for r in range(args.repeats):
            # Alternate the order so that neither side always runs first after the other's memory churn.
            order = KINDS if r % 2 == 0 else KINDS[::-1]
            for kind in order:
                got = results[kind][s]
                if got and got[0]["seconds"] > args.single_above:
                    continue
                got.append(measure(kind, s, args.threads, args.device, args.dtype))
                print(f"{s:>6} tokens  round {r + 1}  {kind:<5} {got[-1]['seconds']:8.2f} s "
                      f"{got[-1]['peak_mb']:8.0f} MB", flush=True)
    text = report(cfg, args.lengths, results, args, time.perf_counter() - start)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
