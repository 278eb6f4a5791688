"""Training throughput and peak memory: dsv4 against megatron-core's GPTModel with equal active parameters.

    python bench/throughput.py [--models debug m100] [--lengths 4096 16384] [--reps 3] [--steps 3] [--recompute]
                               [--device cpu|cuda] [--dtype bfloat16|float32]

For each model and sequence length, `--reps` rounds; each round trains dsv4 and then the megatron-core baseline,
each in a fresh subprocess of this script (same interpreter, same threads, same process type), so the two are
measured side by side under the same machine load. A subprocess builds the model, runs 1 warm-up step and
`--steps` timed training steps of one sequence of `length` tokens each (micro-batch 1, global batch 1), and reports
the median step time and its peak resident memory (ru_maxrss: model, optimizer state and activations). The table
gives the median over the rounds, and dsv4 / megatron.

A step is the full training step of each framework: forward, backward and AdamW (megatron-core's optimizer, fp32,
the distributed optimizer on one rank, gradient clipping at 1.0):
- dsv4: `dsv4.train.loop.train_step` (megatron-core schedule, dsv4's gradient finalisation, clip, update, expert-bias
  update), in the `sparse` attention phase (lightning indexer, top-k, its KL loss) with the MTP block, as configured
  by the `debug` preset (`m100`: the preset scaled by `bench/optimizer_step.py`'s `M100` overrides).
- megatron-core: `GPTModel` with `get_gpt_layer_local_spec(normalization="RMSNorm")` (dense causal attention, unfused
  softmax on CPU), SwiGLU MLP, RoPE, untied embeddings, no biases, no dropout; the same hidden size, vocabulary,
  query heads and head size as the dsv4 model, one layer per dsv4 block (MTP block included) and the FFN width
  chosen so its parameter count matches dsv4's *active* parameters (every dsv4 parameter a token touches: routed
  experts counted k/E, the indexer and the MTP block included). Trained through megatron-core's own
  `forward_backward_no_pipelining`, `finalize_model_grads` and `optimizer.step()`.
Inputs: the same seeded random tokens for both. Each subprocess runs under an address-space limit
(`--mem-limit-gib`), so a length that does not fit fails inside the process (reported as OOM) instead of waking the
kernel's OOM killer on a shared machine.

`--device cuda` (one GPU; the default is the CPU, whose figures are the ones in bench/RESULTS.md): both systems train
on the GPU in `--dtype` (bfloat16 by default: dsv4 with `precision=bf16`, whose norms, mHC, sinks, router and
compressors stay fp32; megatron-core with `params_dtype=bfloat16, bf16=True` under its `Float16Module`, as megatron's
own training wraps it; both optimizers keep fp32 master weights; or float32 for both). Each step is timed between
`torch.cuda.synchronize()` calls; memory is the GPU's peak `torch.cuda.max_memory_allocated()` since the process
started (model, optimizer state and activations; the address-space limit is not applied, as CUDA reserves far more
address space than it uses), and a length that does not fit is reported as out of GPU memory. Each row adds the
achieved model TFLOP/s and MFU (model FLOPs per step / step time / the GPU's dense peak for the dtype, see
`GPU_PEAK_TFLOPS`): dsv4's FLOPs are the training loop's own model (`dsv4.train.flops.training_flops_per_token`: the
keys each query really sees, active experts only), the GPT's `gpt_training_flops_per_token` in the same
conventions (causal attention counts the (s + 1) / 2 keys a query sees on average, though megatron's unfused kernel
computes all s). The report then starts with a header naming the date, the GPU, torch, CUDA, the dtype and the
command. On a machine with a GPU, `--device cpu` still puts dsv4 on the GPU (its model moves itself there): use
`--device cuda` there.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from optimizer_step import M100  # noqa: E402  the ~101M-parameter scaling of the debug preset

MODELS = {"debug": [], "m100": M100}
SYSTEMS = ("dsv4", "megatron")

# Dense peak FLOP/s per GPU and dtype, for MFU (vendor data sheet, H200 SXM, without sparsity; fp32 does not run on
# the tensor cores, so its peak is the CUDA cores' 67 TFLOP/s). A GPU not listed gets no MFU (its TFLOP/s still).
GPU_PEAK_TFLOPS = {"H200": {"bfloat16": 989.5, "float32": 67.0}}
NO_CUDA = ("--device cuda: no CUDA device visible to torch (torch.cuda.is_available() is False); run on a GPU machine "
           "or use --device cpu")


def require_cuda() -> None:
    """`--device cuda` without a GPU: say so in one line and exit with code 2 (before any subprocess starts)."""
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr, flush=True)
        sys.exit(2)


def gpu_peak_flops(dtype: str) -> tuple:
    """(dense peak FLOP/s of this process's GPU in `dtype` or None, the words saying which peak that is)."""
    import torch

    name = torch.cuda.get_device_name()
    for key, peaks in GPU_PEAK_TFLOPS.items():
        if key in name:
            return peaks[dtype] * 1e12, f"{key} dense {dtype} peak {peaks[dtype]:g} TFLOP/s"
    return None, f"no MFU: the peak of {name} is not in GPU_PEAK_TFLOPS"


def gpu_description(dtype: str) -> str:
    """The GPU, torch and CUDA versions and the dtype, for a report's header."""
    import torch

    return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, {dtype}"


# --- the two workers -------------------------------------------------------------------------------------------------

def dsv4_config(model: str, seq: int, steps: int, optim: str = "adamw", overrides: tuple = (),
                dtype: str = "float32"):
    """The bench's config: the debug preset (+ `model`'s overrides), one sequence of `seq` tokens per step, with
    `dtype` parameters (precision=fp32, or precision=bf16 for bfloat16)."""
    from dsv4.conf.schema import compose_config

    precision = "precision=fp32" if dtype == "float32" else "precision=bf16"
    return compose_config("debug", [
        *MODELS[model], f"data.seq_length={seq}", f"model.max_position_embeddings={max(seq, 1024)}",
        "data.micro_batch_size=1", "data.global_batch_size=1", precision, f"optim={optim}",
        f"run.steps={steps + 1}", "optim.warmup_steps=0", "optim.grad_clip=1.0", *overrides], world_size=1)


def active_parameters(model) -> tuple[int, int]:
    """(total, active) parameters of a DSV4Model: routed experts count k/E of their weights."""
    from dsv4.model.moe import GroupedExperts

    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters())
    k, e = model.cfg.n_activated_experts, model.cfg.n_routed_experts
    return total, round(total - routed * (1 - k / e))


