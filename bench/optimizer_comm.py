"""Communication per optimizer step, measured: V4's Muon + AdamW against ZeRO-1 AdamW over data-parallel ranks.

    python bench/optimizer_comm.py [--steps 3] [--layouts dp2 dp4 tp2dp2]

Every layout trains the debug model (4 x 256 tokens per step) twice, with optim=adamw (megatron-core's distributed
optimizer, ZeRO-1: gradients reduce-scattered, parameters all-gathered) and with optim=muon (dsv4.optim.distributed:
gradients all-reduced by megatron DDP, then each tensor's owner updates it and broadcasts it). Each rank runs the
training loop's own `train_step` for one warm-up step and `--steps` measured steps, and counts the bytes it hands to
torch.distributed collectives during the measured steps.

How the bytes are counted: the collective functions are wrapped in each rank's process (nothing is patched in the
library files): every name in the `torch.distributed` namespace that megatron-core and dsv4 call at run time, and
every module-level alias bound at import time (megatron-core's `dist_all_gather_func` / `dist_reduce_scatter_func`
in distributed/param_and_grad_buffer.py, tensor_parallel/*.py, utils.py, ...). The aliases are found by scanning
the loaded megatron and dsv4 modules for attributes that are the original functions, after the imports and before
the model is built; the list patched is printed. Each call is attributed to the phase of the step it runs in
(forward+backward, gradient reduction = `finalize_grads`, optimizer step = `loop._optimizer_step`, other =
losses, gradient norm, the non-finite check, router statistics) and to its process group (dp, edp, tp, world, ...).

Reported per rank and step, in units of P = the bytes of this rank's parameters (fp32 here, as are the gradient
buffers): the payload handed to each collective (all-reduce/broadcast: the tensor; reduce-scatter: the full input
buffer; all-gather: the full output buffer; all-to-all and send: what is sent) and the ring-equivalent bytes each
rank sends over a group of n: all-reduce 2(n-1)/n x payload, reduce-scatter and all-gather (n-1)/n x full buffer,
broadcast and reduce (n-1)/n x payload (a pipelined chain; a root sending to every peer directly gives the same
average when, as here, every rank is the root of an equal share), all-to-all the bytes addressed to other ranks,
send the tensor. The counts are what is asked of the library, not what gloo puts on the loopback wire.
"theory" is 2P(n-1)/n for ZeRO-1 AdamW and 3P(n-1)/n for this Muon, summed over the dense parameters (n = dp) and
the routed experts (n = edp). (megatron-core 0.16.1's chained optimizers would all-gather the parameters once per
optimizer, i.e. twice per step; `dsv4.train.loop._optimizer_step` updates both, then gathers once.)
"""

from __future__ import annotations

import argparse
import functools
import os
import pickle
import socket
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import torch.multiprocessing as mp

LAYOUTS = {  # name: (ranks, overrides); one global batch of 4 x 256 tokens per step in every layout
    "dp2": (2, ["data.micro_batch_size=2"]),
    "dp4": (4, ["data.micro_batch_size=1"]),
    "tp2dp2": (4, ["data.micro_batch_size=2", "parallel.tp=2"]),
}
OPTIMIZERS = ("adamw", "muon")
PHASES = ("forward+backward", "gradient reduction", "optimizer step", "other")

# The torch.distributed functions counted. Payload and ring-equivalent bytes sent per call are computed by
# `_measure` from the arguments, before the call (a collective never changes its tensors' sizes).
COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "broadcast", "reduce", "all_gather", "all_gather_single",
               "all_gather_into_tensor", "_all_gather_base", "all_gather_coalesced", "all_gather_object",
               "reduce_scatter", "reduce_scatter_single", "reduce_scatter_tensor", "_reduce_scatter_base",
               "all_to_all", "all_to_all_single", "gather", "scatter", "broadcast_object_list", "send", "recv",
               "isend", "irecv", "batch_isend_irecv")


