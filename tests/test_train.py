"""The training job end to end: the loop learns, the command line works, bad input fails cleanly.

The golden loss curves of the debug preset on the embedded corpus live in tests/golden/debug_loss.json (AdamW) and
tests/golden/debug_loss_muon.json (V4's Muon + AdamW); regenerate them (after a deliberate change to the numerics)
with `python tests/test_train.py --regenerate-golden`.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import dsv4
from dsv4.conf.schema import compose_config
from dsv4.model.moe import update_expert_bias
from dsv4.model.transformer import ModelOutput
from dsv4.train import export, loop

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "debug_loss.json")
GOLDEN_OVERRIDES = ["run.steps=20", "optim.warmup_steps=5", "data.seq_length=128", "data.micro_batch_size=2",
                    "data.global_batch_size=4", "run.eval_interval=0", "run.log_interval=5", "run.seed=7"]


def config(cache_dir, run_dir, *overrides):
    return compose_config("debug", [f"data.cache_dir={cache_dir}", f"run.output_dir={run_dir}",
                                    "run.progress_bar=false", *overrides])


def text_batch(batch: int, seq: int) -> torch.Tensor:
    """[batch, seq + 1] byte tokens of CPython's documentation: real text every machine has."""
    from pydoc_data.topics import topics

    data = torch.tensor(list("\n".join(topics[k] for k in sorted(topics)).encode("utf-8")), dtype=torch.long)
    return torch.stack([data[i * seq: i * seq + seq + 1] for i in range(batch)])


def test_debug_model_loss_decreases_on_a_fixed_batch(groups):
    """50 AdamW steps on one batch of real text: the model memorises it (every loss term is live)."""
    model = dsv4.build_model("debug", groups=groups).train()
    tokens = text_batch(2, 128)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        out = model(tokens[:, :-1], labels=tokens[:, 1:])
        assert out.mtp_losses and out.indexer_loss is not None and out.balance_loss is not None
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        update_expert_bias(model, model.cfg.bias_update_rate)
        losses.append(out.lm_loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses


GOLDEN_FILES = {"adamw": GOLDEN, "muon": os.path.join(os.path.dirname(__file__), "golden", "debug_loss_muon.json")}


def golden_run(cache_dir, run_dir, optim="adamw"):
    return loop.train(config(cache_dir, run_dir, *GOLDEN_OVERRIDES, f"optim={optim}"))


@pytest.mark.parametrize("optim", list(GOLDEN_FILES))
def test_loss_follows_the_golden_curve_on_the_embedded_corpus(cache_dir, tmp_path, groups, optim):
    """The debug preset trained on the embedded corpus reproduces the stored curve, and the loss falls."""
    result = golden_run(cache_dir, str(tmp_path / "run"), optim)
    losses = [m["lm_loss"] for m in result.history]
    with open(GOLDEN_FILES[optim]) as f:
        golden = json.load(f)["lm_loss"]
    assert len(losses) == len(golden)
    # CPU kernels may sum in a different order on another machine: a small tolerance, far below the fall.
    for step, (got, want) in enumerate(zip(losses, golden)):
        assert abs(got - want) < 0.02 * want, (step, got, want)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3


def test_run_folder_holds_config_versions_and_tensorboard(cache_dir, tmp_path, groups):
    run_dir = tmp_path / "run"
    result = loop.train(config(cache_dir, run_dir, "run.steps=4", "optim.warmup_steps=1", "run.log_interval=2",
                               "run.eval_interval=2", "run.eval_iters=1", "data.seq_length=128"))
    assert (run_dir / "config.yaml").read_text().count("hidden_size: 64") == 1
    versions = json.loads((run_dir / "versions.json").read_text())
    assert versions["packages"]["torch"] and versions["git"]
    events = list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("loss/loss", "loss/lm_loss", "loss/mtp_loss", "loss/indexer_loss", "loss/balance_loss", "train/lr",
                "train/grad_norm", "train/tokens_per_s", "train/tflops_per_device", "valid/lm_loss",
                "valid/perplexity", "valid/indexer_recall", "valid/mhc_composite_gain"):
        assert tag in tags, tag
    assert any(t.startswith("moe/load_max_over_mean/") for t in tags)
    assert result.valid_loss is not None and math.isfinite(result.valid_loss)


def test_gradient_accumulation_equals_one_big_micro_batch(cache_dir, tmp_path, groups):
    """global batch 4 as 2 micro-batches of 2 == 1 micro-batch of 4 (same samples, mean of the micro losses)."""
    common = ["run.steps=3", "optim.warmup_steps=1", "data.seq_length=128", "data.global_batch_size=4",
              "run.eval_interval=0"]
    a = loop.train(config(cache_dir, tmp_path / "a", *common, "data.micro_batch_size=2"))
    b = loop.train(config(cache_dir, tmp_path / "b", *common, "data.micro_batch_size=4"))
    for ma, mb in zip(a.history, b.history):
        assert ma["lm_loss"] == pytest.approx(mb["lm_loss"], rel=1e-4)
        assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-4)
    coef = compose_config("debug").model.indexer_loss_coef
    for m in a.history + b.history:  # the total is the weighted sum of its parts, whatever the micro-batching
        parts = m["lm_loss"] + m["mtp_weight"] * m["mtp_loss"] + coef * m["indexer_loss"] + m["balance_loss"]
        assert m["loss"] == pytest.approx(parts, rel=1e-5)


