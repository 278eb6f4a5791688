#!/usr/bin/env bash
# The benchmarks at GPU sizes on one NVIDIA H200, sized for a session with 15 minutes of device time in all (machine
# start, transfers and this script together): this script must end within 9 minutes of wall time.
#
#     bash bench/h200.sh            # reports in $OUT/ when OUT is set (the device tool's folder), else in bench/
#
# What it runs, in order, each step under `timeout` so that one hang cannot eat the budget (a step that fails or
# times out is reported and the next step still runs; the script exits 1 at the end if any step failed):
#   1. the environment: nvidia-smi -L (cap 30 s); python, torch, CUDA, megatron-core (cap 60 s)
#   2. bench/attention_scaling.py --device cuda --lengths 4096 16384 32768 65536 --repeats 1   (cap 290 s)
#   3. bench/throughput.py --device cuda --models debug m100 --lengths 4096 16384 --reps 1 --steps 3  (cap 190 s)
# Worst case, every cap reached: 30 + 60 + 290 + 190 (+ 10 s of kill grace and 1 s of log draining each) = 614 s;
# the two environment steps take seconds in practice (~10 s for the python one: it imports torch and megatron), so
# the real worst case is about 290 + 190 + 2 x 11 + 15 = 517 s = 8.6 min.
#
# Expected time (estimates: no GPU has run these yet):
#   Every measurement is a fresh Python process (the benches' design). One costs ~12 s before it measures anything:
#   imports of torch, megatron-core and dsv4 (6-7 s of CPU each on this project's 2-core dev VM, where a CPU worker at
#   128 tokens takes 12-14 s wall), the config, CUDA context and the single-rank NCCL world.
#   attention_scaling: 4 lengths x 5 sublayers = 20 processes x 12 s = 240 s. On the GPU V4's blocked layers are
#     bound by kernel launches: counted on the CPU, a fwd+bwd runs ~75 (SWA), ~190 (CSA), ~140 (HCA) ops per 64-query
#     block; 4K+16K+32K+64K = 116K tokens = 1856 blocks -> ~0.75M ops, x 2 (warm-up step + timed step) x ~15 us =
#     ~25 s; dense SDPA and the projections are milliseconds (64K dense: ~27 TFLOP fwd+bwd). Total ~265 s = 4.4 min.
#   throughput: 2 models x 2 lengths x 2 systems = 8 processes x 12 s = ~100 s, plus the megatron worker's CPU build
#     of a dsv4 model for its shape (a few s). dsv4's debug layout (3 SWA, 2 CSA, 2 HCA blocks with MTP) runs ~900
#     ops per 64-token block per step: 16K = 256 blocks = ~0.23M ops = ~3.5 s a step, 4K ~0.9 s; 4 steps each
#     (1 warm-up + 3 timed), both models: ~35 s. megatron's GPT is fast (~0.2 s a step at 16K) but stores the full
#     s x s scores: m100 at 16K needs ~90 GB (8 heads x 16K^2 x ~6 bytes x 7 layers), debug ~45 GB: both fit in the
#     H200's ~139 GiB (a row that does not is reported as out of GPU memory). Total ~140 s = 2.3 min.
#   In all ~7 min expected (plus ~10-20 s installing .whl/ when present), 8.6 min at the caps.
# bench/fp8_proxy.py is NOT run: it trains a ~5.8B-parameter proxy twice (bf16, then FP8) through dsv4-train, each
# run building the model on the CPU and holding ~100 GB of weights and AdamW state, at 8 x 4096 tokens a step; even at
# its minimum useful --steps 10 that is several minutes per run, more than the ~2 min the two benches leave. It needs
# a session of its own.
#
# Prerequisites on the device machine: its python3 (3.12, torch with CUDA) lacks megatron-core, hydra-core,
# omegaconf and antlr4-python3-runtime. Carry them as cp312 wheels in .whl/ (see the device tool's README); this
# script installs .whl/*.whl into /tmp/site when that folder exists, and makes `import dsv4` work from this checkout
# (a symbolic link named dsv4 on PYTHONPATH) when it is not installed. PYTHON overrides the interpreter.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
DEST=${OUT:-$ROOT/bench}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
mkdir -p "$DEST"

if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c "import dsv4" 2>/dev/null; then
    mkdir -p /tmp/dsv4-path
    ln -sfn "$ROOT" /tmp/dsv4-path/dsv4
    export PYTHONPATH=/tmp/dsv4-path${PYTHONPATH:+:$PYTHONPATH}
fi

failed=()
step() {  # step NAME CAP STDOUT_LOG STDERR_LOG COMMAND...: COMMAND under timeout, its output shown and kept in the
          # logs (appended); a failure or timeout is recorded, not fatal, so the later steps still run
    local name=$1 cap=$2 out=$3 err=$4 t0=$SECONDS rc=0
    shift 4
    echo "=== $name (cap ${cap} s, script at ${SECONDS} s) ==="
    timeout -k 10 "$cap" "$@" > >(tee -a "$out") 2> >(tee -a "$err" >&2) || rc=$?
    sleep 1  # let the two tee processes drain
    echo "=== $name: exit $rc after $((SECONDS - t0)) s ==="
    if [ "$rc" -ne 0 ]; then
        failed+=("$name (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out' || true))")
    fi
}

ENV_PY='
import sys

import torch

cuda = torch.cuda.is_available()
print(f"python {sys.version.split()[0]} ({sys.executable}); torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuda available: {cuda}" + (f", {torch.cuda.get_device_name()}" if cuda else ""))
import megatron.core

import dsv4

print(f"megatron-core {megatron.core.__version__}; dsv4 from {dsv4.__path__[0]}")
'
ENV_LOG=$DEST/h200_env.txt
step nvidia-smi 30 "$ENV_LOG" "$ENV_LOG" nvidia-smi -L
step environment 60 "$ENV_LOG" "$ENV_LOG" "$PY" -c "$ENV_PY"

# One process per (length, sublayer); each measurement's line goes to the log as it ends (kept if the cap is hit),
# the report to the .md.
LOG=$DEST/attention_scaling_h200.log
step attention_scaling 290 "$LOG" "$LOG" "$PY" bench/attention_scaling.py --device cuda --dtype bfloat16 \
    --lengths 4096 16384 32768 65536 --repeats 1 --out "$DEST/attention_scaling_h200.md"

# One process per (model, length, system), each capped at 150 s by the bench itself; the per-process JSON (with
# TFLOP/s, MFU and peak GPU memory) goes to the log as each ends, the report (header and table) to the .md.
step throughput 190 "$DEST/throughput_h200.md" "$DEST/throughput_h200.log" "$PY" bench/throughput.py --device cuda \
    --dtype bfloat16 --models debug m100 --lengths 4096 16384 --reps 1 --steps 3 --timeout 150

echo "reports in $DEST: attention_scaling_h200.md, throughput_h200.md (logs: *_h200.log, h200_env.txt); ${SECONDS} s"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "failed steps: ${failed[*]}" >&2
    exit 1
fi
