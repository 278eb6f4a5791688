"""Typed schemas of the config groups besides `model` (whose schema is dsv4.model.config.ModelConfig).

Each group is a dataclass with a documented field per knob and a `validate()` that rejects impossible values with
a message naming the key and the fix; cross-group checks live in `DSV4Config.validate` (conf/schema.py). Presets in
conf/<group>/*.yaml hold values only.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from dsv4.model.config import ConfigError
from dsv4.model.config import require as _need
from dsv4.parallel.fp8 import BACKENDS, MODULES, RECIPES
from dsv4.train.preemption import signal_number

RECOMPUTE = ("none", "block")
AUTO_WARMUP_STEPS = 20
"""optim.warmup_steps when unset: this many steps, at most a tenth of run.steps (DSV4Config.validate)."""
_TIME = re.compile(r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$")


def _need_creatable(path: str, key: str) -> None:
    """`path` is a folder, or one this process can create: its nearest existing ancestor is a writable folder.
    Checked without creating anything (validation has no side effects)."""
    path = os.path.abspath(os.path.expanduser(path))
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe == path:
        _need(os.path.isdir(path), key, f"{path} exists and is not a folder; choose another path")
    else:
        _need(os.path.isdir(probe), key, f"{path} cannot be created: {probe} is a file, not a folder; choose "
                                         f"another path")
    _need(os.access(probe, os.W_OK | os.X_OK), key, f"{path} cannot be written: {probe} is not writable by this "
                                                   f"user; choose a path under a folder you can write")


@dataclass
class ParallelConfig:
    """How ranks are laid out, Megatron style. The dense part of the model is split over tp x pp ranks (one model
    replica) and replicated over dp = world / (tp * pp) data-parallel ranks; the routed experts use their own grid
    over the same world: each expert's matrices split over `etp` ranks, the experts spread over `ep` ranks, the
    same `pp` stages, and expert-data parallel over the rest (world / (etp * ep * pp))."""

    tp: int = 1
    """Tensor-parallel size (query heads, indexer heads, output groups, vocabulary and the shared expert split)."""
    sp: bool = True
    """Sequence parallelism with tensor parallelism: activations outside attention and the MLPs are split along
    the sequence over the tp ranks (only acts when tp > 1; megatron requires it when tp and ep combine)."""
    pp: int = 1
    """Pipeline-parallel size: the layers are cut into this many consecutive stages, one per pipeline rank."""
    vpp: int = 1
    """Virtual pipeline stages per pipeline rank: each rank holds this many non-adjacent chunks of layers and runs
    megatron's interleaved 1F1B schedule when > 1 (a smaller pipeline bubble for more communication)."""
    pp_layers: List[int] = field(default_factory=list)
    """Layers per virtual stage, in model order (stage 0 of rank 0, stage 0 of rank 1, ..., pp * vpp entries
    summing to model.num_layers); empty: an even split."""
    ep: int = 1
    """Expert-parallel size: the routed experts are spread over this many ranks and tokens travel to them
    all-to-all."""
    etp: int = 1
    """Expert-tensor-parallel size: each routed expert's matrices are split over this many ranks."""
    dp: int = 0
    """Data-parallel size; 0: derived as world / (tp * pp). When set it must equal that (a check of the launch)."""
    distributed_optimizer: bool = True
    """megatron-core's distributed optimizer (ZeRO-1): the optimizer state is sharded over the data-parallel
    ranks."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduce-scatter/all-reduce with the backward pass (megatron DDP
    buckets)."""
    recompute: str = "none"
    """Activation recomputation: none, or block (each block, MTP included, keeps only its input streams in the
    forward pass and is recomputed in the backward pass: the same gradients for about one more forward of compute,
    with one block's activations alive at a time instead of all of them)."""

    def validate(self) -> None:
        _need(self.recompute in RECOMPUTE, "parallel.recompute",
              f"must be one of {', '.join(RECOMPUTE)}, got {self.recompute!r}")
        for key in ("tp", "pp", "vpp", "ep", "etp"):
            value = getattr(self, key)
            _need(value >= 1, f"parallel.{key}", f"must be >= 1, got {value}")
        _need(self.dp >= 0, "parallel.dp", f"must be >= 0 (0: derived from the world size), got {self.dp}")
        _need(self.vpp == 1 or self.pp > 1, "parallel.vpp",
              f"{self.vpp} virtual stages with parallel.pp={self.pp}: interleaving needs pipeline stages; set "
              f"parallel.pp>=3 or vpp=1")
        _need(all(n >= 1 for n in self.pp_layers), "parallel.pp_layers",
              f"must all be >= 1 (every virtual stage holds a layer), got {self.pp_layers}")
        stages = self.pp * self.vpp
        _need(not self.pp_layers or len(self.pp_layers) == stages, "parallel.pp_layers",
              f"{len(self.pp_layers)} entries for pp*vpp = {self.pp}*{self.vpp} = {stages} virtual stages; give "
              f"one per stage or [] for an even split")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (AdamW until the Muon issue)."""

    name: str = "adamw"
    """Optimizer: adamw (every parameter), or muon (V4: Muon for hidden matrices, AdamW for embedding, heads,
    norms, mHC biases and gates, sinks and position biases; dsv4.optim.distributed)."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay (V4: peak / 10)."""
    schedule: str = "cosine"
    """cosine: linear warm-up then cosine decay to min_lr; wsd: warm-up, stable, then linear decay over the last
    decay_fraction of the steps; constant: warm-up then flat."""
    warmup_steps: Optional[int] = None
    """Linear warm-up steps from 0 to lr; unset (null, the presets): 20, clipped to a tenth of run.steps for runs
    shorter than 200 steps (with a notice). A value given is used as is (and must leave steps to decay)."""
    decay_fraction: float = 0.2
    """wsd only: fraction of run.steps spent decaying."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (not on norms, biases, mHC scales/biases, sinks, position biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    mtp_loss_weight_after_decay: float = 0.1
    """The MTP loss weight from optim.mtp_weight_switch_step on (before it: model.mtp_loss_weight; V3/V4: 0.3, 0.1)."""
    mtp_weight_switch_step: int = -1
    """First optimizer step (0-based) with the lowered MTP loss weight; -1: where a WSD decay would start,
    run.steps - round(decay_fraction x run.steps) (at least warmup_steps), under every schedule: DeepSeek-V3 kept
    0.3 for its first 10T of 14.8T tokens and switched when its constant-LR phase ended, not when cosine decay
    would start (right after warm-up); a step >= run.steps never switches."""
    muon_momentum: float = 0.95
    """muon: momentum mu (V4: 0.95)."""
    muon_nesterov: bool = True
    """muon: Nesterov look-ahead (V4: yes)."""
    muon_ns: str = "v4_hybrid"
    """muon: Newton-Schulz schedule: v4_hybrid (8 quintic + 2 clean-up steps) or moonlight (5 quintic steps)."""
    muon_rms_scale: float = 0.18
    """muon: RMS the orthogonalised update is rescaled to (V4: 0.18; Moonlight: 0.2)."""
    muon_ns_dtype: str = "bfloat16"
    """muon: Newton-Schulz precision: bfloat16 (V4) or float32 (exact comparisons between layouts: bf16 rounds
    sums taken in another order differently)."""

    def validate(self) -> None:
        _need(self.name in ("adamw", "muon"), "optim.name", f"{self.name!r}: choose adamw or muon")
        _need(0 <= self.muon_momentum < 1, "optim.muon_momentum", f"must be in [0, 1), got {self.muon_momentum}")
        _need(self.muon_ns in ("v4_hybrid", "moonlight"), "optim.muon_ns",
              f"{self.muon_ns!r}: choose v4_hybrid or moonlight")
        _need(self.muon_rms_scale > 0, "optim.muon_rms_scale", f"must be > 0, got {self.muon_rms_scale}")
        _need(self.muon_ns_dtype in ("bfloat16", "float32"), "optim.muon_ns_dtype",
              f"{self.muon_ns_dtype!r}: choose bfloat16 or float32")
        _need(self.schedule in ("cosine", "wsd", "constant"), "optim.schedule",
              f"{self.schedule!r}: choose cosine, wsd or constant")
        _need(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _need(0 <= self.min_lr <= self.lr, "optim.min_lr", f"must be in [0, optim.lr={self.lr}], got {self.min_lr}")
        _need(self.warmup_steps is None or self.warmup_steps >= 0, "optim.warmup_steps",
              f"must be >= 0 (or null: derived from run.steps), got {self.warmup_steps}")
        _need(0 < self.decay_fraction <= 1, "optim.decay_fraction", f"must be in (0, 1], got {self.decay_fraction}")
        _need(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _need(0 <= self.beta1 < 1, "optim.beta1", f"must be in [0, 1), got {self.beta1}")
        _need(0 <= self.beta2 < 1, "optim.beta2", f"must be in [0, 1), got {self.beta2}")
        _need(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        _need(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 disables clipping), got {self.grad_clip}")
        _need(self.mtp_loss_weight_after_decay >= 0, "optim.mtp_loss_weight_after_decay", "must be >= 0")
        _need(self.mtp_weight_switch_step >= -1, "optim.mtp_weight_switch_step",
              f"must be a step >= 0, or -1 for the WSD decay start, got {self.mtp_weight_switch_step}")


@dataclass
class DataConfig:
    """Training data: megatron-core indexed datasets (`dsv4-preprocess` writes them), or the embedded corpus."""

    prefixes: List[str] = field(default_factory=list)
    """Dataset path prefixes (`<prefix>.bin/.idx`); empty: the embedded corpus, built once and cached."""
    weights: List[float] = field(default_factory=list)
    """Blend weights, one per prefix (empty: proportional to size)."""
    tokenizer: Optional[str] = None
    """A tokenizer.json; default: the one `dsv4-preprocess` stored beside the first prefix."""
    cache_dir: str = "~/.cache/dsv4"
    """Where the embedded corpus and dataset index caches are kept."""
    seq_length: int = 256
    """Tokens per training sequence."""
    micro_batch_size: int = 2
    """Sequences per forward/backward on one data-parallel rank."""
    global_batch_size: int = 0
    """Sequences per optimizer step over all data-parallel ranks (a multiple of micro_batch_size * dp size:
    the remainder is gradient accumulation); 0: micro_batch_size x the data-parallel size, no accumulation (so
    the batch grows with the ranks; state it to keep one batch across layouts, e.g. to resume on another)."""
    split: str = "98,2,0"
    """Train/valid/test split of each dataset's documents, in parts."""
    document_mask: bool = False
    """Sample-level attention masking across the documents packed into a sequence (V4 trains with it): a token
    attends only to its own document; compressed entries pool one document's tokens."""

    def validate(self) -> None:
        _need(self.seq_length > 0, "data.seq_length", f"must be > 0, got {self.seq_length}")
        _need(self.micro_batch_size > 0, "data.micro_batch_size", f"must be > 0, got {self.micro_batch_size}")
        _need(self.global_batch_size >= 0, "data.global_batch_size",
              f"must be > 0 (or 0: micro_batch_size x the data-parallel size), got {self.global_batch_size}")
        _need_creatable(self.cache_dir, "data.cache_dir")
        _need(not self.weights or len(self.weights) == len(self.prefixes), "data.weights",
              f"{len(self.weights)} weights for {len(self.prefixes)} prefixes; give one per prefix or none")
        _need(all(w > 0 for w in self.weights), "data.weights", f"must all be > 0, got {self.weights}")
        parts = self.split.split(",")
        ok = len(parts) == 3 and all(p.strip().replace(".", "", 1).isdigit() for p in parts)
        _need(ok and float(parts[0]) > 0, "data.split",
              f"{self.split!r}: give three non-negative parts 'train,valid,test' with train > 0, e.g. '98,2,0'")


