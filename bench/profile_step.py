"""Where a dsv4 training step spends its time on the CPU: torch.profiler over one step, grouped by operator.

    python bench/profile_step.py [--model debug] [--length 4096] [--top 15] [--threads 1] [--out bench/RESULTS.md]

The step is `bench/throughput.py`'s (same config, batch and trainer: forward, backward and AdamW of one sequence of
`--length` tokens through `dsv4.train.loop.train_step`, sparse attention phase, MTP), profiled after two warm-up
steps. The report gives the step's wall time, the number of operator calls, and the `--top` operators by self CPU
time with their call counts, so what dominates (big matrix products, or many small ops and copies) is visible. The
profiler adds a few microseconds per call: the wall time under it is above the unprofiled step's.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from throughput import MODELS, dsv4_config, dsv4_trainer  # noqa: E402  (bench/ is not a package)


def profile_step(model: str, length: int, top: int) -> str:
    """Profile one training step; returns the markdown report's table part."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    step, info = dsv4_trainer(dsv4_config(model, length, 3))
    step(0)
    step(1)
    unprofiled = step(2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step(3)
        profiled = time.perf_counter() - t0
    events = prof.key_averages()
    calls = sum(e.count for e in events)
    total_self = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    lines = [f"{model} at {length:,} tokens: step {unprofiled:.2f} s unprofiled, {profiled:.2f} s profiled; "
             f"{calls:,} operator calls; {info['params']:,} parameters ({info['active']:,} active), torch threads "
             f"{torch.get_num_threads()}.", "",
             "| operator | self CPU s | share of self time | calls | mean self us per call |",
             "| --- | --- | --- | --- | --- |"]
    for e in rows:
        lines.append(f"| `{e.key}` | {e.self_cpu_time_total / 1e6:.3f} | {e.self_cpu_time_total / total_self:.1%} | "
                     f"{e.count:,} | {e.self_cpu_time_total / max(e.count, 1):.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=list(MODELS), default="debug")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the attention bench's setting)")
    p.add_argument("--out", help="append the report to this markdown file (else print it)")
    args = p.parse_args(argv)
    if args.length < 1 or args.top < 1 or args.threads < 1:
        p.error("--length, --top and --threads must be positive")

    import torch

    torch.set_num_threads(args.threads)
    table = profile_step(args.model, args.length, args.top)
    command = "python bench/profile_step.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:])
                                                         if a != args.out and a != "--out")
    report = "\n".join([
        "", "### Profile of one training step (`bench/profile_step.py`)", "",
        f"{datetime.date.today().isoformat()} · {platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"cores · torch {torch.__version__} · `{command.strip()}`", "", table, ""])
    if args.out:
        with open(args.out, "a") as f:
            f.write(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