def megatron_shape(model: str) -> dict:
    """The baseline GPT's sizes: dsv4's hidden size, vocabulary, heads and head size, one layer per dsv4 block
    (MTP included), and the SwiGLU width that makes its parameters equal dsv4's active parameters."""
    from dsv4.model.transformer import DSV4Model
    from dsv4.parallel.state import init_distributed

    cfg = dsv4_config(model, 1024, 1).model
    groups = init_distributed()
    _, active = active_parameters(DSV4Model(cfg, groups.tp, seed=0))
    h, v, layers = cfg.hidden_size, cfg.vocab_size, cfg.num_layers + cfg.mtp_depth
    attn = 4 * h * cfg.num_heads * cfg.head_dim  # qkv + out projection
    fixed = 2 * v * h + h + layers * (attn + 2 * h)  # embeddings, final norm, per layer: attention and 2 norms
    ffn = round((active - fixed) / (3 * h * layers))  # SwiGLU: fc1 (2 F x h) + fc2 (h x F)
    return {"hidden": h, "vocab": v, "layers": layers, "heads": cfg.num_heads, "head_dim": cfg.head_dim,
            "ffn": ffn, "dsv4_active": active}


def gpt_training_flops_per_token(shape: dict, seq: int) -> float:
    """Training FLOPs per token of the baseline GPT in dsv4.train.flops' conventions: 2 per multiply-add, training =
    3 x forward; per layer the attention projections (q, k, v, out) and the SwiGLU (3 matrices), and QK + PV over the
    (seq + 1) / 2 keys a causal query sees on average; the output head; embedding lookups and norms ignored."""
    h, heads, dh = shape["hidden"], shape["heads"], shape["head_dim"]
    layer = 2 * (4 * h * heads * dh + 3 * h * shape["ffn"]) + 2 * 2 * heads * dh * (seq + 1) / 2
    return 3 * (shape["layers"] * layer + 2 * h * shape["vocab"])


