"""Optimizer step time as a share of forward + backward: V4's Muon + AdamW vs AdamW, side by side on this machine.

    python bench/optimizer_step.py [--steps 8] [--model debug|wide|m100] [--ns-dtype bfloat16 [float32]]

One process trains the model with each optimizer for `--steps` steps (same data, same global batch of 4 x 256
tokens) through the training loop's own pieces: forward + backward of every micro-batch (megatron-core schedule)
and gradient finalisation are timed as one part, gradient norm + clipping + the optimizer update as the other.
Reported: the median over the steps after the first two of optimizer time / forward+backward time. `wide` is the
debug preset at hidden 512 (~54M parameters, mostly experts) and `m100` the debug preset scaled to ~101M parameters
(hidden 768, 8 heads of 64, 10 routed experts of 512), to show how the share moves with matrix size. Several
`--ns-dtype` values run AdamW once and Muon once per Newton-Schulz dtype, all in this process, side by side.

Communication is not measured here (one process); `bench/optimizer_comm.py` measures it over data-parallel ranks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

WIDE = ["model.hidden_size=512", "model.moe_intermediate_size=512", "model.q_lora_rank=256",
        "model.o_lora_rank=128"]
# ~101M parameters (90.8M of them in the routed and shared experts): the debug preset at hidden 768 with 8 heads of
# 64, a wider query/output low rank and 10 routed experts of 512; same 6 + 1 (MTP) layers and attention schedule.
M100 = ["model.hidden_size=768", "model.moe_intermediate_size=512", "model.q_lora_rank=384", "model.o_lora_rank=128",
        "model.num_heads=8", "model.head_dim=64", "model.n_routed_experts=10"]
MODELS = {"debug": [], "wide": WIDE, "m100": M100}
LABELS = {"debug": "debug", "wide": "wide (hidden 512)", "m100": "m100 (hidden 768)"}


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
        loop._optimizer_step(optimizer, chunks)  # the training loop's update (+ parameter gather)
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
    p.add_argument("--model", choices=list(MODELS), default="debug")
    p.add_argument("--ns-dtype", nargs="+", choices=["bfloat16", "float32"], default=["bfloat16"],
                   help="Newton-Schulz dtype(s) of the Muon runs (one Muon run each, one AdamW run in all)")
    args = p.parse_args(argv)
    overrides = MODELS[args.model]
    runs = [("adamw", "bfloat16")] + [("muon", dtype) for dtype in dict.fromkeys(args.ns_dtype)]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for optim, dtype in runs:  # the NS dtype does not matter to AdamW
            rows[(optim, dtype)] = measure(optim, overrides, args.steps, dtype, f"{tmp}/cache", f"{tmp}/{optim}{dtype}")
            print(f"{optim} (NS {dtype}): forward+backward {rows[(optim, dtype)]['fwd_bwd_s']:.2f} s, optimizer "
                  f"{rows[(optim, dtype)]['optimizer_s']:.2f} s (medians)", file=sys.stderr, flush=True)
    base = rows[("adamw", "bfloat16")]
    print("| model | parameters | optimizer | optimizer step / forward+backward | optimizer step vs AdamW's |")
    print("| --- | --- | --- | --- | --- |")
    for (optim, dtype), r in rows.items():
        name = "AdamW (megatron-core)" if optim == "adamw" else f"Muon + AdamW, Newton-Schulz {dtype}"
        print(f"| {LABELS[args.model]} | {r['params']:,} | {name} | {r['share']:.3f} | "
              f"{r['optimizer_s'] / base['optimizer_s']:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
