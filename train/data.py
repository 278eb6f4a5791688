"""Training data: tokenizer, the embedded corpus, megatron-core datasets and the resumable per-rank loader.

    data = build_data(cfg, dp_rank, dp_size)      # collective when torch.distributed is initialized
    batch = next(data.train)                      # this rank's next micro-batch
    ckpt["data"] = data.train.state_dict()        # {"consumed_samples": n}; load_state_dict resumes at sample n
    for batch in data.valid(): ...                # this rank's share of run.eval_iters micro-batches (None: no split)

A batch is a dict of three [micro_batch_size, seq_length] tensors:
    input_ids  int64    tokens t_0 .. t_{s-1}
    labels     int64    tokens t_1 .. t_s (input_ids shifted left by one: the next-token targets)
    loss_mask  float32  1.0, or 0.0 where a label is padding (megatron pads only a split's last partial sample)
Sequences are packed across documents (each document ends with the end-of-document token); attention and
positions are not reset at document boundaries, as in DeepSeek-V3/V4 pre-training.

Data comes from `data.prefixes` (indexed datasets written by `dsv4-preprocess`) blended with `data.weights`, or, with
no prefixes, from the embedded corpus: CPython's documentation topics and standard-library sources, which every
machine has, tokenized with a byte-level BPE trained on them, built once into `data.cache_dir`. megatron-core's
`BlendedMegatronDatasetBuilder` does the train/valid/test split, the shuffling and the blending; its index files are
cached in `<cache_dir>/indices`.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import platform
import shutil
import struct
import sysconfig
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from dsv4.model.config import ConfigError

from .preprocess import (STATS_SUFFIX, PreprocessError, find_eod, load_tokenizer_file, tokenize_documents,
                         tokenizer_vocab_size, train_bpe, write_indexed_dataset)

Batch = Dict[str, torch.Tensor]


# --- tokenizer ------------------------------------------------------------------------------------------------------


class Tokenizer:
    """A Hugging Face `tokenizers.Tokenizer` with what the loop and megatron's GPTDataset read from it.

    megatron reads `eod` (end-of-document id), `vocab_size` and `unique_identifiers` (part of the hash that names
    its cached index files: here the tokenizer file's content hash, so moving the file keeps the cache valid).
    """

    def __init__(self, path: str, eod_token: Optional[str] = None):
        self.path = os.path.abspath(path)
        self._tokenizer = load_tokenizer_file(path)
        self.eod_token, self.eod = find_eod(self._tokenizer, eod_token)
        self.vocab_size = tokenizer_vocab_size(self._tokenizer)
        """Embedding rows this tokenizer needs (largest id + 1)."""
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        self.unique_identifiers = OrderedDict(
            [("class", f"{__name__}.Tokenizer"), ("sha256", digest), ("eod", self.eod)])

    def encode(self, text: str) -> List[int]:
        """Token ids of `text` (no end-of-document token added)."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens (the end-of-document token) are kept, so document breaks stay visible."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    # megatron's tokenizer interface calls them so.
    tokenize = encode
    detokenize = decode

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, eod={self.eod_token!r}={self.eod})"


def load_tokenizer(path: str, eod_token: Optional[str] = None) -> Tokenizer:
    """Load a tokenizer.json (as `dsv4-preprocess` stores beside each dataset); `eod_token` defaults to the first
    known end-of-document spelling it has (`<|endoftext|>`, `<|end_of_text|>`, `</s>`, ...)."""
    try:
        return Tokenizer(path, eod_token)
    except PreprocessError as e:
        raise ValueError(str(e)) from None


# --- the embedded corpus --------------------------------------------------------------------------------------------

EMBEDDED_VERSION = 1
"""Bump when the corpus selection or the tokenizer recipe changes: it is part of the cache key."""

EMBEDDED_MAX_BYTES = 4_000_000
"""UTF-8 bytes of text in the embedded corpus (the documentation topics plus as many stdlib files as fit)."""