def random_batch(vocab: int, seq: int):
    import torch

    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, vocab, (1, seq + 1), generator=g)
    return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "loss_mask": torch.ones(1, seq)}


def dsv4_trainer(cfg):
    """Build dsv4 for `cfg` (model in megatron DDP, optimizer); returns (step, info): step(i) trains optimizer step i
    on the bench's batch and returns its seconds; info holds the parameter counts and the last loss and phase."""
    from dsv4.parallel.state import init_distributed
    from dsv4.train import loop

    groups = init_distributed()
    chunks = loop.build_model(cfg, groups)
    optimizer = loop.build_optimizer(chunks, cfg, groups)
    total, active = active_parameters(loop.unwrap(chunks[0]))
    batch = random_batch(cfg.model.vocab_size, cfg.data.seq_length)
    info = {"params": total, "active": active}
    sync = device_sync(next(chunks[0].parameters()))  # on a GPU: the step's kernels are all inside its time

    def step(i: int) -> float:
        sync()
        t0 = time.perf_counter()
        info["phase"] = loop.unwrap(chunks[0]).set_step(i)
        info["loss"] = loop.train_step(chunks, optimizer, [batch], cfg, groups, i)["loss"]
        sync()
        return time.perf_counter() - t0

    return step, info


def device_sync(tensor):
    """torch.cuda.synchronize for a tensor on a GPU, else a no-op."""
    import torch

    return torch.cuda.synchronize if tensor.is_cuda else (lambda: None)


def run_dsv4(model: str, seq: int, steps: int, device: str = "cpu", dtype: str = "float32",
             recompute: bool = False) -> dict:
    """Train `steps` + 1 steps of dsv4 (`dsv4_config(model, seq, steps)`); step times in "times". On cuda also the
    training loop's model FLOPs of one step, "flops_per_step" (in the phase the steps ran in)."""
    cfg = dsv4_config(model, seq, steps, dtype=dtype, overrides=("parallel.recompute=block",) if recompute else ())
    step, info = dsv4_trainer(cfg)
    times = [step(i) for i in range(steps + 1)]
    if device == "cuda":
        from dsv4.train.flops import training_flops_per_token

        info["flops_per_step"] = training_flops_per_token(cfg.model, seq, info["phase"]) * seq
    return {**info, "times": times}


def run_megatron(model: str, seq: int, steps: int, device: str = "cpu", dtype: str = "float32",
                 recompute: bool = False) -> dict:
    """Train `steps` + 1 steps of the matched GPT (on cuda in `dtype`, see the docstring); step times in "times"."""
    import torch
    import torch.nn.functional as F
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    from dsv4.parallel.state import init_distributed

    shape = megatron_shape(model)  # initialises the same single-rank world as dsv4 (gloo + CPU layer)
    init_distributed()
    if device == "cuda":  # megatron_shape's dsv4 model went to the GPU and is gone: not the baseline's memory
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)  # megatron's RNG tracker (its attention forks it, even without dropout)
    params_dtype, bf16 = getattr(torch, dtype), dtype == "bfloat16"
    config = TransformerConfig(
        num_layers=shape["layers"], hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
        kv_channels=shape["head_dim"], ffn_hidden_size=shape["ffn"], gated_linear_unit=True, activation_func=F.silu,
        normalization="RMSNorm", add_bias_linear=False, attention_dropout=0.0, hidden_dropout=0.0,
        params_dtype=params_dtype, bf16=bf16, use_cpu_initialization=True, init_method_std=0.02,
        # --recompute: megatron's full recomputation of every layer (uniform, one layer per checkpoint), as dsv4's
        # parallel.recompute=block
        **(dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) if recompute
           else {}))
    gpt = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=shape["vocab"],
                   max_sequence_length=seq, position_embedding_type="rope",
                   share_embeddings_and_output_weights=False)
    params = sum(p.numel() for p in gpt.parameters())
    net = gpt
    if device == "cuda":  # initialised on the CPU like dsv4 (same init), then moved
        net = gpt.cuda(torch.cuda.current_device())
        if bf16:  # megatron's own mixed-precision wrapper: bf16 module, fp32 outputs (the per-token losses)
            net = Float16Module(config, net)
    model_ddp = DDP(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True),
                    net)
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=3e-4, weight_decay=0.1, clip_grad=1.0, bf16=bf16,
                        params_dtype=params_dtype, use_distributed_optimizer=True), [model_ddp])
    batch = random_batch(shape["vocab"], seq)
    positions = torch.arange(seq).unsqueeze(0)
    if device == "cuda":
        batch = {k: v.cuda() for k, v in batch.items()}
        positions = positions.cuda()
    sync = device_sync(positions)

    def forward_step(data_iterator, net):
        b = next(data_iterator)
        per_token = net(b["input_ids"], positions, None, labels=b["labels"])  # [b, s]

        def loss_func(out):
            loss = (out * b["loss_mask"]).sum() / b["loss_mask"].sum()
            return loss, {"loss": loss.detach()}

        return per_token, loss_func

    times = []
    for _ in range(steps + 1):
        sync()
        t0 = time.perf_counter()
        model_ddp.zero_grad_buffer()
        optimizer.zero_grad()
        records = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=model_ddp, num_microbatches=1,
            seq_length=seq, micro_batch_size=1, forward_only=False)
        optimizer.step()
        sync()
        times.append(time.perf_counter() - t0)
    result = {"params": params, "active": params, "times": times, "loss": records[0]["loss"].item(),
              "shape": shape}
    if device == "cuda":
        result["flops_per_step"] = gpt_training_flops_per_token(shape, seq) * seq
    return result


