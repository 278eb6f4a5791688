"""FP8 GEMMs for the model's linear layers (`precision.fp8`): recipes, backends, and the start-up choice.

Every FP8 linear computes its three GEMMs (spec section 11; DeepSeek-V3 section 3.3) on FP8 operands:
    fprop  y  = x  W^T      x [T, K] and W [N, K], contracted over K
    dgrad  dx = dy W        dy [T, N] and W^T [K, N], contracted over N
    wgrad  dW = dy^T x      dy^T [N, T] and x^T [K, T], contracted over the tokens T
Each operand is quantized along its contraction dimension; the recipe says in which tiles and formats:
- `blockwise` (DeepSeek-V3): activations and output gradients in 1 x 128 tiles (so x and dy are re-tiled 128 x 1
  for wgrad), weights in 128 x 128 blocks (the same blocks serve W and W^T), E4M3 everywhere, one fp32 scale per
  tile (amax / 448);
- `tensorwise` (current scaling): one scale per tensor from its current amax; E4M3 forward, E5M2 gradients;
- `mxfp8` (Blackwell): 1 x 32 tiles along the contraction for every operand, power-of-two (E8M0) scales, E4M3;
- `delayed`: per-tensor scales from an amax history (TransformerEngine only).
Accumulation and outputs stay in high precision; so do the router, norms, embedding, head, mHC, the attention
softmax and everything outside the chosen `precision.fp8_modules`.

Backends (`precision.fp8_backend`):
- `te`: TransformerEngine's layers through megatron-core, under `te.fp8_autocast` (see `parallel/layers.py`);
- `torch`: `torch.nn.functional.scaled_mm` (cuBLASLt): blockwise on Hopper (sm90) and newer, tensorwise on sm89+;
- `emulate`: quantize-dequantize, then an fp32 matmul: the FP8 GEMM's input rounding on any device, exact up to the
  accumulation order; for CPU tests and numerics studies, slow, and only when asked for by name;
- `auto`: te when TransformerEngine imports and a GPU is present, else torch on a Hopper-or-newer GPU; anywhere else
  `precision.fp8` fails at start-up saying what is missing.
The TransformerEngine path cannot be installed or run on this project's development and CI machines: it follows
megatron-core's documented TE usage and is untested here. The torch path's blockwise GEMM needs a Hopper GPU and is
untested here as well; its tensorwise GEMM also runs on CPU and is tested there against `emulate`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from dsv4.model.config import ConfigError

__all__ = ["Fp8Plan", "resolve_fp8", "fp8_linear", "fp8_autocast", "quantize_tiles", "dequantize_tiles", "RECIPES", "BACKENDS",
           "MODULES"]

RECIPES = ("blockwise", "tensorwise", "mxfp8", "delayed")
BACKENDS = ("auto", "te", "torch", "emulate")
MODULES = ("attention", "indexer", "experts")
"""attention: q/K=V/output projections; indexer: the compressors' and the lightning indexer's projections;
experts: routed and shared experts."""

_FMT = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}


@dataclass(frozen=True)
class Fp8Plan:
    """What the model's FP8 linears do, fixed at start-up."""

    recipe: str
    backend: str
    """te | torch | emulate (auto resolved)."""
    modules: tuple
    block: int = 128
    """Tile size of the blockwise recipe (128 in DeepSeek-V3; smaller only to emulate tiny test models)."""

    def covers(self, module: Optional[str]) -> bool:
        return module is not None and module in self.modules

    def tiles(self, operand: str) -> tuple[str, Optional[tuple[int, int]], str]:
        """(format, tile [rows, cols] over the operand laid out [outer, contraction] or None for one per tensor,
        scale kind) of operand 'act' (x, x^T), 'weight' (W, W^T) or 'grad' (dy, dy^T)."""
        if self.recipe == "blockwise":
            return "e4m3", ((self.block, self.block) if operand == "weight" else (1, self.block)), "fp32"
        if self.recipe == "mxfp8":
            return "e4m3", (1, 32), "e8m0"
        return ("e5m2" if operand == "grad" else "e4m3"), None, "fp32"  # tensorwise