# --- counting (inside each rank) ---------------------------------------------------------------------------------

def _nbytes(t) -> int:
    import torch

    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


class _Counter:
    """Byte counts of one rank: {(phase, group label, collective): [calls, payload bytes, ring-equivalent sent]}.
    `enabled` is set during the measured steps only; `phase` by the wrappers of the step's parts."""

    def __init__(self):
        self.enabled = False
        self.phase = "other"
        self.counts = defaultdict(lambda: [0, 0, 0])
        self.labels = {}  # tuple of global ranks -> group name, filled once the groups exist
        self.patched = []  # "module.attr" names that were wrapped

    def label(self, group) -> tuple:
        import torch.distributed as dist

        ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(
            range(dist.get_world_size()))
        return self.labels.get(ranks, "other") + f" ({len(ranks)})", len(ranks)

    def add(self, kind: str, group, payload: int, sent_of_n) -> None:
        if not self.enabled:
            return
        name, n = self.label(group)
        row = self.counts[(self.phase, name, kind)]
        row[0] += 1
        row[1] += payload
        row[2] += sent_of_n(n) if n > 1 else 0


COUNTER = _Counter()


def _arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _measure(kind: str, args, kwargs) -> tuple:
    """(group, payload bytes, n -> ring-equivalent bytes sent) of one call of `kind` with these arguments."""
    import torch.distributed as dist

    group = kwargs.get("group")
    if kind in ("all_reduce", "all_reduce_coalesced"):
        group = _arg(args, kwargs, 2, "group")
        b = _nbytes(args[0])
        return group, b, lambda n: 2 * (n - 1) / n * b
    if kind in ("broadcast", "reduce"):  # broadcast(tensor, src, group), reduce(tensor, dst, op, group)
        group = _arg(args, kwargs, 2 if kind == "broadcast" else 3, "group")
        b = _nbytes(args[0])
        return group, b, lambda n: (n - 1) / n * b
    if kind in ("all_gather_single", "all_gather_into_tensor", "_all_gather_base"):  # (output, input): full output
        group = _arg(args, kwargs, 2, "group")
        b = _nbytes(args[0])
        return group, b, lambda n: (n - 1) / n * b
    if kind in ("all_gather", "all_gather_coalesced"):  # (output list, input): n pieces of the input
        group = _arg(args, kwargs, 2, "group")
        b = _nbytes(args[0])
        return group, b, lambda n: (n - 1) / n * b
    if kind in ("reduce_scatter_single", "reduce_scatter_tensor", "_reduce_scatter_base"):  # (output, input)
        group = _arg(args, kwargs, 3, "group")
        b = _nbytes(args[1])
        return group, b, lambda n: (n - 1) / n * b
    if kind == "reduce_scatter":  # (output, input list)
        group = _arg(args, kwargs, 3, "group")
        b = _nbytes(args[1])
        return group, b, lambda n: (n - 1) / n * b
    if kind == "all_to_all_single":  # (output, input, output_split_sizes, input_split_sizes, group)
        group = _arg(args, kwargs, 4, "group")
        x, splits = args[1], _arg(args, kwargs, 3, "input_split_sizes")
        b = _nbytes(x)
        if splits is None or len(splits) == 0:
            return group, b, lambda n: (n - 1) / n * b
        row = b // max(1, x.shape[0]) if x.dim() else b
        mine = int(list(splits)[dist.get_rank(group) if group is not None else dist.get_rank()]) * row
        return group, b, lambda n: b - mine
    if kind == "all_to_all":  # (output list, input list, group)
        group = _arg(args, kwargs, 2, "group")
        xs = args[1]
        mine = _nbytes(xs[dist.get_rank(group) if group is not None else dist.get_rank()])
        b = _nbytes(xs)
        return group, b, lambda n: b - mine
    if kind in ("all_gather_object", "broadcast_object_list"):  # pickled size of what this rank contributes
        group = _arg(args, kwargs, 2, "group")
        obj = args[1] if kind == "all_gather_object" else args[0]
        b = len(pickle.dumps(obj))
        return group, b, (lambda n: (n - 1) * b) if kind == "all_gather_object" else (lambda n: (n - 1) / n * b)
    if kind in ("gather", "scatter"):  # rare here: the payload, counted as sent once
        group = _arg(args, kwargs, 3, "group")
        b = _nbytes(args[0]) + _nbytes(args[1] if len(args) > 1 else [])
        return group, b, lambda n: b
    if kind in ("send", "isend"):
        group = _arg(args, kwargs, 2, "group")
        b = _nbytes(args[0])
        return group, b, lambda n: b
    if kind in ("recv", "irecv"):  # received, not sent
        group = _arg(args, kwargs, 2, "group")
        return group, _nbytes(args[0]), lambda n: 0
    raise AssertionError(kind)


