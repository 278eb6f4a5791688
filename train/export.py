"""`dsv4-export`: write a Hugging Face `deepseek_v4` directory from a model's weights.

    dsv4-export --out hf/ --model debug --seed 0                 # a freshly initialised debug model
    dsv4-export --out hf/ --weights model.pt --model flash        # a state dict saved with torch.save
    dsv4-export --out hf/ --hf other_hf_dir/ --dtype bfloat16      # re-export (e.g. change the dtype)
    dsv4-export --out hf/ --checkpoint runs/x/checkpoints/step_00001000   # a sharded training checkpoint
    dsv4-export --out hf/ --checkpoint runs/x                       # the latest complete checkpoint of a run
    dsv4-export --out hf/ --model debug model.num_layers=4 'model.compress_ratios=[0,4,16,4,0]'

Trailing arguments are Hydra overrides of the model config. The directory loads in
`transformers.DeepseekV4ForCausalLM.from_pretrained`. A sharded training checkpoint (saved under any parallel
layout) brings its own model config; it is read in this one process.

The tokenizer goes beside the weights when the source has one: the run folder's `tokenizer.json` (every
`dsv4-train` run keeps a copy of the tokenizer it trained with) for --checkpoint, the directory's own for --hf.
--hf of a directory written by transformers' save_pretrained (its config counts an MTP block, it has no MTP
weights): `--mtp init` (default) initialises the MTP block, `--mtp drop` exports without MTP.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import warnings

import torch

# megatron-core warns once per module that TransformerEngine/apex are absent; on CPU that is expected.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="dsv4-export", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (created; must be empty if it exists)")
    p.add_argument("--model", default="debug", help="model preset: debug, flash or pro (default: debug)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", help="a torch.save'd state dict of a dsv4 model of this config")
    src.add_argument("--hf", help="a Hugging Face deepseek_v4 directory to re-export (its config.json is used)")
    src.add_argument("--checkpoint", help="a dsv4 sharded checkpoint folder (.../checkpoints/step_N), or a run "
                                          "folder (its latest complete checkpoint); its model config is used")
    p.add_argument("--seed", type=int, default=0, help="init seed when no weights are given (default: 0)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors before writing")
    p.add_argument("--mtp", choices=["init", "drop"], default="init",
                   help="--hf: MTP blocks its config counts and its weights lack (transformers writes none): "
                        "initialise them (init, default) or export without MTP (drop)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the model config, e.g. model.num_layers=4")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import dsv4
    from dsv4.model.config import ConfigError

    if os.path.exists(args.out) and os.listdir(args.out):
        print(f"dsv4-export: --out {args.out} exists and is not empty; choose a new directory", file=sys.stderr)
        return 2
    tokenizer = None  # the source's tokenizer.json, if it has one
    try:
        if args.hf:
            model = dsv4.load_hf(args.hf, mtp=args.mtp)
            tokenizer = os.path.join(args.hf, "tokenizer.json")
        elif args.checkpoint:
            model, tokenizer = _from_checkpoint(args.checkpoint, args.overrides)
        else:
            model = dsv4.build_model(args.model, args.overrides, seed=args.seed)
            if args.weights:
                if not os.path.isfile(args.weights):
                    raise FileNotFoundError(f"--weights {args.weights}: no such file")
                state = torch.load(args.weights, map_location="cpu", weights_only=True)
                result = model.load_state_dict(state, strict=False)
                missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
                if missing or result.unexpected_keys:
                    raise KeyError(f"--weights {args.weights} does not match --model {args.model} with overrides "
                                   f"{args.overrides}: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
        dsv4.export_hf(model, args.out, dtype=DTYPES.get(args.dtype))
        has_tokenizer = tokenizer is not None and os.path.isfile(tokenizer)
        if has_tokenizer:
            shutil.copyfile(tokenizer, os.path.join(args.out, "tokenizer.json"))
    except (ConfigError, OSError, KeyError, ValueError, RuntimeError) as e:  # CheckpointError: ValueError
        print(f"dsv4-export: {e}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in model.parameters())
    print(f"dsv4-export: wrote {args.out} ({n:,} parameters, {model.cfg.num_layers} blocks, "
          f"MTP depth {model.cfg.mtp_depth}{', tokenizer.json' if has_tokenizer else ''})")
    if args.checkpoint and not has_tokenizer:
        print(f"dsv4-export: note: no tokenizer written: {tokenizer} does not exist (older dsv4 runs kept none); "
              f"copy the run's tokenizer (data.tokenizer, or <first data prefix>.tokenizer.json) to "
              f"{os.path.join(args.out, 'tokenizer.json')}", file=sys.stderr)
    if model.cfg.quant_sim:
        print("dsv4-export: note: this model simulates FP8/FP4 (model.quant_sim=true); transformers computes "
              "without the simulation, so its logits differ slightly from dsv4's")
    return 0


def _from_checkpoint(path: str, overrides):
    """The model of a sharded checkpoint, on one process, and the path of its run's tokenizer.json (kept by
    `dsv4-train` in the run folder: <run>/checkpoints/step_N -> <run>/tokenizer.json; it may not exist)."""
    import dsv4
    from dsv4.model.config import ConfigError
    from dsv4.parallel.state import init_distributed
    from dsv4.train.checkpoint import CheckpointError, load_model_weights, model_config_of, resolve_resume

    if overrides:
        raise ConfigError(f"--checkpoint brings its model config; drop the overrides {overrides}")
    found = resolve_resume(os.path.abspath(path), os.path.abspath(path))
    if found is None:
        raise CheckpointError(f"--checkpoint {path}: no complete checkpoint found")
    model = dsv4.build_model(model_config_of(found))
    load_model_weights(found, model, init_distributed())
    return model, os.path.join(os.path.dirname(os.path.dirname(found)), "tokenizer.json")


if __name__ == "__main__":
    sys.exit(main())
