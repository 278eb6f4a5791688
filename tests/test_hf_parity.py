"""dsv4 == transformers' DeepSeek-V4: exported checkpoints load there and give the same logits, and back.

Every parameter (the zero/one-initialised sinks, position biases, mHC biases and scales, router biases included)
is randomised before export, so a mis-mapped or ignored tensor shows up as a logit difference.
"""

import json
import os
import random

import pytest
import torch

import dsv4

transformers = pytest.importorskip("transformers")

# Several configs: different schedules (SWA/CSA/HCA in different orders), head counts and groups, hash-layer
# counts, MTP on/off/deeper, YaRN on/off, and sequence lengths that are not multiples of the ratios.
CONFIGS = {
    "debug": ([], 160),
    "no_mtp_no_hash": (["num_layers=3", "compress_ratios=[4,8,0]", "hca_ratio=8", "mtp_depth=0",
                        "num_hash_layers=0", "num_heads=8", "o_groups=4", "n_routed_experts=4",
                        "sliding_window=16"], 131),
    "hca_first_deep_mtp": (["num_layers=5", "compress_ratios=[16,16,4,16,4,0,4]", "mtp_depth=2", "num_heads=2",
                            "o_groups=1", "num_hash_layers=3", "yarn_factor=1", "index_topk=4",
                            "n_activated_experts=3"], 150),
    "all_hash_wide_rope": (["num_layers=2", "compress_ratios=[4,16,0]", "num_hash_layers=2", "head_dim=64",
                            "rope_head_dim=16", "index_head_dim=32", "index_n_heads=2", "hidden_size=48",
                            "q_lora_rank=24", "o_lora_rank=16", "sliding_window=24"], 97),
}


def random_config(seed: int) -> tuple[list[str], int]:
    """A random small V4 config (schedule, heads, groups, hash layers, MTP depth, window, YaRN) and a length."""
    r = random.Random(seed)
    n, mtp = r.randint(2, 5), r.randint(0, 2)
    hca = r.choice([8, 16])
    heads = r.choice([2, 4, 8])
    return ([f"num_layers={n}", f"mtp_depth={mtp}", f"hca_ratio={hca}",
             f"compress_ratios=[{','.join(str(r.choice([0, 4, hca])) for _ in range(n + mtp))}]",
             f"num_heads={heads}", f"o_groups={r.choice([g for g in (1, 2, 4) if heads % g == 0])}",
             f"num_hash_layers={r.randint(0, n)}", f"sliding_window={r.choice([8, 16, 32])}",
             f"index_topk={r.choice([2, 8, 16])}", f"n_activated_experts={r.randint(1, 4)}",
             f"yarn_factor={r.choice([1, 4])}"], r.randint(64, 160))


