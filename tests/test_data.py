"""Data pipeline: `dsv4-preprocess` round trip and errors, blending, the resumable per-rank loader, the embedded corpus.

Small synthetic corpora whose two halves use disjoint letters ("abcde" words vs "vwxyz" words), so the dataset a
sample came from can be read off its decoded text.
"""

import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from dsv4.conf.schema import compose_config
from dsv4.model.config import ConfigError
from dsv4.train import data as data_mod
from dsv4.train.data import build_data, embedded_corpus, load_tokenizer
from dsv4.train.preprocess import main as preprocess_main
from dsv4.train.preprocess import preprocess, write_indexed_dataset


def _docs(letters: str, n: int, seed: int):
    rng = random.Random(seed)
    return [" ".join("".join(rng.choice(letters) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(5, 60)))
            + "\n" for _ in range(n)]


def _write_jsonl(path, docs, key="text"):
    with open(path, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, key: d}) + "\n")
    return str(path)


def cli(*argv):
    """Run dsv4-preprocess in-process; argparse errors exit through SystemExit, ours return 2."""
    try:
        return preprocess_main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two datasets with one shared tokenizer: A (200 docs of "abcde" words) and B (100 docs of "vwxyz" words)."""
    root = tmp_path_factory.mktemp("corpus")
    a_docs, b_docs = _docs("abcde", 200, 0), _docs("vwxyz", 100, 1)
    preprocess([_write_jsonl(root / "a.jsonl", a_docs)], str(root / "a"), vocab_size=300, progress=False)
    preprocess([_write_jsonl(root / "b.jsonl", b_docs)], str(root / "b"), tokenizer_path=str(root / "a.tokenizer.json"),
               progress=False)
    return {"root": root, "a": str(root / "a"), "b": str(root / "b"), "a_docs": a_docs, "b_docs": b_docs}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _cfg(cache_dir, prefixes=(), weights=(), steps=20, mbs=2, gbs=4, seq=16, split="90,10,0", overrides=()):
    """The debug config with these data settings (set after composition: the data layer needs no model check)."""
    cfg = compose_config("debug", list(overrides))
    cfg.run.steps = steps
    d = cfg.data
    d.prefixes, d.weights, d.cache_dir, d.split = list(prefixes), list(weights), cache_dir, split
    d.micro_batch_size, d.global_batch_size, d.seq_length = mbs, gbs, seq
    return cfg


# --- dsv4-preprocess ------------------------------------------------------------------------------------------------


def test_preprocess_round_trip(tmp_path):
    """.txt files -> .bin/.idx: each document's tokens come back unchanged with the EOD token appended, and the
    stored byte-level tokenizer decodes them to the exact text (accents, CJK, emoji, tabs, trailing spaces)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    texts = ["Hello, world!\n", "Ünïcödé → 日本語 🙂\ttab  trailing  \n\n",
             "def f(x):\n    return x ** 2\n" * 20]
    files = []
    for i, t in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(t, encoding="utf-8")
        files.append(tmp_path / f"doc{i}.txt")
    (tmp_path / "empty.txt").write_text("")  # skipped: it would be a lone EOD
    out = tmp_path / "out" / "ds"
    rc = cli("-o", out, "--train-tokenizer", "--vocab-size", 300, "--no-progress", *files, tmp_path / "empty.txt")
    assert rc == 0

    tok = load_tokenizer(f"{out}.tokenizer.json")
    assert tok.eod_token == "<|endoftext|>" and tok.vocab_size <= 300
    ds = IndexedDataset(str(out))
    assert len(ds) == len(texts)
    for i, text in enumerate(texts):
        ids = tok.encode(text)
        assert ds[i].tolist() == ids + [tok.eod]
        assert tok.decode(ids) == text
    assert sorted(os.listdir(out.parent)) == ["ds.bin", "ds.idx", "ds.stats.json", "ds.tokenizer.json"]  # no temps
    stats = json.loads((out.parent / "ds.stats.json").read_text())  # what training checks against the vocabulary
    assert stats == {"max_token_id": max(max(ds[i].tolist()) for i in range(len(ds))), "documents": len(texts),
                     "tokens": sum(len(ds[i]) for i in range(len(ds))),
                     "bin_bytes": os.path.getsize(f"{out}.bin")}