def _poison_forward(monkeypatch, chunks, poison):
    """Make the last stage's loss non-finite (`poison` maps a ModelOutput to one)."""
    model_cls = type(loop.unwrap(chunks[0]))
    real_forward = model_cls.forward

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        return poison(out) if isinstance(out, ModelOutput) else out

    monkeypatch.setattr(model_cls, "forward", forward)


def _batch():
    ids = torch.randint(0, 1024, (2, 128))
    return {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "loss_mask": torch.ones(2, 128)}


def _optimizer_states(opt) -> int:
    return sum(len(o.optimizer.state) for o in getattr(opt, "chained_optimizers", [opt]))


def test_nan_loss_is_skipped_without_touching_the_model(cache_dir, tmp_path, groups, monkeypatch):
    """A non-finite loss skips the update (run.on_nan=skip): parameters and expert biases stay as they were."""
    cfg = config(cache_dir, tmp_path / "run", "run.steps=1", "optim.warmup_steps=0", "data.seq_length=128",
                 "optim.schedule=constant")
    chunks = loop.build_model(cfg, groups)
    model = loop.unwrap(chunks[0])
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    opt = loop.build_optimizer(chunks, cfg)

    def nan_loss(out):
        out.loss = out.loss * float("nan")
        return out

    _poison_forward(monkeypatch, chunks, nan_loss)
    metrics = loop.train_step(chunks, opt, [_batch()], cfg, groups, step=0)
    assert metrics["skipped"]
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert _optimizer_states(opt) == 0


def test_nan_loss_stops_the_run_when_asked(cache_dir, tmp_path, groups, monkeypatch):
    cfg = config(cache_dir, tmp_path / "run", "run.steps=1", "optim.warmup_steps=0", "data.seq_length=128",
                 "optim.schedule=constant", "run.on_nan=stop")
    chunks = loop.build_model(cfg, groups)
    opt = loop.build_optimizer(chunks, cfg)
    _poison_forward(monkeypatch, chunks, _with_inf_loss)
    with pytest.raises(loop.NonFiniteLossError, match="run.on_nan=skip"):
        loop.train_step(chunks, opt, [_batch()], cfg, groups, step=0)


def _with_inf_loss(out):
    out.loss = out.loss + float("inf")
    return out


def test_weight_decay_groups_are_explicit(groups):
    cfg = compose_config("debug", ["parallel.distributed_optimizer=false"])
    chunks = loop.build_model(cfg, groups)
    names = {id(p): n for n, p in loop.unwrap(chunks[0]).named_parameters()}
    param_groups = loop.build_optimizer(chunks, cfg).param_groups
    decay = [p for g in param_groups if g["wd_mult"] == 1.0 for p in g["params"]]
    plain = [p for g in param_groups if g["wd_mult"] == 0.0 for p in g["params"]]
    assert len(decay) + len(plain) == len(names)
    assert all(p.dim() >= 2 and not names[id(p)].endswith(".ape") for p in decay)
    plain_names = {names[id(p)] for p in plain}
    assert "layers.2.attn.compressor.ape" in plain_names and "layers.0.attn.attn_sink" in plain_names
    opt = loop.build_optimizer(chunks, cfg)
    loop._set_schedule(opt, cfg, 1e-3)
    for g in opt.param_groups:
        assert g["weight_decay"] == (0.0 if g["wd_mult"] == 0.0 else cfg.optim.weight_decay)
        assert g["lr"] == 1e-3