for _seed in range(3):
    CONFIGS[f"random{_seed}"] = random_config(_seed)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter and float buffer a non-trivial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn_sink", "ape", ".base")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith(".scale"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
        for name, b in model.named_buffers():
            if name.endswith("gate.bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def hf_logits(path, ids):
    model = transformers.DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_exported_model_matches_transformers(name, groups, tmp_path):
    overrides, seq = CONFIGS[name]
    model = dsv4.build_model("debug", overrides, groups=groups)
    randomize_(model, seed=1)
    ids = torch.randint(0, model.cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(2))
    ours = dsv4.logits(model, ids)
    dsv4.export_hf(model, str(tmp_path))
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["model_type"] == "deepseek_v4"
    theirs = hf_logits(str(tmp_path), ids)
    assert ours.abs().max() > 1.0, "logits too small for the comparison to mean anything"
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_transformers_loads_every_exported_tensor(groups, tmp_path):
    """transformers finds every tensor it needs and nothing it does not know, MTP aside (it lacks MTP)."""
    model = dsv4.build_model("debug", groups=groups)
    dsv4.export_hf(model, str(tmp_path))
    _, info = transformers.DeepseekV4ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                                 output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["mismatched_keys"]
    assert all(k.startswith("mtp.") for k in info["unexpected_keys"])


@pytest.mark.parametrize("name", ["debug", "hca_first_deep_mtp"])
def test_import_round_trip_is_exact(name, groups, tmp_path):
    """export -> import gives back every tensor (MTP included) bit for bit, and the same logits and loss."""
    overrides, seq = CONFIGS[name]
    model = dsv4.build_model("debug", overrides, groups=groups)
    randomize_(model, seed=4)
    dsv4.export_hf(model, str(tmp_path))
    back = dsv4.load_hf(str(tmp_path), groups=groups)
    assert back.cfg == model.cfg
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if not k.endswith("_extra_state"):
            assert torch.equal(a[k], b[k]), k
    ids = torch.randint(0, model.cfg.vocab_size, (2, seq))
    assert torch.equal(dsv4.logits(model, ids), dsv4.logits(back, ids))
    labels = torch.roll(ids, -1, 1)
    assert torch.equal(model(ids, labels=labels).loss, back(ids, labels=labels).loss)


def test_import_reads_a_transformers_saved_directory(groups, tmp_path):
    """A directory written by transformers' save_pretrained imports and gives transformers' logits."""
    model = dsv4.build_model("debug", groups=groups)
    randomize_(model, seed=5)
    dsv4.export_hf(model, str(tmp_path / "ours"))
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype=torch.float32).eval()
    hf.save_pretrained(str(tmp_path / "theirs"))
    # transformers keeps our config keys; drop them to import as from any transformers-written directory.
    with open(tmp_path / "theirs" / "config.json") as f:
        cfg = json.load(f)
    cfg.pop("dsv4", None)
    with open(tmp_path / "theirs" / "config.json", "w") as f:
        json.dump(cfg, f)
    back = dsv4.load_hf(str(tmp_path / "theirs"), groups=groups, mtp_depth=0, compress_ratios=
                        model.cfg.compress_ratios[: model.cfg.num_layers], csa_ratio=model.cfg.csa_ratio,
                        hca_ratio=model.cfg.hca_ratio)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 128))
    with torch.no_grad():
        assert (dsv4.logits(back, ids) - hf(ids).logits).abs().max().item() <= 1e-4


def _transformers_default_dir(path, groups):
    """A tiny randomised DeepseekV4ForCausalLM whose config is transformers' own with its default
    `num_nextn_predict_layers` (1), written by save_pretrained: no `dsv4` block, no `mtp.*` tensors."""
    model = dsv4.build_model("debug", groups=groups)
    randomize_(model, seed=6)
    dsv4.export_hf(model, str(path / "ours"))
    with open(path / "ours" / "config.json") as f:
        fields = json.load(f)
    for key in ("dsv4", "num_nextn_predict_layers", "architectures", "model_type", "torch_dtype"):
        fields.pop(key, None)
    hf = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**fields)).eval()
    assert hf.config.num_nextn_predict_layers == 1
    hf.load_state_dict(transformers.DeepseekV4ForCausalLM.from_pretrained(str(path / "ours"),
                                                                         dtype=torch.float32).state_dict())
    hf.save_pretrained(str(path / "theirs"))
    assert not any(k.startswith(("mtp.", "model.mtp.")) for k in dsv4.model.hf_interop.read_hf_weights(
        str(path / "theirs")))
    return str(path / "theirs"), hf, model.cfg