def test_preprocess_jsonl_key_and_workers(tmp_path, corpus):
    """--jsonl-key picks the field; blank lines are skipped; --workers 2 writes byte-identical files in input order."""
    docs = _docs("abcdevwxyz", 150, 2)
    path = _write_jsonl(tmp_path / "c.jsonl", docs, key="content")
    with open(path, "a") as f:
        f.write("\n   \n")
    tok = f"{corpus['a']}.tokenizer.json"
    assert cli("-o", tmp_path / "one", "--tokenizer", tok, "--jsonl-key", "content", "--no-progress", path) == 0
    assert cli("-o", tmp_path / "two", "--tokenizer", tok, "--jsonl-key", "content", "--workers", 2, path) == 0
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    t = load_tokenizer(tok)
    ds = IndexedDataset(str(tmp_path / "one"))
    assert len(ds) == len(docs) and t.decode(ds[7][:-1]) == docs[7]


def _bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": broken\n')
    return path


def _no_key_jsonl(tmp_path):
    path = tmp_path / "nokey.jsonl"
    path.write_text('{"text": "fine"}\n\n{"body": "x", "id": 3}\n')
    return path


def _empty_txt(tmp_path):
    (tmp_path / "e1.txt").write_text("")
    return tmp_path / "e1.txt"


@pytest.mark.parametrize("case, make_args, message", [
    ("no inputs", lambda p, tok: ["-o", p / "o", "--train-tokenizer", "--vocab-size", 300],
     "no input files given"),
    ("missing file", lambda p, tok: ["-o", p / "o", "--tokenizer", tok, p / "nope.txt"],
     "nope.txt: no such file"),
    ("bad json", lambda p, tok: ["-o", p / "o", "--tokenizer", tok, _bad_jsonl(p)],
     "bad.jsonl:2: not valid JSON"),
    ("missing key", lambda p, tok: ["-o", p / "o", "--tokenizer", tok, _no_key_jsonl(p)],
     "nokey.jsonl:3: no key 'text' (keys: body, id); pass --jsonl-key"),
    ("empty corpus, training", lambda p, tok: ["-o", p / "o", "--train-tokenizer", "--vocab-size", 300, _empty_txt(p)],
     "the inputs hold no documents"),
    ("empty corpus, tokenizer", lambda p, tok: ["-o", p / "o", "--tokenizer", tok, _empty_txt(p)],
     "the inputs hold no documents"),
    ("vocab too small", lambda p, tok: ["-o", p / "o", "--train-tokenizer", "--vocab-size", 100, _empty_txt(p)],
     "vocab size 100 is too small: a byte-level BPE needs at least 257"),
    ("missing tokenizer", lambda p, tok: ["-o", p / "o", "--tokenizer", p / "tok.json", _empty_txt(p)],
     "tok.json: no such tokenizer file"),
    ("no vocab size", lambda p, tok: ["-o", p / "o", "--train-tokenizer", _empty_txt(p)],
     "--train-tokenizer needs --vocab-size"),
])
def test_preprocess_errors(tmp_path, corpus, capsys, case, make_args, message):
    """Each input/flag problem exits with status 2 and a message naming the problem and the fix; nothing is left
    at the output prefix."""
    assert cli(*make_args(tmp_path, f"{corpus['a']}.tokenizer.json")) == 2, case
    assert message in capsys.readouterr().err
    assert not [f for f in os.listdir(tmp_path) if f.startswith("o.") or f.startswith("o.tmp")]


def test_preprocess_refuses_to_overwrite(tmp_path, corpus, capsys):
    src = _write_jsonl(tmp_path / "x.jsonl", corpus["a_docs"][:5])
    tok = f"{corpus['a']}.tokenizer.json"
    assert cli("-o", tmp_path / "x", "--tokenizer", tok, src) == 0
    before = (tmp_path / "x.bin").read_bytes()
    assert cli("-o", tmp_path / "x", "--tokenizer", tok, _write_jsonl(tmp_path / "y.jsonl", ["other"])) == 2
    assert "x.bin already exists; choose another --output-prefix or pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "x.bin").read_bytes() == before
    assert cli("-o", tmp_path / "x", "--tokenizer", tok, "--overwrite", tmp_path / "y.jsonl") == 0
    assert (tmp_path / "x.bin").read_bytes() != before


# --- build_data -----------------------------------------------------------------------------------------------------


def _source(tok, batch):
    """Per sample: 0 if its text is from dataset A ("abcde" words), 1 if from B ("vwxyz")."""
    out = []
    for row in batch["input_ids"]:
        text = tok.decode(row).replace(tok.eod_token, "")
        a, b = any(c in text for c in "abcde"), any(c in text for c in "vwxyz")
        assert a != b, text
        out.append(int(b))
    return out


