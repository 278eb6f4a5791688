"""Muon, DeepSeek-V4's optimizer for hidden matrices (spec section 8; report Algorithm 1): single-device layer.

    M_t = mu M_{t-1} + G_t                          momentum (mu = 0.95)
    O'_t = HybridNS(mu M_t + G_t)                   Nesterov look-ahead, orthogonalised by Newton-Schulz
    O_t = O'_t * sqrt(max(n, m)) * gamma            update RMS gamma = 0.18
    W_t = W_{t-1} (1 - eta lambda) - eta O_t        decoupled weight decay lambda = 0.1

Layered pure function -> update -> optimizer, each testable without torch.distributed (the distributed Muon
calls the same functions on gathered matrices):
- `newton_schulz`: orthogonalise a matrix, or a batch [..., m, n] of them, with per-step (a, b, c) coefficients;
  presets `V4_HYBRID` (8 + 2 steps) and `MOONLIGHT` (5 steps).
- `muon_update`: momentum, Nesterov look-ahead, Newton-Schulz, RMS rescaling.
- `orthogonal_blocks`: how one parameter's update is cut into matrices: stacked experts [E, out, in] per expert,
  the grouped `attn.wo_a` [g r, c] per output group, every other matrix whole.
- `assign_param_groups`: which parameters Muon trains and which AdamW trains, by explicit name rules.
- `Muon`: the torch optimizer over the Muon group (fp32 momentum per parameter, decoupled weight decay).

Choices where the spec says NOT FOUND (see also optim/README.md):
- Newton-Schulz input normalisation: each matrix is divided by its Frobenius norm (+ eps) first, as in Keller
  Jordan's Muon and Moonlight. ||X||_2 <= ||X||_F, so every singular value starts in (0, 1], where the quintic
  iteration converges.
- Router gate, indexer projections (wq_b, weights_proj) and compressor projections (wkv, wgate) are matrices not
  on the report's AdamW list, so Muon trains them ("all other matrices use Muon"). The attention sinks and the
  compressors' position biases `ape` are biases, not linear maps: AdamW.
- Block structure: the report does not say how stacked or grouped weights are orthogonalised. Each expert is its
  own linear map and each `wo_a` group its own block of a block-diagonal map, so each is orthogonalised (and
  RMS-scaled by its own shape) separately; orthogonalising the whole tensor would couple unrelated matrices.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Optional, Sequence, Union

import torch

from dsv4.model.config import ModelConfig

Coefficients = Sequence[tuple[float, float, float]]

KELLER_QUINTIC = (3.4445, -4.7750, 2.0315)
"""Keller Jordan's quintic: steep slope at 0 (a = 3.4445), so small singular values grow fast; it oscillates
around 1 instead of converging to it."""
CLEANUP = (2.0, -1.5, 0.5)
"""f(x) = 2x - 1.5x^3 + 0.5x^5: f(1) = 1 and f'(1) = 0, so it pulls singular values near 1 onto 1."""

V4_HYBRID: tuple[tuple[float, float, float], ...] = (KELLER_QUINTIC,) * 8 + (CLEANUP,) * 2
"""V4's hybrid schedule (spec section 8): 8 quintic steps, then 2 clean-up steps."""
MOONLIGHT: tuple[tuple[float, float, float], ...] = (KELLER_QUINTIC,) * 5
"""Moonlight / Keller Jordan's Muon: 5 quintic steps."""
NS_PRESETS: dict[str, tuple[tuple[float, float, float], ...]] = {"v4_hybrid": V4_HYBRID, "moonlight": MOONLIGHT}


# --- Newton-Schulz and the update ----------------------------------------------------------------------------------