EMBEDDED_MAX_VOCAB = 32768
"""Largest BPE trained on the embedded corpus: 4 MB of text supports no more merges usefully; a model with a larger
vocabulary just leaves the extra embedding rows unused."""

_STDLIB_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__",
                     "encodings",  # codec tables: kilobytes of hex literals
                     "pydoc_data"}  # the topics, already included as documents
_STDLIB_MAX_FILE_BYTES = 200_000  # a few generated giants would crowd out the rest


def embedded_documents(max_bytes: int = EMBEDDED_MAX_BYTES) -> List[str]:
    """The embedded corpus's documents, the same on every machine with the same Python: every documentation topic
    (`pydoc_data.topics`, sorted by name), then standard-library .py files (their code and docstrings) in a fixed
    pseudo-random order (sha1 of the relative path, so the cap takes files from all over the library rather than
    the first letters of the alphabet) until `max_bytes` is reached."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics) if topics[k]]
    total = sum(len(d.encode("utf-8")) for d in docs)
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        files += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith(".py")]
    files.sort(key=lambda rel: hashlib.sha1(rel.replace(os.sep, "/").encode()).hexdigest())
    for rel in files:
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        size = len(text.encode("utf-8"))
        if not text.strip() or size > _STDLIB_MAX_FILE_BYTES or total + size > max_bytes:
            continue
        docs.append(text)
        total += size
    return docs


def embedded_corpus(cache_dir: str, vocab_size: int, max_bytes: int = EMBEDDED_MAX_BYTES) -> str:
    """Prefix of the embedded corpus's indexed dataset (`<prefix>.bin/.idx/.tokenizer.json/.json`), built on the
    first call and cached under `cache_dir/embedded/<key>`; the key holds the corpus version, the Python version
    (whose library is the text), the BPE size (`min(vocab_size, EMBEDDED_MAX_VOCAB)`) and `max_bytes`.

    Safe for concurrent callers (ranks, jobs): a file lock lets one build while the others wait, and the build
    happens in a temporary folder renamed into place when complete, so a crash leaves nothing half-built.
    `<prefix>.json` records the build: documents, tokens, bytes, seconds.
    """
    from filelock import FileLock  # a dependency of torch

    vocab = min(vocab_size, EMBEDDED_MAX_VOCAB)
    key = f"v{EMBEDDED_VERSION}-py{platform.python_version()}-bpe{vocab}-{max_bytes}B"
    parent = os.path.join(os.path.expanduser(cache_dir), "embedded")
    final = os.path.join(parent, key)
    prefix = os.path.join(final, "corpus")
    if os.path.exists(prefix + ".json"):  # written last, so its presence means a complete build
        return prefix
    os.makedirs(parent, exist_ok=True)
    with FileLock(final + ".lock"):
        if not os.path.exists(prefix + ".json"):
            for stale in glob.glob(glob.escape(final) + ".tmp-*"):  # crashed builds; we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            tmp = f"{final}.tmp-{os.getpid()}"
            os.makedirs(tmp)
            _build_embedded(os.path.join(tmp, "corpus"), vocab, max_bytes)
            os.replace(tmp, final)
    return prefix


def _build_embedded(prefix: str, vocab_size: int, max_bytes: int) -> None:
    t0 = time.perf_counter()
    docs = embedded_documents(max_bytes)
    tokenizer = train_bpe(docs, vocab_size)
    _, eod = find_eod(tokenizer)
    n_docs, n_tokens = write_indexed_dataset(prefix, tokenize_documents(docs, tokenizer, eod),
                                             tokenizer_vocab_size(tokenizer))
    tokenizer.save(prefix + ".tokenizer.json")
    info = {"documents": n_docs, "tokens": n_tokens, "bytes": sum(len(d.encode("utf-8")) for d in docs),
            "vocab_size": tokenizer_vocab_size(tokenizer), "python": platform.python_version(),
            "build_seconds": round(time.perf_counter() - t0, 2)}
    with open(prefix + ".json", "w") as f:
        json.dump(info, f, indent=1)


# --- the loaders ----------------------------------------------------------------------------------------------------


def _collate(samples: List[Dict[str, torch.Tensor]], eod: Optional[int] = None) -> Batch:
    """Stack samples; with `eod` (data.document_mask) also `document_ids`: the number of end-of-document tokens
    before each position, so an EOD token belongs to the document it ends."""
    batch = {"input_ids": torch.stack([s["tokens"] for s in samples]),  # [mb, seq]
             "labels": torch.stack([s["labels"] for s in samples]),  # [mb, seq]
             "loss_mask": torch.stack([s["loss_mask"] for s in samples]).float()}  # [mb, seq]
    if eod is not None:
        ends = (batch["input_ids"] == eod).long()
        batch["document_ids"] = ends.cumsum(dim=1) - ends  # [mb, seq], non-decreasing
    return batch


class TrainLoader:
    """This data-parallel rank's micro-batches, in order, resumable at any micro-step.

    Samples are taken in dataset order: each micro-step consumes `micro_batch_size * dp_size` consecutive samples,
    and rank r reads the r-th slice of `micro_batch_size` of them, so the ranks' slices are disjoint and together
    cover every global batch (megatron's pre-training sampler does the same). `consumed_samples` counts samples of
    all ranks and is identical on every rank, so any rank's `state_dict()` resumes all of them. Iteration stops
    when the dataset (sized for run.steps) is exhausted.
    """

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 eod: Optional[int] = None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
        self.eod = eod
        """End-of-document id when batches carry `document_ids` (data.document_mask), else None."""
        self.dataset = dataset
        """The megatron dataset (GPTDataset, or BlendedDataset whose samples also carry `dataset_id`)."""
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = 0

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> Batch:
        step = self.micro_batch_size * self.dp_size
        if self.consumed_samples + step > len(self.dataset):
            raise StopIteration
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        batch = _collate([self.dataset[i] for i in range(start, start + self.micro_batch_size)], self.eod)
        self.consumed_samples += step
        return batch

    def state_dict(self) -> Dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        consumed = int(state["consumed_samples"])
        if consumed % (self.micro_batch_size * self.dp_size):
            raise ValueError(f"consumed_samples={consumed} is not a multiple of micro_batch_size x dp_size = "
                             f"{self.micro_batch_size * self.dp_size}; resume with the batch layout of the "
                             f"checkpoint or at a global-batch boundary")
        self.consumed_samples = consumed


def _valid_loader(dataset, micro_batch_size: int, dp_rank: int, dp_size: int,
                  eval_iters: int, eod: Optional[int] = None) -> Callable[..., Iterator[Batch]]:
    def valid(iters: Optional[int] = None) -> Iterator[Batch]:
        """This rank's share of the first `iters` (default run.eval_iters) validation micro-batches of the whole
        job: micro-batch k holds validation sequences k*mbs .. (k+1)*mbs - 1 and goes to data-parallel rank
        k % dp_size. Every layout with this micro-batch size so evaluates the same sequences, and every call the
        same batches (validation losses of different steps and layouts are comparable). When the micro-batches do
        not divide over the ranks, the ranks with one fewer run a copy of micro-batch 0 with a zero loss mask (the
        ranks must run as many forward passes: the expert-parallel all-to-all spans data-parallel ranks); no
        token of it counts (`evaluate` weighs micro-batches by their loss tokens). The validation set is sized
        for run.eval_iters; more iterations stop at its end."""
        total = min(eval_iters if iters is None else iters, len(dataset) // micro_batch_size)
        for i in range(-(-total // dp_size)):  # ceil: the same count on every rank
            k = i * dp_size + dp_rank
            start = (k if k < total else 0) * micro_batch_size
            batch = _collate([dataset[j] for j in range(start, start + micro_batch_size)], eod)
            if k >= total:
                batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
            yield batch
    return valid


@dataclass
class Data:
    """What `build_data` hands the training loop."""

    train: TrainLoader
    """Stateful iterator of this rank's training micro-batches (`state_dict`/`load_state_dict`)."""
    valid: Optional[Callable[..., Iterator[Batch]]]
    """valid(iters=run.eval_iters) -> iterator of this rank's share of the job's first `iters` validation
    micro-batches (the same on every call, the same sequences under every layout); None when data.split has no
    validation part."""
    tokenizer: Tokenizer
    """The tokenizer of the data (vocab_size, eod, encode/decode)."""
    prefixes: List[str]
    """The dataset prefixes used (the embedded corpus's when data.prefixes is empty)."""


# --- building -------------------------------------------------------------------------------------------------------


def build_data(cfg, dp_rank: int = 0, dp_size: int = 1) -> Data:
    """Datasets, tokenizer and loaders for `cfg` (a DSV4Config) on data-parallel rank `dp_rank` of `dp_size`.

    Train samples: run.steps x data.global_batch_size; validation samples: run.eval_iters x micro_batch_size,
    whatever the data-parallel size (split over the ranks; the same batches are evaluated each time). When torch.distributed is initialized every rank must
    call this (megatron builds the index files on global rank 0 first, behind a barrier).
    Raises ConfigError naming the key for missing datasets, a tokenizer larger than model.vocab_size, a split that
    leaves a dataset without documents, or a batch layout that does not divide.
    """
    from hydra.utils import to_absolute_path  # relative to the launch folder, also after Hydra changed directory
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    d, run = cfg.data, cfg.run
    if d.global_batch_size % (d.micro_batch_size * dp_size):
        raise ConfigError(f"data.global_batch_size: {d.global_batch_size} is not a multiple of "
                          f"data.micro_batch_size={d.micro_batch_size} x {dp_size} data-parallel ranks")
    cache_dir = to_absolute_path(os.path.expanduser(d.cache_dir))

    if d.prefixes:
        prefixes = [to_absolute_path(os.path.expanduser(p)) for p in d.prefixes]
        for i, p in enumerate(prefixes):
            if not (os.path.isfile(p + ".bin") and os.path.isfile(p + ".idx")):
                raise ConfigError(f"data.prefixes[{i}]: {p}.bin/.idx not found; run `dsv4-preprocess "
                                  f"--output-prefix {p} --train-tokenizer --vocab-size N <text files>` (or "
                                  f"--tokenizer tokenizer.json) to create it, or fix the path")
        tokenizer_path = to_absolute_path(os.path.expanduser(d.tokenizer)) if d.tokenizer \
            else prefixes[0] + ".tokenizer.json"
        if not os.path.isfile(tokenizer_path):
            raise ConfigError(f"data.tokenizer: {tokenizer_path} not found; set data.tokenizer to the tokenizer.json "
                              f"the datasets were made with")
    else:
        if d.tokenizer:
            raise ConfigError(f"data.tokenizer: {d.tokenizer!r} is set but data.prefixes is empty; the embedded "
                              f"corpus brings its own tokenizer: unset data.tokenizer, or preprocess your text with "
                              f"it (dsv4-preprocess --tokenizer) and list the result in data.prefixes")
        try:
            prefixes = [embedded_corpus(cache_dir, cfg.model.vocab_size)]
        except PreprocessError as e:
            raise ConfigError(f"model.vocab_size: the embedded corpus cannot be tokenized: {e}") from None
        tokenizer_path = prefixes[0] + ".tokenizer.json"

    try:
        tokenizer = load_tokenizer(tokenizer_path)
    except ValueError as e:
        raise ConfigError(f"data.tokenizer: {e}") from None
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the {tokenizer.vocab_size} "
                          f"tokens of data.tokenizer ({tokenizer_path}); set model.vocab_size >= "
                          f"{tokenizer.vocab_size} or use a tokenizer with fewer tokens")

    for i, prefix in enumerate(prefixes):
        check_dataset_files(prefix, f"data.prefixes[{i}]" if d.prefixes else "the embedded corpus",
                            cfg.model.vocab_size, cache_dir)
    weights = _blend_weights(prefixes, list(d.weights))
    _check_split(prefixes, d.split, from_embedded=not d.prefixes)
    train_samples = run.steps * d.global_batch_size
    valid_samples = run.eval_iters * d.micro_batch_size  # the job's, not a rank's: the same set under every layout
    config = GPTDatasetConfig(
        random_seed=run.seed, sequence_length=d.seq_length, blend=(prefixes, weights), split=d.split,
        path_to_cache=os.path.join(cache_dir, "indices"), tokenizer=tokenizer,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, [train_samples, valid_samples, 0], lambda: True, config)
    with _index_build_lock(config.path_to_cache), _rank_zero_without_process_group():
        train_ds, valid_ds, _ = builder.build()

    eod = tokenizer.eod if d.document_mask else None
    valid = None if valid_ds is None else _valid_loader(valid_ds, d.micro_batch_size, dp_rank, dp_size,
                                                         run.eval_iters, eod)
    return Data(train=TrainLoader(train_ds, d.micro_batch_size, dp_rank, dp_size, eod), valid=valid,
                tokenizer=tokenizer, prefixes=prefixes)


