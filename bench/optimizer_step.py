"""Optimizer step time as a share of forward + backward: V4's Muon + AdamW vs AdamW, side by side on this machine.

    python bench/optimizer_step.py [--steps 8] [--model debug|wide] [--ns-dtype bfloat16|float32]

One process trains the model with each optimizer for `--steps` steps (same data, same global batch of 4 x 256
tokens) through the training loop's own pieces: forward + backward of every micro-batch (megatron-core schedule)
and gradient finalisation are timed as one part, gradient norm + clipping + the optimizer update as the other.
Reported: the median over the steps after the first two of optimizer time / forward+backward time. `wide` is the
debug preset at hidden 512 (~54M parameters, mostly experts) to show how the share moves with matrix size.

Communication is not measured here (one process): per step and data-parallel rank, in units of the parameter
bytes P and with ring collectives over n replicas, ZeRO-1 AdamW moves 2P(n-1)/n (reduce-scatter + all-gather) and
this Muon 3P(n-1)/n (gradient all-reduce 2P(n-1)/n + owner broadcasts P(n-1)/n), i.e. 1.5x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

WIDE = ["model.hidden_size=512", "model.moe_intermediate_size=512", "model.q_lora_rank=256",
        "model.o_lora_rank=128"]


def measure(optim: str, model_overrides: list, steps: int, ns_dtype: str, cache: str, out: str) -> dict:
    from dsv4.conf.schema import compose_config
    from dsv4.parallel.grads import finalize_grads
    from dsv4.parallel.state import destroy_distributed, init_distributed
    from dsv4.train import loop
    from dsv4.train.data import build_data

    cfg = compose_config("debug", [f"optim={optim}", f"data.cache_dir={cache}", f"run.output_dir={out}",
                                   "data.seq_length=256", "data.micro_batch_size=2", "data.global_batch_size=4",
                                   f"run.steps={steps}", "optim.warmup_steps=1", f"optim.muon_ns_dtype={ns_dtype}",
                                   *model_overrides], world_size=1)
    groups = init_distributed()
    chunks = loop.build_model(cfg, groups)
    optimizer = loop.build_optimizer(chunks, cfg, groups)
    train = iter(build_data(cfg).train)
    shares, fwd_bwd, opt = [], [], []
    for step in range(steps):
        batches = [next(train) for _ in range(2)]
        loop._set_schedule(optimizer, cfg, 1e-3)
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        t0 = time.perf_counter()
        loop._run_schedule(chunks, batches, cfg, forward_only=False)
        finalize_grads(chunks, groups)
        t1 = time.perf_counter()
        optimizer.prepare_grads()
        norm = float(optimizer.get_grad_norm())
        loop._clip(optimizer, cfg.optim.grad_clip, norm)
        optimizer.step_with_ready_grads()
        t2 = time.perf_counter()
        fwd_bwd.append(t1 - t0)
        opt.append(t2 - t1)
        shares.append((t2 - t1) / (t1 - t0))
    n_params = sum(p.numel() for c in chunks for p in c.parameters())
    destroy_distributed()
    return {"params": n_params, "share": statistics.median(shares[2:]), "fwd_bwd_s": statistics.median(fwd_bwd[2:]),
            "optimizer_s": statistics.median(opt[2:])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--model", choices=["debug", "wide"], default="debug")
    p.add_argument("--ns-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = p.parse_args(argv)
    overrides = WIDE if args.model == "wide" else []
    with tempfile.TemporaryDirectory() as tmp:
        rows = {optim: measure(optim, overrides, args.steps, args.ns_dtype, f"{tmp}/cache", f"{tmp}/{optim}")
                for optim in ("adamw", "muon")}
    print(f"| model | parameters | optimizer | optimizer step / forward+backward | step time vs AdamW |")
    print("| --- | --- | --- | --- | --- |")
    for optim, r in rows.items():
        print(f"| {args.model} | {r['params']:,} | {optim} (NS {args.ns_dtype}) | {r['share']:.3f} | "
              f"{r['optimizer_s'] / rows['adamw']['optimizer_s']:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