def test_import_of_a_transformers_directory_initialises_the_missing_mtp_block(groups, tmp_path, capsys):
    """config.json alone is enough: the MTP block the config counts is built, initialised from the seed (as a
    fresh model's) and named in a notice; the main model gives transformers' logits (within 1e-4)."""
    path, hf, cfg = _transformers_default_dir(tmp_path, groups)
    back = dsv4.load_hf(path, groups=groups)
    err = capsys.readouterr().err
    assert "no weights for MTP block(s) mtp.0" in err and "initialised (seed 0)" in err and "mtp='drop'" in err
    assert back.cfg.mtp_depth == 1 and back.cfg.compress_ratios == cfg.compress_ratios
    fresh = dsv4.build_model(back.cfg, groups=groups, seed=0).state_dict()
    for k, v in back.state_dict().items():
        if k.startswith("mtp.") and not k.endswith("_extra_state"):
            assert torch.equal(v, fresh[k]), k
    ids = torch.randint(0, cfg.vocab_size, (1, 128), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (dsv4.logits(back, ids) - hf(ids).logits).abs().max().item() <= 1e-4
        out = back(ids, labels=torch.roll(ids, -1, 1))
    assert len(out.mtp_losses) == 1 and torch.isfinite(out.loss)


@pytest.mark.parametrize("how", [{"mtp": "drop"}, {"mtp_depth": 0}])
def test_import_of_a_transformers_directory_without_mtp(groups, tmp_path, how):
    """mtp='drop' (or mtp_depth=0) imports without MTP: the MTP entry of the schedule is dropped too."""
    path, hf, cfg = _transformers_default_dir(tmp_path, groups)
    back = dsv4.load_hf(path, groups=groups, **how)
    assert back.cfg.mtp_depth == 0 and len(back.mtp) == 0
    assert back.cfg.compress_ratios == cfg.compress_ratios[: cfg.num_layers]
    ids = torch.randint(0, cfg.vocab_size, (1, 128), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (dsv4.logits(back, ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_import_drop_ignores_mtp_tensors_and_rejects_a_contradiction(groups, tmp_path, capsys):
    """mtp='drop' on a directory with MTP weights leaves them out (and says so); mtp='drop' with a non-zero
    mtp_depth, or an unknown choice, is refused."""
    model = dsv4.build_model("debug", groups=groups)
    randomize_(model, seed=7)
    dsv4.export_hf(model, str(tmp_path))
    back = dsv4.load_hf(str(tmp_path), groups=groups, mtp="drop")
    assert "ignoring the weights of MTP block(s) mtp.0" in capsys.readouterr().err
    assert back.cfg.mtp_depth == 0 and back.cfg.compress_ratios == model.cfg.compress_ratios[:model.cfg.num_layers]
    ids = torch.randint(0, model.cfg.vocab_size, (1, 96))
    assert torch.equal(dsv4.logits(back, ids), dsv4.logits(model, ids))
    with pytest.raises(ValueError, match="mtp='drop', mtp_depth=1"):
        dsv4.load_hf(str(tmp_path), groups=groups, mtp="drop", mtp_depth=1)
    with pytest.raises(ValueError, match="expected one of"):
        dsv4.load_hf(str(tmp_path), groups=groups, mtp="zero")


def test_exported_mtp_tensors_have_the_released_names(groups):
    """An MTP block's tensors carry the released checkpoints' names (`mtp.0.*`), its own final norm included."""
    from dsv4.model.hf_interop import full_state_dict, to_deepseek_state_dict

    model = dsv4.build_model("debug", groups=groups)
    names = {k for k in to_deepseek_state_dict(full_state_dict(model)) if k.startswith("mtp.0.")}
    released = {f"mtp.0.{k}" for k in (
        "enorm.weight", "hnorm.weight", "norm.weight", "e_proj.weight", "h_proj.weight",
        "hc_head_fn", "hc_head_base", "hc_head_scale", "hc_attn_fn", "hc_attn_base", "hc_attn_scale",
        "hc_ffn_fn", "hc_ffn_base", "hc_ffn_scale", "attn_norm.weight", "ffn_norm.weight",
        "attn.attn_sink", "attn.kv_norm.weight", "attn.q_norm.weight", "attn.wq_a.weight", "attn.wq_b.weight",
        "attn.wkv.weight", "attn.wo_a.weight", "attn.wo_b.weight", "ffn.gate.weight", "ffn.gate.bias",
        "ffn.shared_experts.w1.weight", "ffn.shared_experts.w2.weight", "ffn.shared_experts.w3.weight")}
    experts = {f"mtp.0.ffn.experts.{e}.w{j}.weight" for e in range(model.cfg.n_routed_experts) for j in (1, 2, 3)}
    assert names == released | experts


def test_import_rejects_mismatched_weights(groups, tmp_path):
    """A config.json that does not match the weights fails with a message naming the tensors."""
    model = dsv4.build_model("debug", groups=groups)
    dsv4.export_hf(model, str(tmp_path))
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = 5
    cfg["layer_types"] = cfg["layer_types"][:5]
    cfg["mlp_layer_types"] = cfg["mlp_layer_types"][:5]
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="dsv4.num_layers=6 disagrees"):
        dsv4.load_hf(str(tmp_path), groups=groups)
    cfg.pop("dsv4")
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(KeyError, match="unexpected.*layers.5"):
        dsv4.load_hf(str(tmp_path), groups=groups)


def test_import_rejects_a_directory_without_config(tmp_path, groups):
    with pytest.raises(FileNotFoundError, match="config.json"):
        dsv4.load_hf(str(tmp_path), groups=groups)
    os.makedirs(tmp_path / "x")
    with open(tmp_path / "x" / "config.json", "w") as f:
        json.dump({"model_type": "llama"}, f)
    with pytest.raises(ValueError, match="deepseek_v4"):
        dsv4.load_hf(str(tmp_path / "x"), groups=groups)
