"""A FLOPs model of DeepSeek-V4 training, for throughput and MFU (model FLOPs utilisation).

Counts multiply-adds as 2 FLOPs and training as 3x the forward (backward = 2x forward). Matrix multiplies count
the *active* parameters a token touches (k of the E routed experts). Attention counts what V4 actually computes:
each query scores (QK) and mixes (PV) only its window plus its compressed entries — every visible one in HCA
layers, min(top-k, visible) in CSA layers — and the CSA indexer scores every visible compressed entry. Averaged over
the positions of a `seq_len` sequence. Embedding lookups, norms, softmax and the Sinkhorn iterations are ignored
(small next to the matmuls).
"""

from __future__ import annotations

from dsv4.model.config import ModelConfig


def _mean_visible(seq_len: int, ratio: int, cap: int | None = None) -> float:
    """Mean over t < seq_len of min(floor((t + 1) / ratio), cap): the compressed entries query t sees.

    Closed form of sum_{u=1..s} min(floor(u / r), c): values j < c occur r times each (j = 0: r - 1 times), and
    every u >= c r contributes c.
    """
    s, r = seq_len, ratio
    c = s // r if cap is None else min(cap, s // r)
    return (r * c * (c - 1) // 2 + c * (s - c * r + 1)) / s


def _mean_window(seq_len: int, window: int) -> float:
    """Mean over t < seq_len of min(t + 1, window): the raw tokens query t sees."""
    w = min(window, seq_len)
    return (w * (w + 1) // 2 + (seq_len - w) * w) / seq_len


def _block_forward_flops(cfg: ModelConfig, layer: int, seq_len: int, phase: str) -> float:
    d, h, dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    n = cfg.hc_mult
    kind = cfg.layer_kind(layer)
    # mHC mixing projections of both sublayers: (2 + n) n outputs from n d inputs.
    f = 2 * 2 * (2 + n) * n * n * d
    # Attention projections: wq_a, wq_b, wkv, grouped wo_a (h dh -> g r in g blocks), wo_b.
    f += 2 * (d * cfg.q_lora_rank + cfg.q_lora_rank * h * dh + d * dh + h * dh * cfg.o_lora_rank
              + cfg.o_groups * cfg.o_lora_rank * d)
    keys = _mean_window(seq_len, cfg.sliding_window)
    if kind != "swa":
        ratio = cfg.layer_ratio(layer)
        coff = 2 if kind == "csa" else 1
        f += 2 * 2 * d * coff * dh  # compressor wkv, wgate
        sparse = kind == "csa" and phase == "sparse"
        keys += _mean_visible(seq_len, ratio, cfg.index_topk if sparse else None)
        if kind == "csa" and phase != "dense":
            ih, idh = cfg.index_n_heads, cfg.index_head_dim
            f += 2 * (cfg.q_lora_rank * ih * idh + d * ih + 2 * d * 2 * idh)  # indexer wq_b, weights, compressor
            f += 2 * ih * idh * _mean_visible(seq_len, ratio)  # indexer scores
    f += 2 * 2 * h * dh * keys  # QK and PV
    # MoE: router, k routed experts and the shared experts (SwiGLU: 3 matrices each).
    f += 2 * d * cfg.n_routed_experts
    f += 2 * 3 * d * cfg.moe_intermediate_size * (cfg.n_activated_experts + cfg.n_shared_experts)
    return f


def training_flops_per_token(cfg: ModelConfig, seq_len: int, phase: str = "sparse") -> float:
    """FLOPs per trained token (forward + backward), MTP blocks and output heads included."""
    f = sum(_block_forward_flops(cfg, i, seq_len, phase) for i in range(cfg.num_layers + cfg.mtp_depth))
    f += 2 * cfg.hc_mult * cfg.hc_mult * cfg.hidden_size * (1 + cfg.mtp_depth)  # hc_head(s)
    f += 2 * cfg.hidden_size * cfg.vocab_size * (1 + cfg.mtp_depth)  # output head, shared by the MTP depths
    f += 2 * 2 * cfg.hidden_size * cfg.hidden_size * cfg.mtp_depth  # MTP e_proj, h_proj
    return 3 * f


# Dense bf16 peak per device, for the MFU estimate (vendor data sheets, without sparsity).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "B200": 2250e12}


def device_peak_flops() -> float | None:
    """The bf16 dense peak of this rank's GPU when known, else None (CPU: no MFU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