@pytest.mark.parametrize("weights", [[0.8, 0.2], []])
def test_blend_proportions(corpus, cache_dir, weights):
    """Samples come from each dataset in proportion to data.weights, or to its token count when none are given,
    over 2,000 samples (more than one epoch of B, so epochs repeat)."""
    cfg = _cfg(cache_dir, [corpus["a"], corpus["b"]], weights, steps=500)
    data = build_data(cfg)
    sources = [s for batch in data.train for s in _source(data.tokenizer, batch)]
    assert len(sources) == 2000
    if weights:
        expected = 0.2
    else:
        sizes = [data_mod._num_tokens(p) for p in (corpus["a"], corpus["b"])]
        expected = sizes[1] / sum(sizes)
    assert abs(np.mean(sources) - expected) < 0.01, (np.mean(sources), expected)


def test_batch_format_and_resume(corpus, cache_dir):
    """Batches are [mb, seq] input_ids/labels/loss_mask with labels = input_ids shifted by one; a fresh loader
    given the state after k batches yields exactly the batch the uninterrupted loader yields next."""
    cfg = _cfg(cache_dir, [corpus["a"], corpus["b"]], [0.5, 0.5], mbs=2, gbs=4, seq=16)
    ref = build_data(cfg).train
    batches = [next(ref) for _ in range(6)]
    b = batches[0]
    assert set(b) == {"input_ids", "labels", "loss_mask"}
    assert b["input_ids"].shape == b["labels"].shape == b["loss_mask"].shape == (2, 16)
    assert b["input_ids"].dtype == b["labels"].dtype == torch.long and b["loss_mask"].dtype == torch.float32
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])

    first = build_data(cfg).train
    for _ in range(3):
        next(first)
    state = first.state_dict()
    assert state == {"consumed_samples": 6}
    resumed = build_data(cfg).train
    resumed.load_state_dict(state)
    for k in range(3, 6):
        got = next(resumed)
        assert all(torch.equal(got[key], batches[k][key]) for key in got), k


def test_data_parallel_ranks_read_disjoint_slices(corpus, cache_dir):
    """dp_size=2: rank 0 and rank 1 read different halves of each micro-step; together they are exactly what one
    rank with twice the micro-batch reads."""
    cfg = _cfg(cache_dir, [corpus["a"], corpus["b"]], mbs=2, gbs=8)
    ranks = [build_data(cfg, dp_rank=r, dp_size=2) for r in (0, 1)]
    whole = build_data(_cfg(cache_dir, [corpus["a"], corpus["b"]], mbs=4, gbs=8), dp_size=1).train
    for _ in range(5):
        b0, b1 = next(ranks[0].train), next(ranks[1].train)
        rows0, rows1 = {tuple(r.tolist()) for r in b0["input_ids"]}, {tuple(r.tolist()) for r in b1["input_ids"]}
        assert not rows0 & rows1
        assert torch.equal(torch.cat([b0["input_ids"], b1["input_ids"]]), next(whole)["input_ids"])
    assert ranks[0].train.state_dict() == ranks[1].train.state_dict() == {"consumed_samples": 20}
    # Validation: run.eval_iters micro-batches for the job, split over the ranks (rank r: micro-batches r, r + 2,
    # ...), identical on every call; together exactly what one rank with the same micro-batch size evaluates.
    assert cfg.run.eval_iters == 4
    v0 = list(ranks[0].valid())
    assert len(v0) == 2
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(v0, ranks[0].valid(cfg.run.eval_iters)))
    assert len(list(ranks[0].valid(2))) == 1
    assert not torch.equal(v0[0]["input_ids"], next(ranks[1].valid())["input_ids"])
    one = list(build_data(cfg, dp_size=1).valid())
    assert len(one) == 4 and all(b["loss_mask"].all() for b in one)
    split = [b for pair in zip(v0, ranks[1].valid()) for b in pair]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(split, one, strict=True))
    # 3 micro-batches over 2 ranks: rank 1 runs a copy of micro-batch 0 with a zero loss mask (counted nowhere).
    r0, r1 = list(ranks[0].valid(3)), list(ranks[1].valid(3))
    assert len(r0) == len(r1) == 2
    assert [torch.equal(b["input_ids"], one[k]["input_ids"]) for b, k in zip(r0 + r1[:1], (0, 2, 1))] == [True] * 3
    assert torch.equal(r1[1]["input_ids"], one[0]["input_ids"]) and not r1[1]["loss_mask"].any()


