"""`dsv4-smoke`: the main job until the training loop lands: build a model, run forward/backward, print progress.

    dsv4-smoke                        # the debug model, 20 AdamW steps on one fixed batch of real text
    dsv4-smoke --steps 50 model.hidden_size=128

The batch is the UTF-8 bytes of Python's own documentation (present on every machine), so the printed loss falls
as the model memorises it. It prints the parameter count (total and active per token) and every step's losses.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

# megatron-core warns once per module that TransformerEngine/apex are absent; on CPU that is expected.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def text_batch(batch: int, seq: int, vocab: int) -> torch.Tensor:
    """[batch, seq + 1] token ids: consecutive windows of the bytes of CPython's documentation topics."""
    from pydoc_data.topics import topics

    data = torch.tensor(list("\n".join(topics[k] for k in sorted(topics)).encode("utf-8")), dtype=torch.long)
    if vocab < 256:
        raise ValueError(f"model.vocab_size={vocab}: byte-level text needs a vocabulary of at least 256")
    return torch.stack([data[i * seq: i * seq + seq + 1] for i in range(batch)])


def parameter_counts(model) -> tuple[int, int]:
    """(total, active per token): a token uses k of the E routed experts of each MoE layer."""
    cfg = model.cfg
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return total, total - experts + experts * cfg.n_activated_experts // cfg.n_routed_experts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dsv4-smoke", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="debug", help="model preset (default: debug)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.num_layers=4")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    import dsv4
    from dsv4.model.config import ConfigError

    try:
        cfg = dsv4.model_config(args.model, [*args.overrides, f"seq_length={args.seq}"])
        tokens = text_batch(args.batch, args.seq, cfg.vocab_size)
    except (ConfigError, ValueError) as e:
        print(f"dsv4-smoke: {e}", file=sys.stderr)
        return 2
    model = dsv4.build_model(cfg, seed=args.seed).train()
    tokens = tokens.to(next(model.parameters()).device)
    total, active = parameter_counts(model)
    print(f"dsv4-smoke: model={args.model} parameters={total:,} active/token={active:,} "
          f"schedule={cfg.compress_ratios} (0=SWA, {cfg.csa_ratio}=CSA, {cfg.hca_ratio}=HCA; last {cfg.mtp_depth} MTP)")
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr)
    from dsv4.model.moe import update_expert_bias

    for step in range(args.steps):
        t0 = time.perf_counter()
        model.set_step(step)
        out = model(tokens[:, :-1], labels=tokens[:, 1:])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        update_expert_bias(model, cfg.bias_update_rate)
        extra = "".join(f" {k}={v.item():.4f}" for k, v in
                        (("mtp", torch.stack(out.mtp_losses).mean() if out.mtp_losses else None),
                         ("indexer", out.indexer_loss), ("balance", out.balance_loss)) if v is not None)
        print(f"step {step + 1:4d}/{args.steps} loss={out.loss.item():.4f} lm={out.lm_loss.item():.4f}{extra} "
              f"phase={model.phase} {time.perf_counter() - t0:.2f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