# --- the command line --------------------------------------------------------------------------------------------

def dsv4_train(*args, cwd):
    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "dsv4-train"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_main_command_trains_and_writes_its_run_folder(cache_dir, tmp_path):
    """The README's main command, with a short step count."""
    run_dir = tmp_path / "run"
    proc = dsv4_train("run.steps=6", "run.log_interval=3", "run.eval_interval=6", "optim.warmup_steps=2",
                      f"run.output_dir={run_dir}", f"data.cache_dir={cache_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step      6/6 loss" in proc.stdout
    assert "lm_loss" in proc.stdout and "perplexity" in proc.stdout
    assert (run_dir / "config.yaml").exists() and list((run_dir / "tb").glob("events.*"))


def test_cfg_job_prints_the_resolved_config(tmp_path):
    proc = dsv4_train("--cfg", "job", "model=flash", "data.seq_length=4096", "optim.lr=2.7e-4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "num_layers: 43" in proc.stdout and "lr: 0.00027" in proc.stdout


def test_multirun_gives_each_job_its_own_run_folder(cache_dir, tmp_path):
    proc = dsv4_train("-m", "optim.lr=1e-3,2e-3", "run.steps=2", "optim.warmup_steps=1", "run.eval_interval=0",
                      "data.seq_length=128", f"run.output_dir={tmp_path / 'sweep'}", f"data.cache_dir={cache_dir}",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "config.yaml").exists()
    assert "lr: 0.002" in (tmp_path / "sweep" / "1" / "config.yaml").read_text()


def test_bad_config_fails_before_anything_runs(tmp_path):
    run_dir = tmp_path / "run"
    proc = dsv4_train("optim.min_lr=1", f"run.output_dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "optim.min_lr: must be in [0, optim.lr" in proc.stderr
    assert not (run_dir / "tb").exists()


def test_missing_dataset_names_the_key_and_the_fix(tmp_path, cache_dir):
    proc = dsv4_train(f"data.prefixes=[{tmp_path}/nope]", f"data.cache_dir={cache_dir}", "run.steps=2",
                      "optim.warmup_steps=1", f"run.output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "data.prefixes[0]" in proc.stderr and "dsv4-preprocess" in proc.stderr


# --- dsv4-export -------------------------------------------------------------------------------------------------

def test_export_command_writes_a_loadable_directory(tmp_path):
    out_dir = tmp_path / "hf"
    assert export.main(["--out", str(out_dir), "--model", "debug", "model.num_layers=3",
                        "model.compress_ratios=[0,4,16,0]", "model.num_hash_layers=1"]) == 0
    with open(out_dir / "config.json") as f:
        assert json.load(f)["num_hidden_layers"] == 3
    assert dsv4.load_hf(str(out_dir)).cfg.num_layers == 3


def test_export_command_from_a_state_dict_file(tmp_path, groups):
    model = dsv4.build_model("debug", groups=groups, seed=7)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    assert export.main(["--out", str(tmp_path / "hf"), "--weights", str(tmp_path / "w.pt")]) == 0
    back = dsv4.load_hf(str(tmp_path / "hf"))
    ids = torch.randint(0, model.cfg.vocab_size, (1, 64))
    assert torch.equal(dsv4.logits(model, ids), dsv4.logits(back, ids))


def test_export_command_errors_name_the_problem(tmp_path, capsys):
    assert export.main(["--out", str(tmp_path / "a"), "--weights", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt: no such file" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert export.main(["--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    torch.save({"bogus": torch.zeros(1)}, tmp_path / "bad.pt")
    assert export.main(["--out", str(tmp_path / "b"), "--weights", str(tmp_path / "bad.pt")]) == 2
    assert "does not match" in capsys.readouterr().err


if __name__ == "__main__" and "--regenerate-golden" in sys.argv:
    import tempfile

    from dsv4.parallel.state import init_distributed

    init_distributed()
    for optim, path in GOLDEN_FILES.items():
        with tempfile.TemporaryDirectory() as tmp:
            result = golden_run(os.path.join(tmp, "cache"), os.path.join(tmp, "run"), optim)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"overrides": [*GOLDEN_OVERRIDES, f"optim={optim}"],
                       "lm_loss": [round(m["lm_loss"], 5) for m in result.history]}, f, indent=1)
        print(f"wrote {path}")
