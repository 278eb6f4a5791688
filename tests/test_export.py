"""`dsv4-export` carries the tokenizer: a run keeps a copy of the one it trained with, and an export from its
checkpoint (or a re-export of a Hugging Face directory that has one) writes it beside the weights."""

import filecmp
import os

import pytest

from dsv4.conf.schema import compose_config
from dsv4.train import export, loop

tokenizers = pytest.importorskip("tokenizers")


def _short_run(cache_dir, run_dir):
    """Two steps of the debug preset on the embedded corpus, one checkpoint at the end."""
    cfg = compose_config("debug", [f"data.cache_dir={cache_dir}", f"run.output_dir={run_dir}", "run.steps=2",
                                   "optim.warmup_steps=1", "run.save_interval=2", "run.eval_interval=0",
                                   "data.seq_length=64", "data.micro_batch_size=2", "data.global_batch_size=2",
                                   "run.progress_bar=false"])
    return loop.train(cfg, run_dir=run_dir)


def test_export_from_a_checkpoint_writes_the_runs_tokenizer(cache_dir, groups, tmp_path, capsys):
    from dsv4.train.data import build_data

    run_dir = str(tmp_path / "run")
    _short_run(cache_dir, run_dir)
    # The run's tokenizer: the embedded corpus's cached one (no data.tokenizer, no data.prefixes).
    cfg = compose_config("debug", [f"data.cache_dir={cache_dir}"])
    used = build_data(cfg, dp_rank=0, dp_size=1).tokenizer.path
    assert export.main(["--out", str(tmp_path / "hf"), "--checkpoint", run_dir]) == 0
    assert "tokenizer.json" in capsys.readouterr().out
    written = tmp_path / "hf" / "tokenizer.json"
    assert filecmp.cmp(written, used, shallow=False)  # byte for byte
    loaded, theirs = tokenizers.Tokenizer.from_file(str(written)), tokenizers.Tokenizer.from_file(used)
    assert loaded.get_vocab() == theirs.get_vocab()
    text = "def f(x):\n    return x + 1  # the embedded corpus is Python's own library"
    assert loaded.encode(text).ids == theirs.encode(text).ids

    # Re-exporting the Hugging Face directory keeps it.
    assert export.main(["--out", str(tmp_path / "hf2"), "--hf", str(tmp_path / "hf")]) == 0
    assert filecmp.cmp(tmp_path / "hf2" / "tokenizer.json", used, shallow=False)

    # A run folder without the copy (older dsv4) exports the weights and says how to add the tokenizer.
    os.remove(os.path.join(run_dir, "tokenizer.json"))
    assert export.main(["--out", str(tmp_path / "hf3"), "--checkpoint", run_dir]) == 0
    assert "no tokenizer written" in capsys.readouterr().err
    assert not (tmp_path / "hf3" / "tokenizer.json").exists()
