"""Throughput and peak memory of the parallel layouts on one machine, as ratios to a single process.

    python bench/parallel_layouts.py [--steps 12] [--out bench/parallel_layouts.json]

Every layout trains the same debug model on the same global batches (12 x 256 tokens of the embedded corpus) for
`--steps` optimizer steps, one after another on this machine; tokens/s is the median over the steps after the first
two, peak memory the largest resident set of any rank. Each rank gets cores / ranks intra-op threads so layouts
with more ranks do not oversubscribe the CPU. On a CPU the communication is gloo over loopback: the ratios say
what the layouts cost here, not on a GPU cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import torch.multiprocessing as mp

LAYOUTS = {  # name: (ranks, config overrides); 3 micro-batches per replica, 12 sequences per step
    "single": (1, ["data.micro_batch_size=4"]),
    "dp2 (distributed optimizer)": (2, ["data.micro_batch_size=2"]),
    "dp2 (plain DDP)": (2, ["data.micro_batch_size=2", "parallel.distributed_optimizer=false"]),
    "tp2 + sp": (2, ["data.micro_batch_size=4", "parallel.tp=2"]),
    "tp2 (no sp)": (2, ["data.micro_batch_size=4", "parallel.tp=2", "parallel.sp=false"]),
    "pp2 (1F1B)": (2, ["data.micro_batch_size=4", "parallel.pp=2"]),
    "pp3 vpp2 (interleaved)": (3, ["data.micro_batch_size=4", "parallel.pp=3", "parallel.vpp=2",
                                   "run.eval_iters=3"]),
    "ep2": (2, ["data.micro_batch_size=2", "parallel.ep=2"]),
    "ep2 etp2": (4, ["data.micro_batch_size=1", "parallel.ep=2", "parallel.etp=2"]),
    "tp2 pp2": (4, ["data.micro_batch_size=4", "parallel.tp=2", "parallel.pp=2"]),
    "tp2 ep2": (4, ["data.micro_batch_size=2", "parallel.tp=2", "parallel.ep=2"]),
    "tp2 pp2 ep2 dp2": (8, ["data.micro_batch_size=2", "parallel.tp=2", "parallel.pp=2", "parallel.ep=2"]),
}


def _rank(rank, world, port, overrides, steps, cache, out_dir, results):
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from dsv4.conf.schema import compose_config
    from dsv4.train import loop

    cfg = compose_config("debug", [f"data.cache_dir={cache}", f"run.output_dir={out_dir}", f"run.steps={steps}",
                                   "optim.warmup_steps=1", "run.eval_interval=0", "run.progress_bar=false",
                                   "optim.lr=1e-3", "data.seq_length=256", "data.global_batch_size=12", *overrides],
                         world_size=world)
    history = loop.train(cfg).history
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    results.put((rank, [m["tokens_per_s"] for m in history], peak_mb, [m["lm_loss"] for m in history]))


def run_layout(name, steps, cache, tmp):
    import socket

    world, overrides = LAYOUTS[name]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, overrides, steps, cache,
                                             os.path.join(tmp, f"layout{list(LAYOUTS).index(name)}"), results)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"layout {name}: a rank exited with {p.exitcode}")
    rows = sorted(results.get() for _ in range(world))
    tokens_per_s = statistics.median(rows[0][1][2:])
    return {"ranks": world, "tokens_per_s": tokens_per_s, "peak_rss_mb_per_rank": max(r[2] for r in rows),
            "lm_loss": rows[0][3]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "parallel_layouts.json"))
    args = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        for name in LAYOUTS:
            t0 = time.perf_counter()
            results[name] = run_layout(name, args.steps, cache, tmp)
            print(f"{name}: {results[name]['tokens_per_s']:.0f} tok/s, "
                  f"{results[name]['peak_rss_mb_per_rank']:.0f} MB/rank ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    base = results["single"]
    print("\n| layout | ranks | tokens/s vs single | peak RSS per rank vs single | same losses as single |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        same = all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(r["lm_loss"], base["lm_loss"]))
        print(f"| {name} | {r['ranks']} | {r['tokens_per_s'] / base['tokens_per_s']:.2f} | "
              f"{r['peak_rss_mb_per_rank'] / base['peak_rss_mb_per_rank']:.2f} | {'yes' if same else 'no'} |")
    with open(args.out, "w") as f:
        json.dump({"steps": args.steps, "cpu_count": os.cpu_count(), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