def newton_schulz(G: torch.Tensor, steps: Optional[int] = None, coefficients: Coefficients = V4_HYBRID,
                  eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately orthogonalise G [..., m, n] (every matrix of a batch separately): U S V^T -> ~U V^T.

    Iteration k (spec section 8, HybridNS): X <- a_k X + b_k (X X^T) X + c_k (X X^T)^2 X, runs the first `steps`
    entries of `coefficients` (default: all of them). Each matrix is first divided by its Frobenius norm (our choice,
    spec NOT FOUND; see the module docstring). Wide form: a tall matrix is processed transposed so the Gram matrix
    X X^T is the small [min, min] one. Runs in `dtype` (bf16 as in V4), returns G's dtype.
    """
    if G.dim() < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    coefficients = tuple(coefficients)
    steps = len(coefficients) if steps is None else steps
    if not 0 <= steps <= len(coefficients):
        raise ValueError(f"steps={steps}: the schedule has {len(coefficients)} (a, b, c) entries")
    tall = G.size(-2) > G.size(-1)
    X = G.mT if tall else G  # [..., m, n] with m <= n
    Xf = X.float()
    X = (Xf / (torch.linalg.matrix_norm(Xf, keepdim=True) + eps)).to(dtype)  # Frobenius norm per matrix
    for a, b, c in coefficients[:steps]:
        A = X @ X.mT  # [..., m, m]
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return (X.mT if tall else X).to(G.dtype)


def muon_update(grad: torch.Tensor, momentum_buffer: torch.Tensor, mu: float = 0.95, nesterov: bool = True,
                ns: Coefficients = V4_HYBRID, rms_scale: float = 0.18,
                ns_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """One Muon update for grad [..., m, n] (a matrix or a batch of blocks); updates `momentum_buffer` in place.

    buf <- mu buf + grad;  O = NS(grad + mu buf) (Nesterov) or NS(buf);  returns O * sqrt(max(m, n)) * rms_scale
    in fp32. An orthogonal m x n matrix has RMS 1 / sqrt(max(m, n)), so the update's RMS is ~rms_scale
    (V4: 0.18; Moonlight: 0.2, chosen to match AdamW's typical update RMS). With a batch, each block is scaled
    by its own shape. `ns_dtype`: the Newton-Schulz precision (bf16 as V4; fp32 for exact comparisons).
    """
    momentum_buffer.mul_(mu).add_(grad)
    direction = grad.float() + mu * momentum_buffer if nesterov else momentum_buffer.float()
    return orthogonalized(direction, ns, rms_scale, ns_dtype)


def orthogonalized(direction: torch.Tensor, ns: Coefficients = V4_HYBRID, rms_scale: float = 0.18,
                   ns_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The update for a momentum direction [..., m, n]: NS(direction) * sqrt(max(m, n)) * rms_scale, in fp32 (the
    second half of `muon_update`, for callers that apply the momentum themselves)."""
    m, n = direction.shape[-2:]
    return newton_schulz(direction, coefficients=ns, dtype=ns_dtype) * (math.sqrt(max(m, n)) * rms_scale)


# --- block structure -----------------------------------------------------------------------------------------------

_WO_A = re.compile(r"(.*\.)?attn\.wo_a")


def strip_wrappers(name: str) -> str:
    """A parameter name without the `module.` prefixes that DDP (or any wrapper) adds."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def block_kind(param_name: str, ndim: int) -> str:
    """'per_expert' (3-D stacks), 'per_group' (`attn.wo_a`) or 'whole' (any other matrix); see `orthogonal_blocks`."""
    if ndim == 3:
        return "per_expert"
    if ndim != 2:
        raise ValueError(f"{param_name}: Muon orthogonalises 2-D matrices and 3-D expert stacks, got {ndim}-D")
    return "per_group" if _WO_A.fullmatch(strip_wrappers(param_name)) else "whole"


@dataclass(frozen=True)
class BlockLayout:
    """The matrices one parameter's update is orthogonalised as: `split` views the parameter-shaped tensor as a
    batch [B, m, n] of them, `merge` is its inverse. Views, so the momentum buffer is updated in place."""

    kind: str  # 'whole' | 'per_expert' | 'per_group'
    shape: tuple[int, ...]  # the parameter's shape
    blocks: tuple[int, int, int]  # [B, m, n]

    def split(self, t: torch.Tensor) -> torch.Tensor:
        """Parameter-shaped t -> [B, m, n] (a view; t must be contiguous)."""
        if tuple(t.shape) != self.shape:
            raise ValueError(f"expected a tensor of shape {self.shape}, got {tuple(t.shape)}")
        return t.view(self.blocks)

    def merge(self, blocks: torch.Tensor) -> torch.Tensor:
        """[B, m, n] -> the parameter's shape."""
        return blocks.reshape(self.shape)


def orthogonal_blocks(param_name: str, tensor: Union[torch.Tensor, torch.Size, Sequence[int]],
                      o_lora_rank: Optional[int] = None) -> BlockLayout:
    """How the update of `param_name` (a tensor or its shape) is cut into matrices for Newton-Schulz.

    - 3-D [E, out, in] (stacked routed experts `ffn.experts.w1/w2/w3`): each expert separately, [E, out, in].
    - `attn.wo_a` [g r, c] (block-diagonal grouped output projection, group j = rows [j r, (j+1) r)): each group
      separately, [g, r, c]. r = `o_lora_rank` (config `model.o_lora_rank`) must be given: the group count g is
      rows / r, which also holds for a tensor-parallel shard's local groups.
    - any other 2-D matrix: whole, [1, m, n].
    """
    shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tuple(tensor)
    kind = block_kind(param_name, len(shape))
    if kind == "per_expert":
        return BlockLayout(kind, shape, shape)
    rows, cols = shape
    if kind == "per_group":
        if o_lora_rank is None:
            raise ValueError(f"{param_name}: orthogonalising wo_a per output group needs o_lora_rank "
                             f"(model.o_lora_rank)")
        if o_lora_rank <= 0 or rows % o_lora_rank:
            raise ValueError(f"{param_name}: {rows} rows are not whole groups of o_lora_rank={o_lora_rank}")
        return BlockLayout(kind, shape, (rows // o_lora_rank, o_lora_rank, cols))
    return BlockLayout(kind, shape, (1, rows, cols))


# --- parameter groups ----------------------------------------------------------------------------------------------

def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """AdamW tensors without weight decay: vectors (norm gains, mHC biases and scales, sinks) and the compressors'
    position biases."""
    return param.dim() < 2 or name.endswith(".ape")


@dataclass(frozen=True)
class ParamRule:
    """Parameters whose (unwrapped) name fully matches `pattern` go to `optimizer`; `what` says why."""

    pattern: str
    optimizer: str  # 'muon' | 'adamw'
    what: str


_P = r"(.*\.)?"  # any module path in front
_W = r"(\.linear)?\.weight"  # torch Linear (`.weight`) or a parallel layer wrapping one (`.linear.weight`)
PARAM_RULES: tuple[ParamRule, ...] = (
    # AdamW: the report's list (spec section 8), then the biases it does not name.
    ParamRule(_P + r"embed\.weight", "adamw", "token embedding"),
    ParamRule(_P + r"head" + _W, "adamw", "LM head (the MTP blocks share it)"),
    ParamRule(_P + r"[a-z_]*norm\.weight", "adamw", "RMSNorm gains"),
    ParamRule(_P + r"(attn_hc|ffn_hc|hc_head)\.(base|scale)", "adamw", "mHC static biases S and gating factors alpha"),
    ParamRule(_P + r"attn\.attn_sink", "adamw", "attention sink logits (NOT FOUND: a bias, so AdamW)"),
    ParamRule(_P + r"compressor\.ape", "adamw", "compressor position biases (NOT FOUND: a bias, so AdamW)"),
    # Muon: every other matrix.
    ParamRule(_P + r"(attn_hc|ffn_hc|hc_head)\.fn", "muon", "mHC projections W_pre/W_post/W_res"),
    ParamRule(_P + r"attn\.(wq_a|wq_b|wkv|wo_b)" + _W, "muon", "attention projections"),
    ParamRule(_P + r"attn\.wo_a", "muon", "grouped output projection wo_a (per group)"),
    ParamRule(_P + r"compressor\.(wkv|wgate)" + _W, "muon", "compressor projections (NOT FOUND: a matrix)"),
    ParamRule(_P + r"indexer\.(wq_b|weights_proj)" + _W, "muon", "indexer projections (NOT FOUND: a matrix)"),
    ParamRule(_P + r"ffn\.experts\.w[123]", "muon", "routed experts (per expert)"),
    ParamRule(_P + r"ffn\.shared_experts\.w[123]" + _W, "muon", "shared expert"),
    ParamRule(_P + r"ffn\.gate" + _W, "muon", "router gate (NOT FOUND: a matrix)"),
    ParamRule(_P + r"mtp\.\d+\.(e_proj|h_proj)" + _W, "muon", "MTP input projections"),
)


def match_rule(name: str) -> ParamRule:
    """The one rule of PARAM_RULES that matches `name` (prefixes like `module.` stripped); raises otherwise."""
    bare = strip_wrappers(name)
    hits = [r for r in PARAM_RULES if re.fullmatch(r.pattern, bare)]
    if not hits:
        raise ValueError(f"parameter {name!r} matches no Muon/AdamW rule; add one to PARAM_RULES in "
                         f"dsv4/optim/muon.py")
    if len(hits) > 1:
        raise ValueError(f"parameter {name!r} matches several rules: {[r.pattern for r in hits]}")
    return hits[0]


NamedParams = list[tuple[str, torch.nn.Parameter]]


class ParamAssignment(NamedTuple):
    """`(muon, adamw)`: (name, parameter) pairs, names without wrapper prefixes, in the model's order."""

    muon: NamedParams
    adamw: NamedParams

    def summary(self) -> str:
        """One line per rule: optimizer, parameter count, elements, how Muon cuts the updates, what it is."""
        rows: dict[ParamRule, dict] = {}
        for name, p in self.muon + self.adamw:
            rule = match_rule(name)
            row = rows.setdefault(rule, {"count": 0, "numel": 0, "blocks": set()})
            row["count"] += 1
            row["numel"] += p.numel()
            if rule.optimizer == "muon":
                row["blocks"].add(block_kind(name, p.dim()))
        lines = [f"{'optimizer':<9} {'params':>6} {'elements':>12}  {'blocks':<16} what"]
        for rule in PARAM_RULES:
            if rule in rows:
                row = rows[rule]
                blocks = "/".join(sorted(row["blocks"])) or "-"
                lines.append(f"{rule.optimizer:<9} {row['count']:>6} {row['numel']:>12,}  {blocks:<16} {rule.what}")
        for label, group in (("muon", self.muon), ("adamw", self.adamw)):
            lines.append(f"{label:<9} {len(group):>6} {sum(p.numel() for _, p in group):>12,}  total")
        return "\n".join(lines)


def assign_param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], cfg: ModelConfig
                        ) -> ParamAssignment:
    """Split parameters between Muon and AdamW by the explicit rules of PARAM_RULES (spec section 8).

    AdamW: embedding, LM head, RMSNorm gains, mHC static biases and gating factors (the report's list), attention
    sinks and compressor position biases. Muon: every other matrix (attention, compressor and indexer
    projections, routed and shared experts, router gate, mHC projections, MTP projections). Every parameter lands
    in exactly one group; a name no rule (or more than one) matches raises, as does a Muon parameter whose block
    layout does not fit (e.g. wo_a rows not a multiple of cfg.o_lora_rank).
    """
    muon: NamedParams = []
    adamw: NamedParams = []
    seen: dict[int, str] = {}
    for name, p in named_params:
        bare = strip_wrappers(name)
        if id(p) in seen:
            raise ValueError(f"parameter {bare!r} is the same tensor as {seen[id(p)]!r}; pass each parameter once")
        seen[id(p)] = bare
        if match_rule(bare).optimizer == "muon":
            orthogonal_blocks(bare, p, cfg.o_lora_rank)  # fails here, at start-up, if the layout does not fit
            muon.append((bare, p))
        else:
            adamw.append((bare, p))
    return ParamAssignment(muon, adamw)


# --- the optimizer -------------------------------------------------------------------------------------------------

class Muon(torch.optim.Optimizer):
    """Muon over named matrices on one device (spec section 8, Algorithm 1).

    Per parameter: `state[p]["momentum_buffer"]`, an fp32 tensor of p's shape (plain, so a checkpoint can shard
    it). A step: buf <- mu buf + g; U = orthogonal_blocks(name).merge(muon_update(...)) (each expert / wo_a group
    its own matrix); p <- p (1 - lr wd) - lr U. Parameters must come with their names (`model.named_parameters()`
    or `assign_param_groups(...).muon`): the name decides how the update is cut. `o_lora_rank` (model config) is
    needed when a wo_a is among them.
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]] | Iterable[dict], lr: float,
                 weight_decay: float = 0.1, momentum: float = 0.95, nesterov: bool = True, ns: str = "v4_hybrid",
                 rms_scale: float = 0.18, o_lora_rank: Optional[int] = None):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if rms_scale <= 0:
            raise ValueError(f"rms_scale must be > 0, got {rms_scale}")
        if ns not in NS_PRESETS:
            raise ValueError(f"ns={ns!r}: choose one of {sorted(NS_PRESETS)}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns=ns,
                        rms_scale=rms_scale)
        super().__init__(named_params, defaults)
        self.o_lora_rank = o_lora_rank
        for group in self.param_groups:
            if "param_names" not in group:
                raise ValueError("Muon needs (name, parameter) pairs, e.g. assign_param_groups(...).muon: the name "
                                 "decides how each update is orthogonalised")
            if group["ns"] not in NS_PRESETS:
                raise ValueError(f"ns={group['ns']!r}: choose one of {sorted(NS_PRESETS)}")
            for name, p in zip(group["param_names"], group["params"]):
                orthogonal_blocks(name, p, o_lora_rank)  # fails at construction, not at the first step

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for name, p in zip(group["param_names"], group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{name}: Muon does not support sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                layout = orthogonal_blocks(name, p, self.o_lora_rank)
                update = muon_update(layout.split(p.grad.contiguous()), layout.split(state["momentum_buffer"]),
                                     mu=group["momentum"], nesterov=group["nesterov"], ns=NS_PRESETS[group["ns"]],
                                     rms_scale=group["rms_scale"])  # [B, m, n] fp32
                p.mul_(1 - lr * wd)  # decoupled weight decay, from W_{t-1}
                p.add_(layout.merge(update).to(p.dtype), alpha=-lr)
        return loss