class _Counted:
    """A collective that counts its bytes, then calls the original. Compares equal to the original, so that
    torch's `P2POp(torch.distributed.isend, ...)` check (`op in [isend, irecv]`) still accepts it."""

    def __init__(self, kind: str, original):
        functools.update_wrapper(self, original)
        self.kind, self.original = kind, original

    def __call__(self, *args, **kwargs):
        if COUNTER.enabled:
            if self.kind == "batch_isend_irecv":
                for op in args[0]:
                    inner = getattr(op.op, "original", op.op)
                    kind = "isend" if inner.__name__ == "isend" else "irecv"
                    _, b, sent = _measure(kind, (op.tensor,), {})
                    COUNTER.add(kind + " (batched)", op.group, b, sent)
            else:
                group, b, sent = _measure(self.kind, args, kwargs)
                COUNTER.add(self.kind, group, b, sent)
        if self.kind == "batch_isend_irecv":  # torch dispatches on `op.op is isend`: hand it the originals
            for op in args[0]:
                op.op = getattr(op.op, "original", op.op)
        return self.original(*args, **kwargs)

    def __eq__(self, other):
        return other is self or other is self.original

    def __hash__(self):
        return hash(self.original)


def install_counters() -> list:
    """Wrap the collectives in torch.distributed's namespace and every alias of them bound in an imported megatron
    or dsv4 module. torch's own module (distributed_c10d) keeps the originals, so torch's internal calls (e.g.
    all_gather_object's all_gather, coalescing) are neither counted twice nor broken."""
    import torch.distributed as dist

    originals = {}
    for kind in COLLECTIVES:
        fn = getattr(dist, kind, None)
        if fn is not None:
            originals[id(fn)] = (kind, fn)
            setattr(dist, kind, _Counted(kind, fn))
            COUNTER.patched.append(f"torch.distributed.{kind}")
    for mod_name, module in list(sys.modules.items()):
        if module is None or not mod_name.startswith(("megatron", "dsv4")):
            continue
        for attr, value in list(vars(module).items()):
            if id(value) in originals and value is originals[id(value)][1]:
                setattr(module, attr, getattr(dist, originals[id(value)][0]))
                COUNTER.patched.append(f"{mod_name}.{attr}")
    return COUNTER.patched


