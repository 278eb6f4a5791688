"""Hugging Face `deepseek_v4` checkpoints <-> dsv4 models.

Export writes DeepSeek's own checkpoint layout (the names of the released V4 safetensors: `embed.weight`,
`layers.0.attn.wq_a.weight`, `layers.0.ffn.experts.3.w1.weight`, `hc_head_fn`, `mtp.0.*`, ...) with a
`config.json` of `model_type: deepseek_v4`; `transformers`' `DeepseekV4ForCausalLM.from_pretrained` renames these
keys itself (its conversion mapping) and ignores the `mtp.*` keys (it does not implement MTP). Import reads the
same layout back. Weights are written as they are (fp32 or bf16); the released FP8/FP4 packing is not produced.

Each MTP block is written as in the released checkpoints: its block's tensors directly under `mtp.<i>.` (no
`block.`), plus `enorm`, `hnorm`, `e_proj`, `h_proj`, `hc_head_{fn,base,scale}` and its own final `norm`.
A directory that transformers' `save_pretrained` wrote counts MTP blocks in its config
(`num_nextn_predict_layers`, 1 by default) but holds no `mtp.*` tensors: `split_mtp` says which blocks are
missing, and `dsv4.load_hf` initialises them or imports without MTP (its `mtp` argument).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Dict, Sequence

import torch

from .config import ModelConfig

_LAYER_KIND_TO_HF = {"swa": "sliding_attention", "csa": "compressed_sparse_attention",
                     "hca": "heavily_compressed_attention"}

# (our name pattern, DeepSeek's name): applied in order, first match wins; experts are handled separately.
_RENAMES = [
    (r"^(.*)\.linear\.weight$", r"\1.weight"),  # ColumnLinear / RowLinear wrappers
    (r"^(.*)\.attn\.wo_a$", r"\1.attn.wo_a.weight"),
    (r"^(mtp\.\d+\.)?hc_head\.(fn|base|scale)$", r"\1hc_head_\2"),
    (r"^(.*)\.(attn|ffn)_hc\.(fn|base|scale)$", r"\1.hc_\2_\3"),
]


def _to_deepseek_name(name: str) -> str:
    name = re.sub(r"^mtp\.(\d+)\.block\.", r"mtp.\1.", name)
    for pattern, repl in _RENAMES:
        new = re.sub(pattern, repl, name)
        if new != name:
            return new
    return name


def to_deepseek_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our (unsharded) state dict -> DeepSeek's checkpoint names; 3-D expert tensors split per expert."""
    out = {}
    for name, tensor in state.items():
        m = re.match(r"^(.*\.ffn\.experts)\.(w[123])$", name)
        if m:
            prefix = _to_deepseek_name(m.group(1) + ".x")[:-2]
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.{m.group(2)}.weight"] = tensor[e].contiguous()
        else:
            out[_to_deepseek_name(name)] = tensor.contiguous()
    return out


# `transformers`' save_pretrained writes DeepSeek's names with a few of its own: these map them back.
_HF_SAVE_RENAMES = [
    (r"^model\.", ""),
    (r"^embed_tokens\.weight$", "embed.weight"),
    (r"^lm_head\.weight$", "head.weight"),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"^((?:layers|mtp)\.\d+\.attn)\.norm\.weight$", r"\1.kv_norm.weight"),
]


def canonical_deepseek_name(key: str) -> str:
    """DeepSeek's checkpoint name of a tensor written by DeepSeek, by dsv4, or by transformers' save_pretrained."""
    for pattern, repl in _HF_SAVE_RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def split_mtp(ds_state: Dict[str, torch.Tensor], depth: int) -> tuple[Dict[str, torch.Tensor], list, list]:
    """For a model of MTP depth `depth`: (the tensors it loads, by DeepSeek's names; the indices i < depth of the
    MTP blocks the state holds no `mtp.<i>.*` tensor of; the indices i >= depth of the MTP blocks it holds, which
    are left out)."""
    ds_state = {canonical_deepseek_name(k): v for k, v in ds_state.items()}
    block = {k: int(m.group(1)) for k in ds_state if (m := re.match(r"^mtp\.(\d+)\.", k))}
    held = set(block.values())
    kept = {k: v for k, v in ds_state.items() if block.get(k, -1) < depth}
    return kept, [i for i in range(depth) if i not in held], sorted(i for i in held if i >= depth)


