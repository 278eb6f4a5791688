"""The DeepSeek-V4 model configuration: one typed dataclass, every field documented.

Field values of the released models are in `conf/model/{flash,pro}.yaml` (spec section 1); the defaults here are
V4-Flash's. Where DeepSeek's text gives no value (spec: NOT FOUND) the field says so and the default is our choice.
`validate()` rejects impossible combinations with a message naming the key and the fix; the Hydra schema in
`dsv4.conf` calls it at start-up, before any process group or data is touched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List

ATTENTION_PHASES = ("dense", "indexer_warmup", "sparse")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the fix."""


def require(cond: bool, key: str, msg: str) -> None:
    """Raise ConfigError("<key>: <msg>") unless `cond`: the one shape of every config check."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _flash_schedule() -> List[int]:
    # V4-Flash (spec section 1): 2 SWA-only, then CSA/HCA alternating, a last CSA, and the SWA-only MTP layer.
    return [0, 0] + [4, 128] * 20 + [4] + [0]


@dataclass
class ModelConfig:
    """Architecture of a DeepSeek-V4 model (defaults: V4-Flash)."""

    # --- sizes ---------------------------------------------------------------------------------------------------
    vocab_size: int = 129280
    """Vocabulary size (V3 tokenizer: 129280)."""
    hidden_size: int = 4096
    """Model width d."""
    num_layers: int = 43
    """Number of transformer blocks (MTP blocks not counted)."""
    max_position_embeddings: int = 1048576
    """Longest sequence the positional encodings are laid out for."""

    # --- attention (spec section 4) ------------------------------------------------------------------------------
    num_heads: int = 64
    """Query heads; all share one K=V head (MQA)."""
    head_dim: int = 512
    """Per-head dimension of q and of the shared K=V head."""
    rope_head_dim: int = 64
    """RoPE is applied to the *last* rope_head_dim dims of each head."""
    q_lora_rank: int = 1024
    """Rank of the low-rank query path (wq_a -> q_norm -> wq_b)."""
    o_groups: int = 8
    """Head groups g of the grouped low-rank output projection."""
    o_lora_rank: int = 1024
    """Per-group intermediate width of the grouped output projection."""
    sliding_window: int = 128
    """n_win: query t sees raw tokens t-n_win+1 .. t (itself included)."""
    compress_ratios: List[int] = field(default_factory=_flash_schedule)
    """Per-layer schedule, one entry per block then one per MTP block: 0 = sliding window only,
    csa_ratio = CSA, hca_ratio = HCA (as `compress_ratios` in the released configs)."""
    csa_ratio: int = 4
    """m: tokens per compressed entry in CSA layers (overlapped compressor, 2m-token pooling)."""
    hca_ratio: int = 128
    """m': tokens per compressed entry in HCA layers."""
    index_n_heads: int = 64
    """Lightning-indexer query heads."""
    index_head_dim: int = 128
    """Lightning-indexer head dimension (a power of two with quant_sim on: its Hadamard rotation needs one)."""
    index_topk: int = 512
    """Compressed entries each query keeps in CSA layers (sparse phase)."""

    # --- positions ---------------------------------------------------------------------------------------------
    rope_theta: float = 10000.0
    """RoPE base of sliding-window-only layers (no YaRN)."""
    compress_rope_theta: float = 160000.0
    """RoPE base of CSA/HCA layers, their compressors and indexers (with YaRN)."""
    yarn_factor: float = 16.0
    """YaRN scaling factor on compressed layers; 1 disables YaRN."""
    yarn_original_max_position: int = 65536
    """YaRN original context length."""
    yarn_beta_fast: float = 32.0
    """YaRN beta_fast (extrapolation boundary, in rotations)."""
    yarn_beta_slow: float = 1.0
    """YaRN beta_slow (interpolation boundary, in rotations)."""

    # --- MoE (spec section 5) ----------------------------------------------------------------------------------
    n_routed_experts: int = 256
    """Routed experts per MoE layer."""
    n_activated_experts: int = 6
    """Routed experts each token is sent to (top-k)."""
    n_shared_experts: int = 1
    """Shared experts (always active, same width as a routed expert)."""
    moe_intermediate_size: int = 2048
    """Hidden width of each routed and shared expert."""
    routed_scaling_factor: float = 1.5
    """Routed gate weights are normalised to 1, then multiplied by this."""
    num_hash_layers: int = 3
    """The first this-many blocks route by a frozen token-id -> experts table (tid2eid) instead of scores."""
    hash_seed: int = 0
    """Seed of the tid2eid table (DeepSeek's hash function: NOT FOUND; ours is a seeded balanced assignment)."""
    swiglu_limit: float = 10.0
    """SwiGLU clamp: gate <= limit, -limit <= up <= limit; 0 disables."""
    bias_update_rate: float = 0.001
    """gamma of aux-loss-free balancing: b_i -= gamma if expert i is overloaded, += gamma if underloaded
    (V3's value; V4's: NOT FOUND)."""
    seq_aux_loss_coef: float = 0.0001
    """alpha of the small sequence-wise balance loss (V3's value; V4's: NOT FOUND)."""

    # --- mHC (spec section 3) ----------------------------------------------------------------------------------
    hc_mult: int = 4
    """n: number of residual streams."""
    hc_sinkhorn_iters: int = 20
    """Sinkhorn-Knopp iterations t_max for the residual mixing matrix."""
    hc_eps: float = 1e-6
    """Floor added in the mHC weights and the Sinkhorn normalisation."""

    # --- MTP (spec section 6) ----------------------------------------------------------------------------------
    mtp_depth: int = 1
    """Multi-token-prediction blocks (0 disables); block k predicts token t+k+1."""
    mtp_loss_weight: float = 0.3
    """Weight of the (mean) MTP loss; V4 lowers it to 0.1 when LR decay starts (done by the training loop)."""

    # --- indexer training and the attention phases (spec sections 7, 10) -------------------------------------------
    indexer_loss_coef: float = 1.0
    """Weight of the indexer's KL loss to the main attention (V4's value: NOT FOUND)."""
    dense_attention_steps: int = 0
    """Steps of the dense phase: CSA attends to every visible compressed entry, no top-k."""
    indexer_warmup_steps: int = 0
    """Steps of the indexer warm-up after the dense phase: dense attention, only the indexer learns (KL loss)."""

    # --- numerics ----------------------------------------------------------------------------------------------
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    quant_sim: bool = True
    """Quantize-dequantize simulation of the reference: FP8 (e4m3, 1x64 ue8m0 blocks) on the non-RoPE dims of
    K=V (window rows and compressed entries), FP4 (e2m1, 1x32 blocks) on indexer q/k after a Hadamard rotation.
    Off matches Hugging Face transformers exactly."""
    quant_fp8_block: int = 64
    """Elements per ue8m0 scale in the FP8 simulation (reference: 64); must divide head_dim - rope_head_dim."""
    quant_fp4_block: int = 32
    """Elements per ue8m0 scale in the FP4 simulation (reference: 32, MXFP4); must divide index_head_dim."""
    quant_sim_experts: bool = False
    """FP4 quantization-aware training of the routed experts (V4, spec section 7): each expert weight is rounded to
    e2m1 with one ue8m0 scale per 1 x quant_fp4_block elements along its input dimension in the forward pass, and
    the gradient passes straight through to the high-precision master weight. Off by default; an exported model
    computed this way needs its weights exported FP4-rounded to match (dsv4-export does not round them)."""
    init_std: float = 0.02
    """Std of the normal initialisation of weight matrices."""

    # ----------------------------------------------------------------------------------------------------------
    def layer_ratio(self, layer: int) -> int:
        """Compression ratio of block `layer` (indices >= num_layers are MTP blocks)."""
        return self.compress_ratios[layer]

    def layer_kind(self, layer: int) -> str:
        """'swa', 'csa' or 'hca' for block `layer`."""
        r = self.compress_ratios[layer]
        return "swa" if r == 0 else ("csa" if r == self.csa_ratio else "hca")

    def attention_phase(self, step: int) -> str:
        """The attention phase at optimizer step `step`: dense -> indexer_warmup -> sparse."""
        if step < self.dense_attention_steps:
            return "dense"
        if step < self.dense_attention_steps + self.indexer_warmup_steps:
            return "indexer_warmup"
        return "sparse"

    def replace(self, **overrides) -> "ModelConfig":
        """A validated copy with some fields changed."""
        cfg = dataclasses.replace(self, **overrides)
        cfg.validate()
        return cfg

    def validate(self, seq_length: int | None = None) -> "ModelConfig":
        """Reject impossible combinations; `seq_length` enables the checks that depend on it."""

        def need(cond: bool, key: str, msg: str) -> None:
            require(cond, f"model.{key}", msg)

        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "q_lora_rank", "o_groups",
                    "o_lora_rank", "sliding_window", "csa_ratio", "hca_ratio", "index_n_heads", "index_head_dim",
                    "index_topk", "n_routed_experts", "n_activated_experts", "moe_intermediate_size", "hc_mult",
                    "hc_sinkhorn_iters", "max_position_embeddings", "yarn_original_max_position",
                    # Scales and floors: zero or negative would divide by zero, flip signs or take a log of <= 0.
                    "rope_theta", "compress_rope_theta", "routed_scaling_factor", "hc_eps", "rms_norm_eps",
                    "init_std"):
            need(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")  # also refuses NaN
        for key in ("num_hash_layers", "mtp_depth", "n_shared_experts", "dense_attention_steps",
                    "indexer_warmup_steps", "hash_seed", "bias_update_rate", "seq_aux_loss_coef",
                    "indexer_loss_coef"):
            need(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        need(self.yarn_beta_slow > 0, "yarn_beta_slow", f"must be > 0 rotations, got {self.yarn_beta_slow}")
        need(self.yarn_beta_fast > self.yarn_beta_slow, "yarn_beta_fast",
             f"{self.yarn_beta_fast} must exceed yarn_beta_slow={self.yarn_beta_slow} (YaRN ramps between the "
             f"dims of beta_fast and of beta_slow rotations); raise it or lower yarn_beta_slow")
        need(self.rope_head_dim % 2 == 0 and 0 < self.rope_head_dim <= self.head_dim, "rope_head_dim",
             f"must be even and in (0, head_dim={self.head_dim}], got {self.rope_head_dim}")
        need(self.num_heads % self.o_groups == 0, "o_groups",
             f"num_heads={self.num_heads} must be divisible by o_groups={self.o_groups}; pick a divisor")
        need(self.csa_ratio != self.hca_ratio, "hca_ratio",
             f"must differ from csa_ratio={self.csa_ratio}, else the schedule cannot tell CSA from HCA layers")
        need(self.index_head_dim >= self.rope_head_dim, "index_head_dim",
             f"must be >= rope_head_dim={self.rope_head_dim} (the indexer ropes its last rope_head_dim dims)")
        need(self.n_activated_experts <= self.n_routed_experts, "n_activated_experts",
             f"top-k={self.n_activated_experts} exceeds n_routed_experts={self.n_routed_experts}")
        n_sched = self.num_layers + self.mtp_depth
        need(len(self.compress_ratios) == n_sched, "compress_ratios",
             f"has {len(self.compress_ratios)} entries; it needs num_layers + mtp_depth = {n_sched} "
             f"(one per block, then one per MTP block)")
        allowed = {0, self.csa_ratio, self.hca_ratio}
        bad = sorted({r for r in self.compress_ratios if r not in allowed})
        need(not bad, "compress_ratios",
             f"entries {bad} are not 0 (SWA), csa_ratio={self.csa_ratio} or hca_ratio={self.hca_ratio}")
        need(self.num_hash_layers <= self.num_layers, "num_hash_layers",
             f"{self.num_hash_layers} hash-routed layers but only num_layers={self.num_layers} blocks")
        if self.quant_sim:
            # The indexer's Hadamard rotation (before its FP4 simulation) only runs here; it needs a power of two.
            need(self.index_head_dim & (self.index_head_dim - 1) == 0, "index_head_dim",
                 f"must be a power of two for the Hadamard rotation of the FP4 simulation, got "
                 f"{self.index_head_dim}; pick a power of two or set model.quant_sim=false")
            nope = self.head_dim - self.rope_head_dim
            need(self.quant_fp8_block > 0 and nope % self.quant_fp8_block == 0, "quant_fp8_block",
                 f"{self.quant_fp8_block} must divide the {nope} non-RoPE dims of a head (head_dim - rope_head_dim); "
                 f"pick a divisor or set model.quant_sim=false")
            need(self.quant_fp4_block > 0 and self.index_head_dim % self.quant_fp4_block == 0, "quant_fp4_block",
                 f"{self.quant_fp4_block} must divide index_head_dim={self.index_head_dim}; pick a divisor or set "
                 f"model.quant_sim=false")
        if self.quant_sim_experts:
            for key in ("hidden_size", "moe_intermediate_size"):
                need(self.quant_fp4_block > 0 and getattr(self, key) % self.quant_fp4_block == 0, "quant_fp4_block",
                     f"{self.quant_fp4_block} must divide {key}={getattr(self, key)} (the experts' input dims) for "
                     f"model.quant_sim_experts; pick a divisor or set model.quant_sim_experts=false")
        need(self.yarn_factor >= 1.0, "yarn_factor", f"must be >= 1 (1 disables YaRN), got {self.yarn_factor}")
        need(0.0 <= self.mtp_loss_weight, "mtp_loss_weight", "must be >= 0")
        need(self.swiglu_limit >= 0.0, "swiglu_limit", "must be >= 0 (0 disables the clamp)")
        if seq_length is not None:
            need(seq_length <= self.max_position_embeddings, "max_position_embeddings",
                 f"sequence length {seq_length} exceeds it; raise it or shorten the sequence")
            need(self.sliding_window <= seq_length, "sliding_window",
                 f"window {self.sliding_window} is longer than the sequence ({seq_length}); use <= {seq_length}")
            if self.csa_ratio in self.compress_ratios:
                n_entries = seq_length // self.csa_ratio
                need(self.index_topk <= n_entries, "index_topk",
                     f"top-k={self.index_topk} exceeds the {n_entries} compressed entries a {seq_length}-token "
                     f"sequence has at csa_ratio={self.csa_ratio}; use <= {n_entries}")
            if self.hca_ratio in self.compress_ratios:
                need(self.hca_ratio <= seq_length, "hca_ratio",
                     f"m'={self.hca_ratio} is longer than the sequence ({seq_length}): HCA layers would never see "
                     f"a compressed entry; lower it or lengthen the sequence")
        return self