def _in_phase(phase: str, fn):
    """`fn`, run with the counter's phase set to `phase` (restored afterwards)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        before, COUNTER.phase = COUNTER.phase, phase
        try:
            return fn(*args, **kwargs)
        finally:
            COUNTER.phase = before

    return run


def _rank(rank, world, port, optim, overrides, steps, cache, out_dir, results):
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    import torch.distributed as dist

    from dsv4.conf.schema import compose_config
    from dsv4.parallel.state import destroy_distributed, init_distributed
    from dsv4.train import loop  # imports megatron-core's DDP, optimizers and tensor-parallel modules
    from dsv4.train.data import build_data

    patched = install_counters()  # after the imports (aliases exist), before the model is built
    cfg = compose_config("debug", [f"optim={optim}", f"data.cache_dir={cache}", f"run.output_dir={out_dir}",
                                   f"run.steps={steps + 1}", "optim.warmup_steps=1", "optim.lr=1e-3",
                                   "data.seq_length=256", "data.global_batch_size=4", *overrides],
                         world_size=world)
    p = cfg.parallel
    groups = init_distributed(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, vpp=p.vpp)
    # Group names by their ranks: with ep=1 the expert groups repeat dense ones (dp2: dp/edp), and the whole world
    # is named after the parallel group it coincides with, if any (tp2 x dp2: edp, the experts' replicas).
    names = defaultdict(list)
    for name in ("tp", "dp", "edp", "ep", "etp", "pp"):
        names[tuple(dist.get_process_group_ranks(getattr(groups, name)))].append(name)
    COUNTER.labels = {ranks: "/".join(n) for ranks, n in names.items()}
    COUNTER.labels.setdefault(tuple(range(world)), "world")

    chunks = loop.build_model(cfg, groups)
    optimizer = loop.build_optimizer(chunks, cfg, groups)
    # The parts of loop.train_step, each counted under its phase (the loop looks these names up at call time).
    loop._run_schedule = _in_phase("forward+backward", loop._run_schedule)
    loop.finalize_grads = _in_phase("gradient reduction", loop.finalize_grads)
    loop._optimizer_step = _in_phase("optimizer step", loop._optimizer_step)
    data = build_data(cfg, dp_rank=groups.dp_rank, dp_size=groups.dp_size)
    train = iter(data.train)
    n_micro = cfg.data.global_batch_size // (cfg.data.micro_batch_size * groups.dp_size)
    losses = []
    for step in range(steps + 1):
        for c in chunks:
            loop.unwrap(c).set_step(step)
        batches = [next(train) for _ in range(n_micro)]
        COUNTER.enabled = step > 0  # step 0 is the warm-up
        metrics = loop.train_step(chunks, optimizer, batches, cfg, groups, step)
        COUNTER.enabled = False
        losses.append(metrics["loss"])
    # P: this rank's parameter bytes; split by the group that replicates them (dense: dp, routed experts: edp).
    params = [t for c in chunks for t in c.parameters()]
    dense = sum(t.numel() * t.element_size() for t in params if getattr(t, "allreduce", True))
    expert = sum(t.numel() * t.element_size() for t in params if not getattr(t, "allreduce", True))
    results.put((rank, {"counts": {k: list(v) for k, v in COUNTER.counts.items()}, "steps": steps,
                        "dense_bytes": dense, "expert_bytes": expert, "dp": groups.dp_size,
                        "edp": dist.get_world_size(groups.edp), "losses": losses,
                        "patched": patched if rank == 0 else None}))
    destroy_distributed()


# --- the launcher --------------------------------------------------------------------------------------------------

def run(layout: str, optim: str, steps: int, cache: str, tmp: str) -> list:
    """Spawn the ranks of one (layout, optimizer) run; returns each rank's counts."""
    world, overrides = LAYOUTS[layout]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    out_dir = os.path.join(tmp, f"{layout}-{optim}")
    procs = [ctx.Process(target=_rank, args=(r, world, port, optim, overrides, steps, cache, out_dir, results))
             for r in range(world)]
    for p in procs:
        p.start()
    got = [results.get() for _ in range(world)]  # before join: a full queue pipe would block the writers
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"{layout} {optim}: a rank exited with {p.exitcode}")
    return [r for _, r in sorted(got, key=lambda x: x[0])]