def from_deepseek_state_dict(ds_state: Dict[str, torch.Tensor], our_names) -> Dict[str, torch.Tensor]:
    """DeepSeek-named tensors -> our state dict for a model whose state-dict keys are `our_names`.

    Raises KeyError naming every tensor the model needs and the checkpoint lacks, and every tensor left over.
    """
    ds_state = {canonical_deepseek_name(k): v for k, v in ds_state.items()}
    out, used, missing = {}, set(), []
    for name in our_names:
        m = re.match(r"^(.*\.ffn\.experts)\.(w[123])$", name)
        if m:
            prefix = _to_deepseek_name(m.group(1) + ".x")[:-2]
            keys = sorted((k for k in ds_state if re.fullmatch(re.escape(prefix) + rf"\.\d+\.{m.group(2)}\.weight", k)),
                          key=lambda k: int(k[len(prefix) + 1:].split(".")[0]))
            if not keys:
                missing.append(f"{prefix}.<e>.{m.group(2)}.weight")
                continue
            out[name] = torch.stack([ds_state[k] for k in keys])
            used.update(keys)
        else:
            key = _to_deepseek_name(name)
            if key not in ds_state:
                missing.append(key)
                continue
            out[name] = ds_state[key]
            used.add(key)
    unexpected = sorted(set(ds_state) - used)
    if missing or unexpected:
        raise KeyError(f"checkpoint does not match the model config: missing {missing[:8]}"
                       f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                       f"{' ...' if len(unexpected) > 8 else ''}; check that config.json matches the weights")
    return out


def to_hf_config(cfg: ModelConfig) -> dict:
    """config.json for `transformers`' DeepseekV4Config."""
    if cfg.n_shared_experts != 1:
        raise ValueError(f"model.n_shared_experts={cfg.n_shared_experts}: transformers' DeepSeek-V4 has exactly one "
                         f"shared expert; export needs n_shared_experts=1")
    rotary = cfg.rope_head_dim / cfg.head_dim
    compress = {"rope_type": "default", "rope_theta": cfg.compress_rope_theta, "partial_rotary_factor": rotary}
    if cfg.yarn_factor > 1.0:
        compress.update(rope_type="yarn", factor=cfg.yarn_factor,
                        original_max_position_embeddings=cfg.yarn_original_max_position,
                        beta_fast=cfg.yarn_beta_fast, beta_slow=cfg.yarn_beta_slow, attention_factor=1.0)
    n = cfg.num_layers
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": n,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": 1,
        "head_dim": cfg.head_dim,
        "partial_rotary_factor": rotary,
        "q_lora_rank": cfg.q_lora_rank,
        "o_groups": cfg.o_groups,
        "o_lora_rank": cfg.o_lora_rank,
        "sliding_window": cfg.sliding_window,
        "layer_types": [_LAYER_KIND_TO_HF[cfg.layer_kind(i)] for i in range(n)],
        "compress_rates": {"compressed_sparse_attention": cfg.csa_ratio,
                           "heavily_compressed_attention": cfg.hca_ratio},
        "index_n_heads": cfg.index_n_heads,
        "index_head_dim": cfg.index_head_dim,
        "index_topk": cfg.index_topk,
        "n_routed_experts": cfg.n_routed_experts,
        "num_experts_per_tok": cfg.n_activated_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "scoring_func": "sqrtsoftplus",
        "norm_topk_prob": True,
        "mlp_layer_types": ["hash_moe" if i < cfg.num_hash_layers else "moe" for i in range(n)],
        "swiglu_limit": cfg.swiglu_limit,
        "hc_mult": cfg.hc_mult,
        "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters,
        "hc_eps": cfg.hc_eps,
        "num_nextn_predict_layers": cfg.mtp_depth,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "compress_rope_theta": cfg.compress_rope_theta,
        "rope_parameters": {"main": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                                     "partial_rotary_factor": rotary},
                            "compress": compress},
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": False,
        # Our whole config, for a lossless round trip (MTP, training fields); transformers ignores it.
        "dsv4": dataclasses.asdict(cfg),
    }