def worker(system: str, model: str, seq: int, steps: int, mem_limit_gib: float, device: str = "cpu",
           dtype: str = "float32", recompute: bool = False) -> None:
    """One measurement in this (fresh) process; prints one JSON line. On cuda it also holds the GPU's peak memory
    ("peak_gpu", bytes), the model TFLOP/s and the MFU."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()  # no address-space limit: CUDA reserves far more than it uses
    else:
        limit_memory(mem_limit_gib)
    try:
        result = (run_dsv4 if system == "dsv4" else run_megatron)(model, seq, steps, device=device, dtype=dtype,
                                                                  recompute=recompute)
        timed = result.pop("times")[1:]
        result.update(step_s=statistics.median(timed), steps=len(timed))
        result["tokens_per_s"] = seq / result["step_s"]
        if "flops_per_step" in result:
            peak, _ = gpu_peak_flops(dtype)
            result["tflops"] = result["flops_per_step"] / result["step_s"] / 1e12
            result["mfu"] = result["flops_per_step"] / result["step_s"] / peak if peak else None
    except (MemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        result = {"oom": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    result.update(peak_rss=peak_rss(), **source_fingerprint())
    if device == "cuda":
        result["peak_gpu"] = torch.cuda.max_memory_allocated()
    print("RESULT " + json.dumps(result), flush=True)


# --- the driver ----------------------------------------------------------------------------------------------------

def limit_memory(gib: float) -> None:
    """Cap this process's address space: an allocation past it raises inside torch instead of waking the OOM killer."""
    limit = int(gib * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def peak_rss() -> int:
    """Peak resident memory of this process so far, bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def source_fingerprint() -> dict:
    """What code a measurement ran: the git commit and short hashes of the working tree's model sources (the tree is
    shared with other work in progress, so a run records what it saw)."""
    import glob
    import hashlib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def digest(paths):
        h = hashlib.sha256()
        for path in sorted(paths):
            with open(path, "rb") as f:
                h.update(path.encode() + f.read())
        return h.hexdigest()[:10]

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    sources = [f for d in ("model", "parallel", "train", "optim") for f in glob.glob(os.path.join(root, d, "*.py"))]
    return {"commit": head.stdout.strip(), "attention_sha": digest([os.path.join(root, "model", "attention.py")]),
            "sources_sha": digest(sources)}


def is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and (
        "can't allocate memory" in str(e) or "CUDA out of memory" in str(e)))  # the latter: torch.OutOfMemoryError


def measure(system: str, model: str, seq: int, steps: int, mem_limit_gib: float, timeout: float,
            device: str = "cpu", dtype: str = "float32", recompute: bool = False) -> dict:
    gpu = ["--device", device, "--dtype", dtype] if device == "cuda" else []
    gpu += ["--recompute"] if recompute else []
    return run_worker([os.path.abspath(__file__), "--worker", system, "--models", model, "--lengths", str(seq),
                       "--steps", str(steps), "--mem-limit-gib", str(mem_limit_gib), *gpu], timeout)


def run_worker(args: list, timeout: float) -> dict:
    """Run `python *args` in a fresh process; its last "RESULT {json}" line, or {"error": ...}."""
    cmd = [sys.executable, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:200]}"}
    return json.loads(lines[-1].removeprefix("RESULT "))


def oom_message(result: dict) -> str:
    """'out of memory at <peak> GiB (allocating <n> GiB more)' from a worker's result."""
    import re

    if "peak_gpu" in result:
        return f"out of GPU memory (peak allocated {result['peak_gpu'] / 2 ** 30:.1f} GiB; {result['oom'][:120]})"
    asked = re.search(r"allocate (\d+) bytes", result["oom"])
    more = f", allocating {int(asked.group(1)) / 2 ** 30:.2f} GiB more" if asked else ""
    return f"out of memory under the limit (peak RSS {result['peak_rss'] / 2 ** 30:.1f} GiB{more})"