@dataclass
class PrecisionConfig:
    """Numeric formats (conf/precision/: auto, bf16, fp32, fp8)."""

    params_dtype: str = "auto"
    """Parameter dtype: float32, bfloat16, or auto (bfloat16 on a GPU, float32 on CPU). Norms, mHC, sinks, router and
    compressors stay fp32."""
    fp8: str = "none"
    """FP8 GEMMs for the linear layers of `fp8_modules` (dsv4/parallel/fp8.py): none, blockwise (DeepSeek-V3: 1x128
    activation tiles, 128x128 weight blocks), tensorwise (current scaling), delayed (TransformerEngine), mxfp8
    (Blackwell). The router, norms, embedding, head, mHC and the attention softmax stay in higher precision."""
    fp8_backend: str = "auto"
    """te (TransformerEngine), torch (PyTorch's scaled_mm on Hopper), emulate (quantize-dequantize on any device:
    tests and numerics studies, slow) or auto (te when installed on a GPU, else torch on Hopper). Checked when the job
    starts: where none applies, the job stops saying what is missing."""
    fp8_modules: List[str] = field(default_factory=lambda: ["attention"])
    """Which projections run in FP8: attention (q, K=V and output projections), indexer (compressor and indexer
    projections), experts (routed and shared)."""
    fp8_block: int = 128
    """Tile size of the blockwise recipe: 128 (smaller only with fp8_backend=emulate, for tiny test models)."""

    def validate(self) -> None:
        _need(self.params_dtype in ("auto", "float32", "bfloat16"), "precision.params_dtype",
              f"{self.params_dtype!r}: choose auto, float32 or bfloat16")
        _need(self.fp8 in ("none", *RECIPES), "precision.fp8", f"{self.fp8!r}: choose none, {', '.join(RECIPES)}")
        _need(self.fp8_backend in BACKENDS, "precision.fp8_backend",
              f"{self.fp8_backend!r}: choose {', '.join(BACKENDS)}")
        bad = [m for m in self.fp8_modules if m not in MODULES]
        _need(not bad and bool(self.fp8_modules), "precision.fp8_modules",
              f"{list(self.fp8_modules)}: give one or more of {', '.join(MODULES)}")
        _need(self.fp8_block >= 1, "precision.fp8_block", f"must be >= 1, got {self.fp8_block}")

    def torch_params_dtype(self, cuda_available: Optional[bool] = None) -> torch.dtype:
        """The parameter dtype, with auto resolved for this machine (or for `cuda_available`)."""
        name = self.params_dtype
        if name == "auto":
            cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
            name = "bfloat16" if cuda else "float32"
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


