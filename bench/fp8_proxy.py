"""FP8 vs bf16 on one GPU: a ~1B-active V4 proxy trained twice, side by side, for the H200 test machine.

    python bench/fp8_proxy.py [--steps 300] [--backend torch] [--recipe blockwise] [--out bench/RESULTS.md]
    python bench/fp8_proxy.py --smoke        # CPU: a tiny model, emulated FP8, 4 steps (keeps this script working)

Both runs use the same model, data and seed through `dsv4-train` (one process each, one after the other): bf16
parameters with bf16 GEMMs, then the same with `precision.fp8=<recipe>` for the attention, indexer and expert
projections. Reported per run: median step time after the first 10% of steps, achieved TFLOP/s and MFU (the
training loop's FLOPs model: what sparse/compressed attention really computes), and the final loss (mean of the last
10% of steps); then the FP8/bf16 step-time ratio and the relative loss gap (DeepSeek-V3 reported ~0.25% at scale).

The proxy: hidden 2048, 12 blocks (flash's attention schedule pattern, 16 heads of 512, window 128, CSA ratio 4
with top-512, HCA ratio 128), 64 routed experts of 1024 with 6 active plus one shared, vocabulary 129,280, one MTP
block: by hand, about 1.0B parameters active per token outside the embedding and head (1.5B with them; 5.8B in
all), sequence 4096.

Not run yet: no GPU was lent to this project so far; the smoke mode runs in the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

PROXY = ["model=flash", "model.num_layers=12", "model.hidden_size=2048", "model.num_heads=16",
         "model.q_lora_rank=1024", "model.o_groups=4", "model.o_lora_rank=1024", "model.index_n_heads=32",
         "model.n_routed_experts=64", "model.n_activated_experts=6", "model.moe_intermediate_size=1024",
         "model.num_hash_layers=2",
         "model.compress_ratios=[0,0,4,128,4,128,4,128,4,128,4,128,0]",
         "data.seq_length=4096", "data.micro_batch_size=1", "data.global_batch_size=8"]
SMOKE = ["model=debug", "data.seq_length=64", "data.micro_batch_size=2", "data.global_batch_size=2",
         "precision.fp8_block=32"]


def run(label: str, overrides: list, steps: int, workdir: str) -> dict:
    out = os.path.join(workdir, label)
    cmd = [sys.executable, "-m", "dsv4.train", f"run.output_dir={out}", f"run.steps={steps}", "run.eval_interval=0",
           "run.save_interval=0", "run.progress_bar=false", f"optim.warmup_steps={max(1, steps // 10)}", *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{label} run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    tail = rows[max(1, len(rows) // 10):] or rows
    flops = statistics.median(r["tflops_per_device"] for r in tail)
    peak = rows[-1].get("mfu")  # present on GPUs of known peak
    return {"label": label, "step_time": statistics.median(r["step_time"] for r in tail), "tflops": flops,
            "mfu": statistics.median(r["mfu"] for r in tail) if peak is not None else None,
            "loss": statistics.mean(r["lm_loss"] for r in tail)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--recipe", default="blockwise", choices=["blockwise", "tensorwise", "mxfp8", "delayed"])
    ap.add_argument("--backend", default="torch", choices=["auto", "te", "torch", "emulate"])
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run with emulated FP8 (checks the script)")
    ap.add_argument("--out", help="append the table to this markdown file")
    args = ap.parse_args()
    model = SMOKE if args.smoke else PROXY
    steps = 4 if args.smoke else args.steps
    backend = "emulate" if args.smoke else args.backend
    base_precision = "precision=fp32" if args.smoke else "precision=bf16"
    fp8 = [base_precision, f"precision.fp8={args.recipe}", f"precision.fp8_backend={backend}",
           "precision.fp8_modules=[attention,indexer,experts]"]
    with tempfile.TemporaryDirectory() as work:
        base = run("bf16" if not args.smoke else "fp32", [*model, base_precision], steps, work)
        low = run(f"fp8-{args.recipe}-{backend}", [*model, *fp8], steps, work)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "CPU"
    lines = [f"### FP8 proxy: {'smoke (tiny model, CPU)' if args.smoke else '~1B-active proxy'}, "
             f"{datetime.date.today()}, {device}",
             "", f"Command: `python bench/fp8_proxy.py {' '.join(sys.argv[1:])}` ({steps} steps each)", "",
             "| run | step time (s) | TFLOP/s | MFU | final LM loss |", "| --- | --- | --- | --- | --- |"]
    for r in (base, low):
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        lines.append(f"| {r['label']} | {r['step_time']:.3f} | {r['tflops']:.2f} | {mfu} | {r['loss']:.4f} |")
    gap = (low["loss"] - base["loss"]) / base["loss"]
    lines += ["", f"FP8 / baseline step time: {low['step_time'] / base['step_time']:.3f}; relative loss gap: "
              f"{gap:+.3%}", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