def summarise(runs: list) -> dict:
    ok = [r for r in runs if "tokens_per_s" in r]
    if not ok:
        last = runs[-1]
        if "oom" in last:
            return {"failed": oom_message(last)}
        return {"failed": last.get("error", "not run")}
    summary = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in ok),
               "peak_rss": statistics.median(r["peak_rss"] for r in ok), "n": len(ok),
               "all_tokens_per_s": [round(r["tokens_per_s"], 1) for r in ok], "params": ok[0]["params"],
               "active": ok[0]["active"], "steps": ok[0]["steps"], "shape": ok[0].get("shape")}
    if "peak_gpu" in ok[0]:  # --device cuda
        summary.update(peak_gpu=statistics.median(r["peak_gpu"] for r in ok),
                       tflops=statistics.median(r["tflops"] for r in ok),
                       mfu=statistics.median(r["mfu"] for r in ok) if ok[0]["mfu"] is not None else None)
    return summary


def table_row(model: str, seq: int, runs_d: list, runs_m: list, device: str = "cpu") -> str:
    """One markdown row: medians over the rounds (each round's value in brackets), or why a system did not run.
    The ratios are the median of each round's ratio: the two runs of a round saw the same machine load. On cuda,
    memory is the GPU's peak allocation, and each system's TFLOP/s (MFU) comes after the speed ratio."""
    d, m = summarise(runs_d), summarise(runs_m)
    mem = "peak_gpu" if device == "cuda" else "peak_rss"

    def rate(r):
        return f"{r['tokens_per_s']:,.1f} {r['all_tokens_per_s']}" if "tokens_per_s" in r else f"failed: {r['failed']}"

    def rss(r):
        return f"{r[mem] / 2 ** 30:.2f} GiB" if mem in r else "-"

    def flops(r):
        if "tflops" not in r:
            return "-"
        return f"{r['tflops']:.2f}" + (f" ({r['mfu']:.2%})" if r["mfu"] is not None else "")

    pairs = [(a, b) for a, b in zip(runs_d, runs_m) if "tokens_per_s" in a and "tokens_per_s" in b]
    shape = m.get("shape") or {}
    dparams = f"{d['params']:,} ({d['active']:,})" if "params" in d else "-"
    mparams = f"{m['params']:,} ({shape['layers']} x {shape['ffn']})" if "params" in m else "-"
    speed = memory = "n/a"
    if pairs:
        ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs]
        speed = f"{statistics.median(ratios):.2f} {[round(x, 2) for x in ratios]}"
        memory = f"{statistics.median(a[mem] / b[mem] for a, b in pairs):.2f}"
    gpu = f" {flops(d)} | {flops(m)} |" if device == "cuda" else ""
    return (f"| {model} | {seq:,} | {dparams} | {mparams} | {rate(d)} | {rate(m)} | {speed} |{gpu} {rss(d)} | "
            f"{rss(m)} | {memory} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--lengths", nargs="+", type=int, default=[4096, 16384])
    p.add_argument("--reps", type=int, default=3, help="rounds (fresh subprocesses) per system and point")
    p.add_argument("--steps", type=int, default=3, help="timed steps per subprocess, after 1 warm-up step")
    p.add_argument("--mem-limit-gib", type=float, default=20.0,
                   help="address-space limit of each subprocess (CPU only)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per subprocess")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="train on the CPU or on one GPU")
    p.add_argument("--dtype", choices=["bfloat16", "float32"],
                   help="parameters and compute on cuda (default bfloat16); the CPU runs float32")
    p.add_argument("--recompute", action="store_true",
                   help="both systems recompute every layer in backward (dsv4 parallel.recompute=block, megatron "
                        "recompute_granularity=full): activation memory of one layer at a time")
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda":
        require_cuda()
    elif args.dtype not in (None, "float32"):
        p.error("--dtype bfloat16 needs --device cuda (the CPU figures are fp32)")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.worker:
        worker(args.worker, args.models[0], args.lengths[0], args.steps, args.mem_limit_gib, args.device, args.dtype,
               args.recompute)
        return 0

    rows, start = [], time.perf_counter()
    for model in args.models:
        for seq in args.lengths:
            runs = {s: [] for s in SYSTEMS}
            for rep in range(args.reps):
                for system in SYSTEMS:  # interleaved: dsv4, megatron, dsv4, megatron, ...
                    if any("oom" in r for r in runs[system]):
                        continue  # out of memory is not a matter of load: another round would fail the same way
                    r = measure(system, model, seq, args.steps, args.mem_limit_gib, args.timeout, args.device,
                                args.dtype, args.recompute)
                    runs[system].append(r)
                    print(f"[{model} {seq} round {rep + 1}] {system}: {json.dumps(r)}", file=sys.stderr, flush=True)
            rows.append((model, seq, runs))

    if args.device == "cuda":
        print(gpu_header(args, time.perf_counter() - start))
        print("| model | tokens/step | dsv4 params (active) | megatron GPT params (layers x ffn) | dsv4 tokens/s | "
              "megatron tokens/s | dsv4 / megatron tokens/s | dsv4 TFLOP/s (MFU) | megatron TFLOP/s (MFU) | "
              "dsv4 peak GPU memory | megatron peak GPU memory | dsv4 / megatron GPU memory |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    else:
        print("| model | tokens/step | dsv4 params (active) | megatron GPT params (layers x ffn) | dsv4 tokens/s | "
              "megatron tokens/s | dsv4 / megatron tokens/s | dsv4 peak RSS | megatron peak RSS | "
              "dsv4 / megatron RSS |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for model, seq, res in rows:  # res: system -> the rounds' results
        print(table_row(model, seq, res["dsv4"], res["megatron"], args.device))
    print_sources([r for _, _, runs in rows for rs in runs.values() for r in rs])
    return 0


def gpu_header(args, wall_s: float) -> str:
    """The report's header on cuda: what ran where, and what the MFU is measured against."""
    import datetime

    _, peak = gpu_peak_flops(args.dtype)
    cmd = " ".join(["python bench/throughput.py", *sys.argv[1:]])
    return f"""
## Training throughput on one GPU: dsv4 vs megatron-core GPTModel (`bench/throughput.py --device cuda`)

{datetime.date.today().isoformat()} · {gpu_description(args.dtype)} · `{cmd}` · {wall_s / 60:.1f} min in all

One sequence per step (micro-batch 1), median of {args.steps} timed steps after 1 warm-up step (each between
torch.cuda.synchronize() calls) per fresh process, median over {args.reps} round(s). TFLOP/s = model FLOPs per step /
step time (dsv4: dsv4.train.flops.training_flops_per_token; GPT: gpt_training_flops_per_token, same conventions);
MFU against the {peak}. GPU memory: torch.cuda.max_memory_allocated() over the whole process (model, optimizer
state, activations).
"""


def print_sources(runs: list) -> None:
    """Which code the measurements ran (several lines: the working tree changed during the bench)."""
    seen = sorted({(r["commit"], r["attention_sha"], r["sources_sha"]) for r in runs if "commit" in r})
    for commit, attention, sources in seen:
        print(f"\nsources: commit {commit}, model/attention.py {attention}, model+parallel+train+optim {sources}")


if __name__ == "__main__":
    sys.exit(main())