@pytest.mark.parametrize("split, has_valid", [("100,0,0", False), ("80,10,10", True)])
def test_split_parts(corpus, cache_dir, split, has_valid):
    """No validation part: data.valid is None; a test part is accepted (and unused)."""
    data = build_data(_cfg(cache_dir, [corpus["a"], corpus["b"]], split=split))
    assert (data.valid is not None) == has_valid
    assert next(data.train)["input_ids"].shape == (2, 16)


def test_config_errors(corpus, cache_dir, tmp_path):
    """Errors name the key and the fix: vocabulary larger than the model's, a missing dataset, a split that gives
    a dataset no documents, data.tokenizer without data.prefixes."""
    with pytest.raises(ConfigError, match=r"model.vocab_size: 256 is smaller than the \d+ tokens of data.tokenizer"):
        build_data(_cfg(cache_dir, [corpus["a"]], overrides=["model.vocab_size=256"]))
    missing = str(tmp_path / "nothing")
    with pytest.raises(ConfigError, match=r"data.prefixes\[1\]: .*nothing.bin/.idx not found; run `dsv4-preprocess"):
        build_data(_cfg(cache_dir, [corpus["a"], missing]))
    with pytest.raises(ConfigError, match=r"data.split: '99.6,0.4,0' gives data.prefixes\[1\] .* no valid documents"):
        build_data(_cfg(cache_dir, [corpus["a"], corpus["b"]], split="99.6,0.4,0"))
    cfg = _cfg(cache_dir)
    cfg.data.tokenizer = f"{corpus['a']}.tokenizer.json"
    with pytest.raises(ConfigError, match="data.tokenizer: .* is set but data.prefixes is empty"):
        build_data(cfg)
    with pytest.raises(ConfigError, match="data.global_batch_size: 4 is not a multiple"):
        build_data(_cfg(cache_dir, [corpus["a"]], mbs=2, gbs=4), dp_size=4)


# --- the embedded corpus --------------------------------------------------------------------------------------------


def test_embedded_corpus_builds_once(cache_dir, monkeypatch):
    """The default data: built on the first call (real English prose and Python code), reused afterwards."""
    prefix = embedded_corpus(cache_dir, 1024)
    info = json.load(open(prefix + ".json"))
    assert info["documents"] > 100 and info["tokens"] > 500_000 and info["vocab_size"] == 1024
    mtime = os.path.getmtime(prefix + ".bin")

    def no_rebuild(*args):
        raise AssertionError("the embedded corpus was built again")

    monkeypatch.setattr(data_mod, "_build_embedded", no_rebuild)
    assert embedded_corpus(cache_dir, 1024) == prefix
    assert os.path.getmtime(prefix + ".bin") == mtime

    # build_data's default: the debug model's vocabulary (1024) trains the same corpus, so nothing is rebuilt.
    data = build_data(_cfg(cache_dir, seq=128))
    assert data.prefixes == [prefix] and data.tokenizer.vocab_size == 1024
    text = " ".join(data.tokenizer.decode(next(data.train)["input_ids"][i]) for i in range(2))
    text += " ".join(data.tokenizer.decode(b["input_ids"][0]) for b in data.valid())
    assert " the " in text and any(w in text for w in ("def ", "import ", "return ", "self"))


def _two_ranks(rank, world_size, cache_dir, prefixes):
    import torch.distributed as dist

    from dsv4.parallel.state import init_distributed

    groups = init_distributed()
    cfg = compose_config("debug", ["data.global_batch_size=8"])
    cfg.data.cache_dir, cfg.run.steps = cache_dir, 4
    data = build_data(cfg, groups.dp_rank, groups.dp_size)  # both ranks build the embedded corpus at once
    rows = [tuple(r.tolist()) for r in next(data.train)["input_ids"]]
    gathered = [None, None]
    dist.all_gather_object(gathered, rows)
    assert len(rows) == 4 and not set(gathered[0]) & set(gathered[1])
    assert not [p for p in os.listdir(os.path.join(cache_dir, "embedded")) if ".tmp-" in p]
    # A blend: megatron builds its BlendedDataset index on rank 0 behind a barrier, rank 1 then reads it.
    cfg.data.prefixes, cfg.data.weights, cfg.data.seq_length = prefixes, [0.5, 0.5], 16
    blended = build_data(cfg, groups.dp_rank, groups.dp_size)
    assert next(blended.train)["input_ids"].shape == (4, 16)