def resolve_fp8(recipe: str, backend: str, modules, block: int = 128, *,
                cuda_available: Optional[bool] = None, capability: Optional[tuple] = None,
                te_available: Optional[bool] = None) -> Optional[Fp8Plan]:
    """The FP8 plan for `precision.fp8` (None when it is "none"), or a ConfigError saying what is missing.

    The device facts default to this machine's; tests pass them in."""
    if recipe == "none":
        return None
    if recipe not in RECIPES:
        raise ConfigError(f"precision.fp8: {recipe!r}: choose none, {', '.join(RECIPES)}")
    if backend not in BACKENDS:
        raise ConfigError(f"precision.fp8_backend: {backend!r}: choose {', '.join(BACKENDS)}")
    bad = [m for m in modules if m not in MODULES]
    if bad or not modules:
        raise ConfigError(f"precision.fp8_modules: {list(modules)}: give one or more of {', '.join(MODULES)}")
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    cap = (torch.cuda.get_device_capability() if cuda else None) if capability is None else capability
    te = _te_importable() if te_available is None else te_available
    where = f"a GPU of compute capability {cap[0]}.{cap[1]}" if cuda and cap else "this machine (no GPU)"
    how_te = ("install TransformerEngine on a CUDA machine (pip install --no-build-isolation "
              "'transformer_engine[pytorch]', or use NVIDIA's PyTorch container)")

    if backend == "auto":
        if te and cuda:
            backend = "te"
        elif cuda and cap >= (9, 0) and recipe in ("blockwise", "tensorwise"):
            backend = "torch"
        else:
            raise ConfigError(
                f"precision.fp8={recipe}: no FP8 GEMMs on {where}: TransformerEngine is "
                f"{'installed' if te else 'not installed'}, and PyTorch's scaled_mm needs a Hopper (sm90) or newer "
                f"GPU{' and the blockwise or tensorwise recipe' if cuda else ''}. To fix: {how_te}; or run on a Hopper "
                "GPU; or train in bf16 (precision=bf16). precision.fp8_backend=emulate simulates the FP8 rounding "
                "on any device (slow; for tests and numerics studies).")
    if backend == "te":
        if not (te and cuda):
            raise ConfigError(f"precision.fp8_backend=te: TransformerEngine is {'installed' if te else 'not installed'}"
                              f" and it needs a CUDA GPU ({where}): {how_te}, or pick precision.fp8_backend=torch on "
                              "a Hopper GPU.")
    elif backend == "torch":
        if recipe not in ("blockwise", "tensorwise"):
            raise ConfigError(f"precision.fp8={recipe}: the torch backend runs the blockwise and tensorwise recipes; "
                              f"{recipe} needs TransformerEngine (precision.fp8_backend=te).")
        need = (9, 0) if recipe == "blockwise" else (8, 9)
        if not cuda or cap < need:
            raise ConfigError(f"precision.fp8={recipe} with precision.fp8_backend=torch needs a GPU of compute "
                              f"capability {need[0]}.{need[1]} or newer; found {where}. Use precision=bf16 here, or "
                              "precision.fp8_backend=emulate to simulate the rounding.")
    elif recipe == "delayed":  # emulate
        raise ConfigError("precision.fp8=delayed keeps amax histories inside TransformerEngine; "
                          "precision.fp8_backend=emulate covers blockwise, tensorwise and mxfp8.")
    if recipe == "blockwise" and block < 1:
        raise ConfigError(f"precision.fp8_block: must be >= 1, got {block}")
    if backend != "emulate" and recipe == "blockwise" and block != 128:
        raise ConfigError(f"precision.fp8_block={block}: the {backend} backend's blockwise GEMMs use 128; other "
                          "sizes exist only for precision.fp8_backend=emulate.")
    return Fp8Plan(recipe, backend, tuple(modules), block)


def fp8_autocast(plan: Optional[Fp8Plan], amax_group=None):
    """TransformerEngine's FP8 autocast with the plan's recipe (te backend; a no-op otherwise): TE's layers run their
    GEMMs in FP8 inside it. `amax_group`: the ranks that share amax statistics (delayed scaling)."""
    if plan is None or plan.backend != "te":
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe as te_recipe

    fmt = te_recipe.Format
    recipe = {"delayed": lambda: te_recipe.DelayedScaling(fp8_format=fmt.HYBRID),
              "tensorwise": lambda: te_recipe.Float8CurrentScaling(fp8_format=fmt.HYBRID),
              "blockwise": lambda: te_recipe.Float8BlockScaling(fp8_format=fmt.E4M3),
              "mxfp8": lambda: te_recipe.MXFP8BlockScaling(fp8_format=fmt.E4M3)}[plan.recipe]()
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=amax_group)