def from_hf_config(hf: dict, **overrides) -> ModelConfig:
    """A ModelConfig from a `deepseek_v4` config.json (ours, or one of the released ones).

    Fields transformers knows come from its keys; the rest from our `dsv4` block when there is one. Without it
    the quantization simulation is off, so the imported model computes what transformers computes.
    """
    if hf.get("model_type") != "deepseek_v4":
        raise ValueError(f"config.json has model_type={hf.get('model_type')!r}; expected 'deepseek_v4'")
    n = hf["num_hidden_layers"]
    ours = hf.get("dsv4", {})
    rates = hf.get("compress_rates") or {"compressed_sparse_attention": hf.get("compress_rate_csa", 4),
                                         "heavily_compressed_attention": hf.get("compress_rate_hca", 128)}
    csa, hca = rates["compressed_sparse_attention"], rates["heavily_compressed_attention"]
    mtp_depth = ours.get("mtp_depth", hf.get("num_nextn_predict_layers", 1))
    if "compress_ratios" in ours:
        ratios = list(ours["compress_ratios"])
    elif "compress_ratios" in hf:  # the released configs: one entry per block, then the MTP block
        ratios = list(hf["compress_ratios"])[: n + mtp_depth]
    else:
        kind_ratio = {"sliding_attention": 0, "compressed_sparse_attention": csa,
                      "heavily_compressed_attention": hca}
        ratios = [kind_ratio[t] for t in hf["layer_types"]] + [0] * mtp_depth
    if "mlp_layer_types" in hf:
        n_hash = sum(t == "hash_moe" for t in hf["mlp_layer_types"])
    else:
        n_hash = hf.get("num_hash_layers", 3)
    rope = hf.get("rope_parameters") or {}
    compress = rope.get("compress", rope.get("rope_scaling") or hf.get("rope_scaling") or {})
    rope_dim = hf.get("qk_rope_head_dim") or int(hf["head_dim"] * hf.get("partial_rotary_factor", 64 / 512))
    yarn = compress.get("rope_type", compress.get("type")) == "yarn"
    fields = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=n,
        max_position_embeddings=hf.get("max_position_embeddings", 1048576), num_heads=hf["num_attention_heads"],
        head_dim=hf["head_dim"], rope_head_dim=rope_dim, q_lora_rank=hf["q_lora_rank"], o_groups=hf["o_groups"],
        o_lora_rank=hf["o_lora_rank"], sliding_window=hf["sliding_window"], compress_ratios=ratios,
        csa_ratio=csa, hca_ratio=hca, index_n_heads=hf["index_n_heads"], index_head_dim=hf["index_head_dim"],
        index_topk=hf["index_topk"], rope_theta=float(hf.get("rope_theta", 10000.0)),
        compress_rope_theta=float(hf.get("compress_rope_theta", 160000.0)),
        yarn_factor=float(compress.get("factor", 1.0)) if yarn else 1.0,
        n_routed_experts=hf["n_routed_experts"], n_activated_experts=hf["num_experts_per_tok"],
        n_shared_experts=hf.get("n_shared_experts", 1), moe_intermediate_size=hf["moe_intermediate_size"],
        routed_scaling_factor=hf["routed_scaling_factor"], num_hash_layers=n_hash,
        hash_seed=ours.get("hash_seed", 0), swiglu_limit=hf.get("swiglu_limit", 10.0),
        hc_mult=hf.get("hc_mult", 4), hc_sinkhorn_iters=hf.get("hc_sinkhorn_iters", 20),
        hc_eps=hf.get("hc_eps", 1e-6), mtp_depth=mtp_depth, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        # transformers computes without the FP8/FP4 simulation: without our block, import what it computes.
        quant_sim=False,
    )
    if yarn:
        fields.update(yarn_original_max_position=int(compress.get("original_max_position_embeddings", 65536)),
                      yarn_beta_fast=float(compress.get("beta_fast", 32.0)),
                      yarn_beta_slow=float(compress.get("beta_slow", 1.0)))
    # Our own block adds what transformers' fields cannot say (MTP schedule, training fields); where both say
    # something they must agree, so an edit to one side only is caught instead of silently losing.
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    for key, value in ours.items():
        if key not in known:
            continue
        derived = fields.get(key, value)
        if key == "compress_ratios":
            derived, value = derived[:n], list(value)[:n]
        if derived != value:
            raise ValueError(f"config.json: dsv4.{key}={value!r} disagrees with the transformers fields, which "
                             f"give {derived!r}; edit both or delete the `dsv4` block")
    fields.update({k: v for k, v in ours.items() if k in known})
    fields.update(overrides)
    depth, ratios = fields["mtp_depth"], fields["compress_ratios"]
    if "compress_ratios" not in overrides and len(ratios) > n + depth:
        # The schedule lists the MTP blocks last: importing fewer of them (mtp_depth=0: without MTP) drops theirs.
        fields["compress_ratios"] = list(ratios)[: n + depth]
    return ModelConfig(**fields).validate()