def summarise(ranks: list) -> dict:
    """Per rank and step, averaged over the ranks: {(phase, group, kind): (calls, payload, sent)} in bytes, plus P
    and the theory's unit: sum over the parameter groups of their bytes x (n-1)/n."""
    steps = ranks[0]["steps"]
    rows = defaultdict(lambda: [0.0, 0.0, 0.0])
    for r in ranks:
        for key, (calls, payload, sent) in r["counts"].items():
            row = rows[key]
            row[0] += calls / steps / len(ranks)
            row[1] += payload / steps / len(ranks)
            row[2] += sent / steps / len(ranks)
    r0 = ranks[0]
    P = statistics.mean(r["dense_bytes"] + r["expert_bytes"] for r in ranks)
    unit = statistics.mean(r["dense_bytes"] * (r["dp"] - 1) / r["dp"] + r["expert_bytes"] * (r["edp"] - 1) / r["edp"]
                           for r in ranks)
    return {"rows": dict(rows), "P": P, "unit": unit, "dp": r0["dp"], "edp": r0["edp"], "losses": r0["losses"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="measured steps, after one warm-up step")
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    args = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        for layout in args.layouts:
            for optim in OPTIMIZERS:
                t0 = time.perf_counter()
                ranks = run(layout, optim, args.steps, cache, tmp)
                results[(layout, optim)] = summarise(ranks)
                print(f"{layout} {optim}: done in {time.perf_counter() - t0:.0f} s, losses "
                      + " ".join(f"{x:.3f}" for x in results[(layout, optim)]["losses"]), file=sys.stderr, flush=True)
                if ranks[0]["patched"] and len(results) == 1:
                    print("wrapped: " + ", ".join(ranks[0]["patched"]), file=sys.stderr, flush=True)

    def total(s, phases, kinds=None, what=2):
        """Bytes (what=2: ring-equivalent sent, 1: payload) of the given phases (and collective kinds)."""
        return sum(v[what] for (phase, _, kind), v in s["rows"].items()
                   if phase in phases and (kinds is None or kind in kinds))

    gathers = ("all_gather_single", "all_gather_into_tensor", "_all_gather_base")
    scatters = ("reduce_scatter_single", "reduce_scatter_tensor", "_reduce_scatter_base")

    dp_side = ("gradient reduction", "optimizer step", "other")
    print("\nRing-equivalent bytes sent per rank and step, in units of P (this rank's parameter bytes):\n")
    print("| layout | optimizer | P per rank | gradient reduction | optimizer step | other (losses, norm, checks) | "
          "total | theory | Muon / AdamW | forward+backward (activations) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (layout, optim), s in results.items():
        P = s["P"]
        tot = total(s, dp_side)
        theory = (2 if optim == "adamw" else 3) * s["unit"] / P  # 2P(n-1)/n, 3P(n-1)/n per parameter group
        base = results.get((layout, "adamw"))
        ratio = f"{tot / total(base, dp_side):.2f}x" if optim == "muon" and base else ""
        print(f"| {layout} (dp {s['dp']}, edp {s['edp']}) | {optim} | {P / 2**20:.2f} MiB | "
              f"{total(s, ('gradient reduction',)) / P:.3f} | {total(s, ('optimizer step',)) / P:.3f} | "
              f"{total(s, ('other',)) / P:.4f} | {tot / P:.3f} | {theory:.3f} | {ratio} | "
              f"{total(s, ('forward+backward',)) / P:.3f} |")
    for (layout, optim), s in results.items():
        if optim == "adamw" and total(s, ("gradient reduction",), scatters, what=1):
            print(f"\n{layout} adamw: parameter all-gather payload = "
                  f"{total(s, ('optimizer step',), gathers, what=1) / total(s, ('gradient reduction',), scatters, what=1):.2f}"
                  f" x the gradient reduce-scatter payload (ZeRO-1: 1)", end="")
    print()
    print("\nPer collective, per rank and step (mean over the ranks; payload and ring-equivalent sent in P):\n")
    print("| layout | optimizer | phase | collective | group (size) | calls | payload | sent |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (layout, optim), s in results.items():
        for (phase, group, kind), (calls, payload, sent) in sorted(
                s["rows"].items(), key=lambda kv: (PHASES.index(kv[0][0]), -kv[1][2])):
            print(f"| {layout} | {optim} | {phase} | {kind} | {group} | {calls:g} | {payload / s['P']:.4f} | "
                  f"{sent / s['P']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