def _te_importable() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or TE's own error when CUDA/cuDNN libraries are missing
        return False
    return True


# --- quantization in tiles ---------------------------------------------------------------------------------------

def quantize_tiles(t: torch.Tensor, tile: Optional[tuple[int, int]], fmt: str, scale_kind: str):
    """t [M, K] -> (q [M, K] in FP8, decoding scales [ceil(M/r), ceil(K/c)] fp32) with t ~ q * scale per tile.

    `tile` None: one scale for the whole tensor. Partial tiles at the edges get their own scale (zeros pad them)."""
    dtype, fmax = _FMT[fmt]
    m, k = t.shape
    r, c = tile or (m, k)
    tiles = _pad(t.float(), r, c).unflatten(0, (-1, r)).unflatten(2, (-1, c))  # [M/r, r, K/c, c]
    amax = tiles.abs().amax(dim=(1, 3), keepdim=True)
    scale = amax.clamp_min(1e-12) / fmax
    if scale_kind == "e8m0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (tiles / scale).clamp(-fmax, fmax).to(dtype)
    return q.flatten(2, 3).flatten(0, 1)[:m, :k], scale[:, 0, :, 0]


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, tile: Optional[tuple[int, int]]) -> torch.Tensor:
    """The inverse of `quantize_tiles`: q [M, K] FP8 and its per-tile scales -> fp32 [M, K]."""
    m, k = q.shape
    r, c = tile or (m, k)
    full = scale.repeat_interleave(r, 0).repeat_interleave(c, 1)[:m, :k]
    return q.float() * full


def _pad(t: torch.Tensor, r: int, c: int) -> torch.Tensor:
    m, k = t.shape
    pm, pk = -m % r, -k % c
    return F.pad(t, (0, pk, 0, pm)) if pm or pk else t


# --- the GEMM on quantized operands ------------------------------------------------------------------------------

def _gemm(plan: Fp8Plan, a: torch.Tensor, a_kind: str, b: torch.Tensor, b_kind: str) -> torch.Tensor:
    """a [M, K] @ b [N, K]^T in FP8 as the plan says; fp32 result."""
    fa, ta, sa_kind = plan.tiles(a_kind)
    fb, tb, sb_kind = plan.tiles(b_kind)
    qa, sa = quantize_tiles(a, ta, fa, sa_kind)
    qb, sb = quantize_tiles(b, tb, fb, sb_kind)
    if plan.backend == "emulate":
        return dequantize_tiles(qa, sa, ta) @ dequantize_tiles(qb, sb, tb).t()
    return _scaled_mm(plan, qa, sa, ta, qb, sb, tb)


def _scaled_mm(plan: Fp8Plan, qa, sa, ta, qb, sb, tb) -> torch.Tensor:
    """cuBLASLt's scaled GEMM through torch (the torch backend). b is passed column-major (b^T of a row-major b)."""
    if plan.recipe == "tensorwise":
        return F.scaled_mm(qa, qb.t(), sa.reshape(()), F.ScalingType.TensorWise, sb.reshape(()),
                           F.ScalingType.TensorWise, output_dtype=torch.float32)
    # blockwise: 1 x 128 scales are passed outer-dimension-major ([M, K/128] with stride (1, M)), as cuBLASLt
    # expects; 128 x 128 scales as they are.
    def recipe(tile):
        return F.ScalingType.BlockWise128x128 if tile[0] > 1 else F.ScalingType.BlockWise1x128

    def layout(scale, tile):
        return scale.t().contiguous().t() if tile[0] == 1 else scale

    return F.scaled_mm(qa, qb.t(), layout(sa, ta), recipe(ta), layout(sb, tb), recipe(tb),
                       output_dtype=torch.float32)


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T with the three GEMMs in FP8 (module docstring); x and W are kept in high precision for backward
    and quantized again there, in the tiling each GEMM needs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, plan: Fp8Plan) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight)
        ctx.plan, ctx.x_shape = plan, x.shape
        y = _gemm(plan, x2, "act", weight, "weight")
        return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight = ctx.saved_tensors
        plan = ctx.plan
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _gemm(plan, dy2, "grad", weight.t(), "weight").to(x2.dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = _gemm(plan, dy2.t(), "grad", x2.t(), "act").to(weight.dtype)
        return dx, dw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, plan: Fp8Plan) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T -> [..., N] with FP8 GEMMs (forward and backward) as `plan` says."""
    return _Fp8Linear.apply(x, weight, plan)
