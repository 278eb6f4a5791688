"""What each V4 component costs in a training step: mHC, the lightning indexer, MTP, Muon, side by side.

    python bench/overheads.py [--points debug:2048 debug:4096 m100:2048 m100:4096] [--reps 3] [--steps 3]

At each point (model:sequence length) the V4 model as configured (`v4`: mHC with n = hc_mult streams, the `sparse`
attention phase, MTP depth 1, AdamW) is compared with one variant per component. A comparison runs in a fresh
subprocess that builds both models (each with its own optimizer), trains one warm-up step of each, then
alternates `--steps` timed steps of the two (v4 first in odd steps, the variant first in even ones), so each pair
of steps sees the same machine load, seconds apart. A step is the training step of `bench/throughput.py`
(forward, backward and the optimizer through `dsv4.train.loop.train_step`, one sequence of `length` tokens). Rounds
(`--reps`) run every comparison once each, in an order reversed every other round. A component's overhead is the
median over all step pairs of (step time with the component / step time without it) - 1.

Variants (what is compared, precisely):
- `plain_residual`: one stream and a plain residual, x + F(x), around every sublayer, and the head reads the stream
  directly. The config has no switch for it: `model.hc_mult=1` still gates the sublayer input and output with
  learned sigmoids (and runs 20 Sinkhorn iterations on a 1 x 1 matrix), so this bench builds the variant with
  `HyperConnection` and `HyperHead` swapped for parameter-free modules (`PlainResidual`, `PlainHead` below) and
  hc_mult=1; the model code is not changed. The overhead is mHC's whole cost: the n = 4 streams (4x the residual
  traffic) and the mixing weights with their Sinkhorn iterations.
- `dense_phase`: `model.dense_attention_steps` past the run: CSA attends to every visible compressed entry and the
  lightning indexer does not run (no indexer compressor, no scores, no top-k, no KL loss). Against the sparse phase
  this measures the indexer's forward and backward (its KL loss) and the top-k, plus the attention's own difference
  between top-k and all visible compressed entries (which depends on how `model/attention.py` computes each).
- `no_mtp`: `model.mtp_depth=0` (and the MTP entry dropped from compress_ratios): no MTP block and no second head.
- `muon`: `optim=muon` (V4's Muon + AdamW, Newton-Schulz in bf16) against AdamW; `bench/optimizer_step.py` splits
  the same comparison into optimizer step / forward+backward.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys

from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import (MODELS, dsv4_config, dsv4_trainer, is_oom, limit_memory, oom_message, peak_rss,  # noqa: E402
                        print_sources, run_worker, source_fingerprint)

COMPARISONS = {"plain_residual": ("mHC, n = 4 streams", "plain residual, 1 stream", 0.067, True),
               "dense_phase": ("lightning indexer + top-k (sparse phase)", "dense phase, no indexer", None, True),
               "no_mtp": ("MTP depth 1", "MTP depth 0", None, True),
               "muon": ("Muon + AdamW", "AdamW", None, False)}
"""variant -> (the component, what replaces it, goal for its overhead or None, whether v4 is the side that has the
component: v4 trains with AdamW, so Muon is on the variant's side)."""


class PlainResidual(nn.Module):
    """Stand-in for HyperConnection with one stream: the sublayer sees the stream, X' = X + F(X)."""

    def __init__(self, cfg):
        super().__init__()

    def weights(self, streams):
        return None, None, None

    def collapse(self, streams, pre):
        return streams.squeeze(-2)  # [s, b, 1, d] -> [s, b, d]

    def expand(self, out, streams, post, res):
        return streams + out.unsqueeze(-2)


class PlainHead(nn.Module):
    """Stand-in for HyperHead with one stream: the stream itself."""

    def __init__(self, cfg):
        super().__init__()

    def forward(self, streams):
        return streams.squeeze(-2)


@contextlib.contextmanager
def plain_residual_modules():
    """Models built inside use PlainResidual / PlainHead in place of mHC (restored on exit)."""
    import dsv4.model.block as block
    import dsv4.model.transformer as transformer

    saved = block.HyperConnection, block.HyperHead, transformer.HyperHead
    block.HyperConnection, block.HyperHead, transformer.HyperHead = PlainResidual, PlainHead, PlainHead
    try:
        yield
    finally:
        block.HyperConnection, block.HyperHead, transformer.HyperHead = saved


def variant_config(variant: str, model: str, seq: int, steps: int):
    """The validated DSV4Config of `v4` or one variant."""
    if variant == "muon":
        return dsv4_config(model, seq, steps, optim="muon")
    overrides = {"v4": (), "no_mtp": (), "plain_residual": ("model.hc_mult=1",),
                 "dense_phase": (f"model.dense_attention_steps={10 ** 9}",)}[variant]
    cfg = dsv4_config(model, seq, steps, overrides=overrides)
    if variant == "no_mtp":
        m = cfg.model
        cfg = dataclasses.replace(cfg, model=m.replace(mtp_depth=0, compress_ratios=m.compress_ratios[:m.num_layers]))
    return cfg


def worker(variant: str, model: str, seq: int, steps: int, mem_limit_gib: float) -> None:
    """v4 and `variant` in this (fresh) process, their steps alternated; prints one JSON line."""
    limit_memory(mem_limit_gib)
    try:
        v4_step, v4_info = dsv4_trainer(variant_config("v4", model, seq, steps))
        with plain_residual_modules() if variant == "plain_residual" else contextlib.nullcontext():
            var_step, var_info = dsv4_trainer(variant_config(variant, model, seq, steps))
        v4_step(0), var_step(0)  # warm-up
        v4_s, var_s = [], []
        for i in range(1, steps + 1):
            if i % 2:
                v4_s.append(v4_step(i))
                var_s.append(var_step(i))
            else:
                var_s.append(var_step(i))
                v4_s.append(v4_step(i))
        result = {"v4_s": v4_s, "variant_s": var_s, "v4": v4_info, "variant": var_info}
    except (MemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        result = {"oom": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    result.update(peak_rss=peak_rss(), **source_fingerprint())
    print("RESULT " + json.dumps(result), flush=True)


def table_row(point: str, variant: str, runs: list) -> str:
    """One markdown row: the component's overhead = median over step pairs of (step with it / step without it) - 1."""
    has, against, goal, in_v4 = COMPARISONS[variant]
    ok = [r for r in runs if "v4_s" in r]
    if not ok:
        why = "not run" if not runs else oom_message(runs[0]) if "oom" in runs[0] else runs[0].get("error")
        return f"| {point} | {has} | {against} | | | failed: {why} | | |"
    pairs = [list(zip(r["v4_s"], r["variant_s"]) if in_v4 else zip(r["variant_s"], r["v4_s"])) for r in ok]
    ratios = [a / b for rnd in pairs for a, b in rnd]
    over = statistics.median(ratios) - 1
    per_round = [statistics.median(a / b for a, b in rnd) - 1 for rnd in pairs]
    t_with = statistics.median(a for rnd in pairs for a, _ in rnd)
    t_without = statistics.median(b for rnd in pairs for _, b in rnd)
    verdict = "" if goal is None else (f"<= {100 * goal:.1f}%: " + ("met" if over <= goal else "not met"))
    return (f"| {point} | {has} | {against} | {t_with:.2f} | {t_without:.2f} | {100 * over:+.1f}% ({len(ratios)} "
            f"pairs) | {', '.join(f'{100 * x:+.0f}%' for x in per_round)} | {verdict} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", nargs="+", default=["debug:2048", "debug:4096", "m100:2048", "m100:4096"],
                   help="model:sequence length pairs (models: %s)" % ", ".join(MODELS))
    p.add_argument("--variants", nargs="+", choices=list(COMPARISONS), default=list(COMPARISONS))
    p.add_argument("--reps", type=int, default=3, help="rounds: fresh subprocesses per comparison and point")
    p.add_argument("--steps", type=int, default=3, help="timed step pairs per subprocess, after 1 warm-up step each")
    p.add_argument("--mem-limit-gib", type=float, default=20.0, help="address-space limit of each subprocess")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per subprocess")
    p.add_argument("--worker", choices=list(COMPARISONS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        model, seq = args.points[0].split(":")
        worker(args.worker, model, int(seq), args.steps, args.mem_limit_gib)
        return 0

    rows = []
    for point in args.points:
        runs = {v: [] for v in args.variants}
        for rep in range(args.reps):
            for variant in (args.variants if rep % 2 == 0 else args.variants[::-1]):
                if any("oom" in r for r in runs[variant]):
                    continue  # out of memory is not a matter of load: another round would fail the same way
                r = run_worker([os.path.abspath(__file__), "--worker", variant, "--points", point,
                                "--steps", str(args.steps), "--mem-limit-gib", str(args.mem_limit_gib)], args.timeout)
                runs[variant].append(r)
                print(f"[{point} round {rep + 1}] {variant}: {json.dumps(r)}", file=sys.stderr, flush=True)
        rows.append((point, runs))

    print("| model:tokens | component | compared with | step s with it | step s without | overhead (median over "
          "step pairs of with / without - 1) | per round | goal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for point, runs in rows:
        for variant in args.variants:
            print(table_row(point, variant, runs[variant]))
    print_sources([r for _, runs in rows for rs in runs.values() for r in rs])
    return 0


if __name__ == "__main__":
    sys.exit(main())
