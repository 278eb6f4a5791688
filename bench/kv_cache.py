"""Inference KV cache bytes per token of V4-Flash and V4-Pro against DeepSeek-V3.2's MLA cache (spec section 12).

    python bench/kv_cache.py [--tokens 1048576] [--real-tokens 65536]

Allocates the cache of `dsv4.model.kv_cache` for the flash and pro presets (main layers; the MTP block is shown
separately) and V3.2's MLA + indexer cache, at `--tokens` on the meta device, in both storage formats ("bf16": the
spec's accounting; "reference": FP8/FP4 with their scales). Then allocates each one for real (torch.zeros on the
CPU) at `--real-tokens` (the debug preset at its own 1024 positions) and checks that the meta byte count equals the
bytes of the storages the real allocation holds.
"""

from __future__ import annotations

import argparse
import gc
import sys

from dsv4.conf.schema import compose_config
from dsv4.model.kv_cache import KVCache

SPEC_BF16 = {"flash": 6880, "pro": 9848, "v3.2": 85888}
"""Spec section 12, BF16 accounting, the growing part only (B/token)."""


def preset(name: str):
    return compose_config(name, [] if name == "debug" else ["data.seq_length=4096"], world_size=1).model


def build(name: str, tokens: int, storage: str, device: str, include_mtp: bool = False) -> KVCache:
    if name == "v3.2":
        return KVCache.v32_mla(tokens, storage=storage, device=device)
    return KVCache.v4(preset(name), tokens, storage=storage, device=device, include_mtp=include_mtp)


def real_check(name: str, tokens: int, storage: str) -> tuple:
    """(meta bytes, bytes of the real allocation's storages) of one cache at `tokens`."""
    meta = build(name, tokens, storage, "meta").nbytes()
    real = build(name, tokens, storage, "cpu")
    stored = real.storage_nbytes()
    del real
    gc.collect()
    return meta, stored


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2 ** 20, help="context length of the accounting (default 1M)")
    p.add_argument("--real-tokens", type=int, default=65536, help="context length of the real allocations")
    args = p.parse_args(argv)
    L = args.tokens

    print(f"### Bytes per token at {L:,} tokens (batch 1, main layers)\n")
    print("| model | storage | allocated B/token | growing part B/token | spec (BF16, growing) | fixed per sequence "
          "(window + compressor states) | fixed, amortised B/token | allocated vs V3.2 (same storage) | V3.2 / this | "
          "growing part vs V3.2 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for storage in ("bf16", "reference"):
        base = build("v3.2", L, storage, "meta")
        for name in ("flash", "pro", "v3.2"):
            c = base if name == "v3.2" else build(name, L, storage, "meta")
            fixed = c.fixed_bytes_per_sequence()
            spec = f"{SPEC_BF16[name]:,}" if storage == "bf16" else ""
            ratio = c.bytes_per_token() / base.bytes_per_token()
            growing = c.growing_bytes_per_token() / base.growing_bytes_per_token()
            print(f"| {name} | {storage} | {c.bytes_per_token():,.1f} | {c.growing_bytes_per_token():,.1f} | {spec} | "
                  f"{fixed / 2 ** 20:.2f} MiB | {fixed / L:.1f} | {100 * ratio:.2f}% | {1 / ratio:.2f}x | "
                  f"{100 * growing:.2f}% ({1 / growing:.2f}x) |")

    print(f"\n### Where the bytes go at {L:,} tokens (MiB per sequence)\n")
    print("| model | storage | window | compressor state | compressed entries | indexer keys | indexer state | "
          "latent (MLA) | total GiB | MTP block adds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for storage in ("bf16", "reference"):
        for name in ("flash", "pro", "v3.2"):
            c = build(name, L, storage, "meta")
            parts = c.bytes_by_part()
            cells = [f"{parts[k] / 2 ** 20:,.2f}" if k in parts else "" for k in
                     ("window", "compressor_state", "compressed", "indexer_keys", "indexer_state", "latent")]
            mtp = ""
            if name != "v3.2":
                extra = build(name, L, storage, "meta", include_mtp=True).nbytes() - c.nbytes()
                mtp = f"{extra / 2 ** 10:,.0f} KiB"
            print(f"| {name} | {storage} | {' | '.join(cells)} | {c.nbytes() / 2 ** 30:.3f} | {mtp} |")

    print("\n### Meta vs real allocation (torch.zeros on the CPU)\n")
    print("| model | tokens | storage | meta bytes | real storage bytes | equal |")
    print("| --- | --- | --- | --- | --- | --- |")
    ok = True
    for name in ("debug", "flash", "pro", "v3.2"):
        tokens = min(args.real_tokens, preset("debug").max_position_embeddings) if name == "debug" else args.real_tokens
        for storage in ("bf16", "reference"):
            meta, stored = real_check(name, tokens, storage)
            ok &= meta == stored
            print(f"| {name} | {tokens:,} | {storage} | {meta:,} | {stored:,} | {'yes' if meta == stored else 'NO'} |",
                  flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