def test_two_ranks_build_concurrently(tmp_path, corpus):
    """Under torchrun-style launch (2 gloo ranks, fresh cache): the embedded corpus is built once behind the file
    lock while the other rank waits, megatron's index building passes its barriers, and the ranks read disjoint
    micro-batches."""
    from dist_utils import run_workers

    run_workers(_two_ranks, 2, str(tmp_path / "cache"), [corpus["a"], corpus["b"]], timeout=120)


# --- damaged or unfitting dataset files: refused at build time, naming the file and the fix -------------------------

def _copy_dataset(src: str, dst) -> str:
    dst.mkdir(parents=True, exist_ok=True)
    for suffix in (".bin", ".idx", ".tokenizer.json", ".stats.json"):
        shutil.copy(src + suffix, str(dst / "a") + suffix)
    return str(dst / "a")


def _truncate(path: str, drop: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - drop)


def _bad_magic(path: str) -> None:
    with open(path, "r+b") as f:
        f.write(b"NOTANIDX!")


@pytest.mark.parametrize("damage, message", [
    (lambda p: _truncate(p + ".bin", 6), r"a\.bin is \d+ bytes, its index .*a\.idx implies \d+ tokens .* truncated or "
                                         r"corrupted; make it again \(dsv4-preprocess --output-prefix .*--overwrite"),
    (lambda p: _truncate(p + ".idx", 8), r"a\.idx is \d+ bytes, its header \(\d+ sequences, \d+ documents\) implies "
                                         r"\d+: truncated or corrupted; make it again"),
    (lambda p: _truncate(p + ".idx", os.path.getsize(p + ".idx") - 20), r"a\.idx is not a megatron-core indexed "
                                                                        r"dataset index \(bad header: truncated\)"),
    (lambda p: _bad_magic(p + ".idx"), r"a\.idx is not a megatron-core indexed dataset index \(bad header: wrong "
                                       r"magic"),
], ids=["truncated-bin", "truncated-idx", "truncated-header", "bad-magic"])
def test_damaged_dataset_files_are_refused_at_build_time(corpus, cache_dir, tmp_path, damage, message):
    prefix = _copy_dataset(corpus["a"], tmp_path)
    damage(prefix)
    with pytest.raises(ConfigError, match=r"data.prefixes\[1\]: .*" + message):
        build_data(_cfg(cache_dir, [corpus["b"], prefix], weights=[0.5, 0.5]))


@pytest.mark.parametrize("record", [True, False], ids=["recorded-max", "scanned"])
def test_token_ids_beyond_the_vocabulary_are_refused(corpus, tmp_path, record):
    """Ids that the model cannot embed: from dsv4-preprocess's record, or (a dataset without it) from a scan that is
    cached, so a second start does not read the .bin again."""
    vocab = compose_config("debug").model.vocab_size
    prefix = str(tmp_path / "wide")
    write_indexed_dataset(prefix, [np.array([5, 7, 1, 0]), np.array([3, vocab + 4, 2])], vocab_size=65536)
    shutil.copy(corpus["a"] + ".tokenizer.json", prefix + ".tokenizer.json")
    if not record:
        os.remove(prefix + ".stats.json")
    cache = tmp_path / "cache"
    for _ in range(2):
        with pytest.raises(ConfigError, match=rf"model.vocab_size: .*wide.bin \(data.prefixes\[0\]\) holds token id "
                                              rf"{vocab + 4}, which the model's {vocab}-token vocabulary cannot embed"):
            build_data(_cfg(str(cache), [prefix]))
    scans = list((cache / "token_stats").glob("*.json")) if (cache / "token_stats").exists() else []
    assert len(scans) == (0 if record else 1)


def test_dsv4_train_refuses_a_truncated_dataset_in_one_line(corpus, cache_dir, tmp_path):
    prefix = _copy_dataset(corpus["a"], tmp_path / "data")
    _truncate(prefix + ".bin", 6)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "dsv4-train"), f"data.prefixes=[{prefix}]",
                           f"data.cache_dir={cache_dir}", f"run.output_dir={tmp_path / 'run'}", "run.steps=2",
                           "optim.warmup_steps=1", "data.seq_length=32", "data.micro_batch_size=2",
                           "data.global_batch_size=4", "run.eval_interval=0"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("dsv4-train:")]
    assert len(lines) == 1 and "a.bin is" in lines[0] and "truncated or corrupted" in lines[0], done.stderr[-3000:]
