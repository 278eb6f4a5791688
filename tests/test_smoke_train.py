"""The debug model learns, and the command-line entry points work end to end."""

import json

import torch

import dsv4
from dsv4.model.moe import update_expert_bias
from dsv4.train import export, smoke


def test_debug_model_loss_decreases_on_a_fixed_batch(groups):
    """50 AdamW steps on one batch of real text: the model memorises it (every loss term is live)."""
    model = dsv4.build_model("debug", groups=groups).train()
    tokens = smoke.text_batch(2, 128, model.cfg.vocab_size)
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
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses


def test_smoke_command_prints_parameters_and_losses(capsys):
    assert smoke.main(["--steps", "2", "--seq", "128"]) == 0
    out = capsys.readouterr().out
    assert "parameters=" in out and "active/token=" in out
    assert "step    2/2 loss=" in out


def test_smoke_command_rejects_a_bad_override(capsys):
    assert smoke.main(["--steps", "1", "model.hiden_size=3"]) == 2
    assert "model.hiden_size" in capsys.readouterr().err


def test_export_command_writes_a_loadable_directory(tmp_path, capsys):
    out_dir = tmp_path / "hf"
    assert export.main(["--out", str(out_dir), "--model", "debug", "model.num_layers=3",
                        "model.compress_ratios=[0,4,16,0]", "model.num_hash_layers=1"]) == 0
    with open(out_dir / "config.json") as f:
        assert json.load(f)["num_hidden_layers"] == 3
    model = dsv4.load_hf(str(out_dir))
    assert model.cfg.num_layers == 3


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