def full_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The model's unsharded state dict (tensor- and expert-parallel size 1 only, until sharded checkpoints land)."""
    if model.config.tensor_model_parallel_size != 1 or model.ep_size != 1:
        raise NotImplementedError("export from a tensor- or expert-parallel model needs the gathered weights; run it "
                                  "with tensor and expert parallel size 1 (or export from a checkpoint)")
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def save_hf(model: torch.nn.Module, path: str, dtype: torch.dtype | None = None,
            max_shard_bytes: int = 4 << 30) -> None:
    """Write `path/config.json` and safetensors shards (+ index when there are several)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    state = to_deepseek_state_dict(full_state_dict(model))
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    config = to_hf_config(model.cfg)
    config["torch_dtype"] = str(dtype or next(iter(state.values())).dtype).replace("torch.", "")
    shards, current, size = [], {}, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


def read_hf_config(path: str) -> dict:
    """config.json of a Hugging Face directory."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json; expected a Hugging Face deepseek_v4 directory")
    with open(cfg_path) as f:
        return json.load(f)


def read_hf_weights(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory's *.safetensors files, by name."""
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    state = {}
    for fname in files:
        state.update(load_file(os.path.join(path, fname)))
    return state


def load_hf_into(model: torch.nn.Module, ds_state: Dict[str, torch.Tensor], keep_mtp: Sequence[int] = ()) -> None:
    """Copy DeepSeek-named tensors into a (tensor-parallel size 1) model, strictly: every tensor of the model but
    those of the MTP blocks `keep_mtp` (which keep their weights), and no tensor more."""
    ours = full_state_dict(model)
    kept = tuple(f"mtp.{i}." for i in keep_mtp)
    converted = from_deepseek_state_dict(ds_state, [k for k in ours if not k.startswith(kept)])
    for k, v in converted.items():
        if v.shape != ours[k].shape:
            raise ValueError(f"{k}: checkpoint shape {tuple(v.shape)} != model shape {tuple(ours[k].shape)}; "
                             f"check that config.json matches the weights")
    result = model.load_state_dict({k: v.to(ours[k].dtype) for k, v in converted.items()}, strict=False)
    # megatron's linears carry an empty `_extra_state` entry (TransformerEngine compatibility): nothing to load.
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state") and not k.startswith(kept)]
    if missing or result.unexpected_keys:
        raise KeyError(f"weights do not match the model: missing {missing}, unexpected {result.unexpected_keys}")