_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = 34  # magic 9, version <Q, dtype code <B, sequence count <Q, document count <Q
_IDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}  # megatron-core's DType codes
_SCAN_CHUNK = 1 << 24  # token ids per read when a .bin has to be scanned for its largest id (bounded memory)


def check_dataset_files(prefix: str, name: str, vocab_size: int, cache_dir: str) -> None:
    """`<prefix>.idx/.bin` are a whole megatron-core indexed dataset whose token ids fit `vocab_size`, or a
    ConfigError naming `name` (the key), the file and the fix. Cheap: the index header and its length array are
    read, the .bin only by its size; the largest id comes from `<prefix>.stats.json` (written by dsv4-preprocess).
    A dataset without that record (made by other tools, or before it existed) is scanned once in chunks and the
    result cached under `<cache_dir>/token_stats/`, keyed by the file's path, size and modification time."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    remake = (f"make it again (dsv4-preprocess --output-prefix {prefix} --overwrite ...), or copy it again if it "
              f"was copied")
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        header = f.read(_IDX_HEADER)
    if len(header) < _IDX_HEADER or header[:9] != _IDX_MAGIC or struct.unpack("<Q", header[9:17])[0] != 1 \
            or header[17] not in _IDX_DTYPES:
        raise ConfigError(f"{name}: {idx} is not a megatron-core indexed dataset index (bad header: "
                          f"{'truncated' if len(header) < _IDX_HEADER else 'wrong magic, version or dtype'}); "
                          f"{remake}")
    dtype = np.dtype(_IDX_DTYPES[header[17]])
    sequences, documents = struct.unpack("<QQ", header[18:34])
    expected = _IDX_HEADER + sequences * (4 + 8) + documents * 8
    if size != expected:
        raise ConfigError(f"{name}: {idx} is {size} bytes, its header ({sequences} sequences, {documents} "
                          f"documents) implies {expected}: truncated or corrupted; {remake}")
    lengths = np.fromfile(idx, dtype=np.int32, count=sequences, offset=_IDX_HEADER)
    tokens = int(lengths.sum(dtype=np.int64))
    bin_size = os.path.getsize(bin_)
    if lengths.min(initial=0) < 0 or bin_size != tokens * dtype.itemsize:
        raise ConfigError(f"{name}: {bin_} is {bin_size} bytes, its index {idx} implies {tokens} tokens x "
                          f"{dtype.itemsize} bytes = {tokens * dtype.itemsize}: truncated or corrupted; {remake}")
    max_id = _max_token_id(prefix, bin_size, dtype, cache_dir)
    if max_id >= vocab_size:
        raise ConfigError(f"model.vocab_size: {bin_} ({name}) holds token id {max_id}, which the model's "
                          f"{vocab_size}-token vocabulary cannot embed; set model.vocab_size > {max_id} (the "
                          f"tokenizer's size), or tokenize the text again with a smaller tokenizer")


def _max_token_id(prefix: str, bin_size: int, dtype: np.dtype, cache_dir: str) -> int:
    """The largest token id of `<prefix>.bin`: recorded by dsv4-preprocess, else scanned once and cached."""
    from filelock import FileLock  # a dependency of torch

    stats = prefix + STATS_SUFFIX
    if os.path.isfile(stats):
        with open(stats) as f:
            record = json.load(f)
        if record.get("bin_bytes") == bin_size:
            return int(record["max_token_id"])
    bin_ = os.path.realpath(prefix + ".bin")
    key = hashlib.sha256(f"{bin_}:{bin_size}:{os.stat(bin_).st_mtime_ns}".encode()).hexdigest()[:24]
    folder = os.path.join(cache_dir, "token_stats")
    os.makedirs(folder, exist_ok=True)
    cached = os.path.join(folder, key + ".json")
    with FileLock(cached + ".lock"):  # one rank (or job) scans, the others read its result
        if not os.path.isfile(cached):
            ids = np.memmap(bin_, dtype=dtype, mode="r")
            max_id = max((int(ids[i:i + _SCAN_CHUNK].max()) for i in range(0, len(ids), _SCAN_CHUNK)), default=-1)
            with open(cached + ".tmp", "w") as f:
                json.dump({"bin": bin_, "bin_bytes": bin_size, "max_token_id": max_id}, f)
            os.replace(cached + ".tmp", cached)
        with open(cached) as f:
            return int(json.load(f)["max_token_id"])


def _blend_weights(prefixes: List[str], weights: List[float]) -> Optional[List[float]]:
    """megatron's blend weights: None for one dataset; the given weights; or, when none are given, each dataset's
    token count. (megatron's own default, None, blends by size but caps the blend at one epoch of every dataset,
    which a long run would exhaust; explicit weights make it repeat epochs as needed.)"""
    if len(prefixes) == 1:
        return None
    if weights:
        return [float(w) for w in weights]
    return [float(_num_tokens(p)) for p in prefixes]


def _num_tokens(prefix: str) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)  # keep it alive: its arrays are views of a memory map it closes on deletion
    return int(dataset.sequence_lengths.sum(dtype=np.int64))


def _check_split(prefixes: List[str], split: str, from_embedded: bool) -> None:
    """Every dataset must get documents in each non-empty part of data.split: megatron would loop forever drawing
    samples from an empty part."""
    from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                         parse_and_normalize_split)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for i, prefix in enumerate(prefixes):
        n = len(IndexedDataset(prefix))
        for part, bounds in zip(("train", "valid", "test"), matrix):
            if bounds is None:
                continue
            docs = int(round(bounds[1] * n)) - int(round(bounds[0] * n))
            if docs == 0:
                name = "the embedded corpus" if from_embedded else f"data.prefixes[{i}] ({prefix})"
                raise ConfigError(f"data.split: {split!r} gives {name}, {n} documents, no {part} documents; "
                                  f"enlarge the {part} part (e.g. '90,10,0'), set it to 0, or add documents")


@contextlib.contextmanager
def _index_build_lock(path_to_cache: str):
    """Serialize index building between independent jobs sharing the cache (megatron writes its .npy files in
    place). Only global rank 0 takes the lock: the other ranks of a job wait for it in megatron's barriers, and
    only read the files once rank 0 has passed them."""
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        yield
        return
    from filelock import FileLock

    os.makedirs(path_to_cache, exist_ok=True)
    with FileLock(os.path.join(path_to_cache, ".build.lock")):
        yield


@contextlib.contextmanager
def _rank_zero_without_process_group():
    """megatron's BlendedDataset asks `torch.distributed.get_rank()` on an index-cache miss even when no process
    group exists (a single process, a notebook) and fails there; answer 0 for the duration of the build then.
    With a process group this does nothing."""
    if torch.distributed.is_initialized():
        yield
        return
    get_rank = torch.distributed.get_rank
    torch.distributed.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        torch.distributed.get_rank = get_rank