@dataclass
class RunConfig:
    """One training run: where it writes, how long, how often it logs and evaluates."""

    output_dir: str = "runs/${now:%Y-%m-%d_%H-%M-%S}"
    """Run folder: resolved config, versions, TensorBoard events."""
    steps: int = 300
    """Optimizer steps."""
    seed: int = 1234
    """Seed of model init and data order."""
    log_interval: int = 10
    """Steps between TensorBoard/progress updates."""
    eval_interval: int = 100
    """Steps between validation passes (0 disables)."""
    eval_iters: int = 4
    """Validation micro-batches (of data.micro_batch_size sequences) per pass for the whole job, split over the
    data-parallel ranks: the same sequences under every layout."""
    on_nan: str = "skip"
    """A non-finite loss: skip the step (no update) or stop the run with a message."""
    max_skipped_steps: int = 10
    """on_nan=skip: stop after this many consecutive skipped steps."""
    progress_bar: bool = True
    """A rank-0 progress bar with ETA and the current loss (plain lines when not on a terminal)."""
    save_interval: int = 100
    """Steps between sharded checkpoints in <output_dir>/checkpoints (also at the last step); 0 disables."""
    keep_last: int = 2
    """Complete checkpoints kept (older ones are deleted once a newer one is complete)."""
    async_save: bool = False
    """Write checkpoints in the background (megatron-core async save); published when the write has finished."""
    stop_signals: List[str] = field(default_factory=lambda: ["USR1"])
    """Signals that stop training after the current step with a checkpoint (SLURM: --signal=USR1@N); the handlers
    are installed at start-up. Adding TERM saves on SIGTERM too, but then a SIGTERM no longer ends a rank at once:
    torchrun's and SLURM's clean-up after a failure waits for the step (or their SIGKILL)."""
    requeue_on: List[str] = field(default_factory=lambda: ["USR1"])
    """Inside a SLURM job, a stop by one of these signals requeues the job (scontrol requeue) after the save."""
    resume: str = "auto"
    """auto: continue from the latest complete checkpoint of output_dir, if any; none: start fresh; or a path to a
    checkpoint folder (.../checkpoints/step_N) or a run folder, loaded under this run's parallel layout."""

    def validate(self) -> None:
        _need(self.steps > 0, "run.steps", f"must be > 0, got {self.steps}")
        _need(self.seed >= 0, "run.seed", f"must be >= 0, got {self.seed}")
        _need_creatable(self.output_dir, "run.output_dir")
        _need(self.log_interval > 0, "run.log_interval", f"must be > 0, got {self.log_interval}")
        _need(self.eval_interval >= 0, "run.eval_interval", f"must be >= 0 (0 disables), got {self.eval_interval}")
        _need(self.eval_iters > 0, "run.eval_iters", f"must be > 0, got {self.eval_iters}")
        _need(self.on_nan in ("skip", "stop"), "run.on_nan", f"{self.on_nan!r}: choose skip or stop")
        _need(self.max_skipped_steps > 0, "run.max_skipped_steps", f"must be > 0, got {self.max_skipped_steps}")
        _need(self.save_interval >= 0, "run.save_interval", f"must be >= 0 (0 disables), got {self.save_interval}")
        _need(self.keep_last > 0, "run.keep_last", f"must be >= 1, got {self.keep_last}")
        _need(bool(self.resume), "run.resume", "is empty: use auto, none, or a checkpoint path")
        for key in ("stop_signals", "requeue_on"):
            for name in getattr(self, key):
                try:
                    signal_number(name)
                except ValueError:
                    raise ConfigError(f"run.{key}: unknown signal {name!r}; use names like USR1, USR2, TERM, INT")
        _need(set(self.requeue_on) <= set(self.stop_signals), "run.requeue_on",
              f"{list(self.requeue_on)} must be among run.stop_signals {list(self.stop_signals)}")


@dataclass
class ClusterConfig:
    """Where the job runs: local (one machine: one process or torchrun), or slurm (`dsv4-submit` renders an sbatch
    script from these values and submits it; srun starts one task per rank)."""

    kind: str = "local"
    """local | slurm."""
    nodes: int = 1
    """slurm: nodes of the job."""
    gpus_per_node: int = 0
    """slurm: GPUs per node, one rank each (0: a CPU job with tasks_per_node ranks per node)."""
    tasks_per_node: int = 1
    """slurm, CPU jobs (gpus_per_node=0): ranks per node."""
    cpus_per_task: int = 1
    """slurm: CPU cores per rank."""
    time: str = "01:00:00"
    """slurm: time limit of one job ([days-]hours:minutes:seconds)."""
    partition: str = ""
    """slurm: partition (empty: the cluster's default)."""
    account: str = ""
    """slurm: account to charge (empty: your default)."""
    qos: str = ""
    """slurm: quality of service (empty: the default)."""
    job_name: str = "dsv4"
    """slurm: job name; also names the run folder <runs_root>/<job_name>-<job id>."""
    runs_root: str = "runs"
    """slurm: where run folders are made, unless run.output_dir is given explicitly."""
    signal_lead_s: int = 180
    """slurm: --signal=USR1@<this>: warn the job this many seconds before its time limit (SLURM may send it up to
    60 s earlier) so it can checkpoint and requeue itself."""
    extra_sbatch: List[str] = field(default_factory=list)
    """slurm: more #SBATCH lines, e.g. ["--exclusive", "--mem=0", "--constraint=h100"]."""
    setup: List[str] = field(default_factory=list)
    """slurm: shell lines run before srun (module load ..., source venv/bin/activate, export NCCL_...)."""
    master_addr: str = ""
    """slurm: rendezvous host (empty: the job's first node, from scontrol show hostnames)."""
    rendezvous_timeout_s: float = 300.0
    """How long rank 0 waits for every rank to join (without torchrun, whose own --rdzv-conf applies); then the
    job fails naming the ranks that never joined."""
    collective_timeout_s: float = 1800.0
    """Longest wait of any collective: a rank whose peer hangs (a node that stopped responding) fails after it, so
    the job ends instead of hanging, and its next submission resumes from the last checkpoint. Keep it above the
    longest checkpoint save."""

    def validate(self) -> None:
        _need(self.kind in ("local", "slurm"), "cluster.kind", f"{self.kind!r}: choose local or slurm")
        for key in ("nodes", "tasks_per_node", "cpus_per_task"):
            _need(getattr(self, key) >= 1, f"cluster.{key}", f"must be >= 1, got {getattr(self, key)}")
        _need(self.gpus_per_node >= 0, "cluster.gpus_per_node", f"must be >= 0, got {self.gpus_per_node}")
        _need(self.signal_lead_s >= 0, "cluster.signal_lead_s", f"must be >= 0, got {self.signal_lead_s}")
        for key in ("rendezvous_timeout_s", "collective_timeout_s"):
            _need(getattr(self, key) > 0, f"cluster.{key}", f"must be > 0 seconds, got {getattr(self, key)}")
        _need(_TIME.match(self.time) is not None, "cluster.time",
              f"{self.time!r}: use [days-]hours:minutes:seconds, e.g. 04:00:00 or 2-00:00:00")
        _need(bool(self.job_name) and "/" not in self.job_name and " " not in self.job_name, "cluster.job_name",
              f"{self.job_name!r}: a non-empty name without '/' or spaces")
        for line in self.extra_sbatch:
            _need(line.startswith("-"), "cluster.extra_sbatch", f"{line!r}: give sbatch options like --exclusive")

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node or self.tasks_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node
