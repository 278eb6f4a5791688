"""`dsv4-preprocess`: text files -> a megatron-core indexed dataset (`<prefix>.bin/.idx`) of token ids.

    dsv4-preprocess --output-prefix data/books --train-tokenizer --vocab-size 32000 books/*.txt
    dsv4-preprocess --output-prefix data/web --tokenizer data/books.tokenizer.json --workers 8 web/*.jsonl
    dsv4-preprocess --output-prefix data/qa --tokenizer tok.json --jsonl-key content qa.jsonl

Inputs: a `.txt` file is one document; a `.jsonl` file holds one JSON object per line with the document's text
under `--jsonl-key` (default "text"); a directory stands for the .txt/.jsonl files below it (sorted). Every document
is written as one sequence with the end-of-document token appended. The tokenizer used (a `tokenizer.json` given
with `--tokenizer`, or a byte-level BPE trained on the inputs with `--train-tokenizer --vocab-size N`) is always
stored beside the dataset as `<prefix>.tokenizer.json`, which is where training looks for it. `<prefix>.stats.json`
records the largest token id (and the .bin size it was counted on), so that training checks it against
model.vocab_size at start-up without reading the .bin.

The pieces are functions that `dsv4.train.data` reuses for the embedded corpus: `read_documents` -> `train_bpe` ->
`tokenize_documents` -> `write_indexed_dataset`. Problems with the inputs or flags raise `PreprocessError`, whose
message names the problem and the fix; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import sys
import time
import warnings
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

# megatron-core warns once per module that TransformerEngine/apex are absent; on CPU that is expected.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

EOD_TOKEN = "<|endoftext|>"
"""The end-of-document token of the tokenizers this module trains."""

KNOWN_EOD_TOKENS = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
"""End-of-document spellings looked for, in order, in a tokenizer.json brought by the user."""

MIN_BPE_VOCAB = 256 + 1
"""A byte-level BPE holds the 256 byte symbols plus the end-of-document token before its first merge."""

STATS_SUFFIX = ".stats.json"
"""`<prefix>.stats.json`: the largest token id, documents, tokens and .bin size of a dataset, written with it."""
DATASET_SUFFIXES = (".bin", ".idx", ".tokenizer.json", STATS_SUFFIX)
"""The files `dsv4-preprocess` writes for one output prefix."""


class PreprocessError(Exception):
    """A problem with the inputs or flags; the message names it and the fix (the CLI exits with status 2)."""


# --- reading --------------------------------------------------------------------------------------------------------


def input_files(paths: Sequence[str]) -> List[str]:
    """The .txt/.jsonl files named by `paths` (a directory: the ones below it, sorted), checked to exist."""
    if not paths:
        raise PreprocessError("no input files given; name .txt/.jsonl files or directories after the options")
    files: List[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                           if f.endswith((".txt", ".jsonl")))
            if not found:
                raise PreprocessError(f"{path}: directory holds no .txt or .jsonl files")
            files.extend(found)
        elif not os.path.isfile(path):
            raise PreprocessError(f"{path}: no such file; check the path (inputs are .txt/.jsonl files or directories)")
        elif not path.endswith((".txt", ".jsonl")):
            raise PreprocessError(f"{path}: unknown input type; use .txt (one document per file) or .jsonl "
                                  f"(one JSON object per line)")
        else:
            files.append(path)
    return files


def read_documents(files: Sequence[str], jsonl_key: str = "text") -> Iterator[str]:
    """Documents in input order: a whole .txt file, or `obj[jsonl_key]` of each line of a .jsonl file.

    Empty documents (and blank JSONL lines) are skipped: they would be a lone end-of-document token.
    """
    for path in files:
        if path.endswith(".txt"):
            text = _read_text(path)
            if text:
                yield text
            continue
        with open(path, "rb") as f:  # lines decoded one by one, so a bad byte is reported at its line
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise PreprocessError(f"{path}:{lineno}: not UTF-8 text ({e.reason}); convert the file to "
                                          f"UTF-8") from None
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PreprocessError(f"{where}: not valid JSON ({e.msg}, column {e.colno}); each line of a "
                                          f".jsonl file must be one JSON object") from None
                if not isinstance(obj, dict):
                    raise PreprocessError(f"{where}: a JSON {type(obj).__name__}, not an object; each line must "
                                          f"be an object like {{\"{jsonl_key}\": \"...\"}}")
                if jsonl_key not in obj:
                    keys = ", ".join(map(str, list(obj)[:8])) or "none"
                    raise PreprocessError(f"{where}: no key {jsonl_key!r} (keys: {keys}); pass --jsonl-key with "
                                          f"the key that holds the text")
                text = obj[jsonl_key]
                if not isinstance(text, str):
                    raise PreprocessError(f"{where}: {jsonl_key!r} holds a {type(text).__name__}, not a string")
                if text:
                    yield text


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise PreprocessError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None


# --- tokenizer ------------------------------------------------------------------------------------------------------


def train_bpe(documents: Iterable[str], vocab_size: int, eod_token: str = EOD_TOKEN, show_progress: bool = False):
    """A byte-level BPE `tokenizers.Tokenizer` of at most `vocab_size` tokens trained on `documents`.

    GPT-2 style: text is split into words by the ByteLevel pre-tokenizer (which maps every byte to a symbol, so any
    text encodes and `decode(encode(text)) == text`), merges are learned within words, and `eod_token` is a special
    token (id 0). A small corpus may yield fewer tokens than `vocab_size` when it runs out of pairs to merge.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    check_bpe_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eod_token], show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


def check_bpe_vocab_size(vocab_size: int) -> None:
    """Reject a vocabulary too small for a byte-level BPE (before any corpus is read)."""
    if vocab_size < MIN_BPE_VOCAB:
        raise PreprocessError(f"vocab size {vocab_size} is too small: a byte-level BPE needs at least "
                              f"{MIN_BPE_VOCAB} (256 bytes + the end-of-document token); use e.g. 8192 or 32000")


def find_eod(tokenizer, eod_token: Optional[str] = None) -> Tuple[str, int]:
    """(token, id) of the end-of-document token: `eod_token`, or the first of KNOWN_EOD_TOKENS the tokenizer has."""
    candidates = (eod_token,) if eod_token else KNOWN_EOD_TOKENS
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token, token_id
    if eod_token:
        raise PreprocessError(f"the tokenizer has no token {eod_token!r}; pass --eod-token with its "
                              f"end-of-document token")
    raise PreprocessError(f"the tokenizer has none of the end-of-document tokens {list(KNOWN_EOD_TOKENS)}; pass "
                          f"--eod-token with the one it uses")


def load_tokenizer_file(path: str):
    """`tokenizers.Tokenizer.from_file(path)` with an error that names the file."""
    from tokenizers import Tokenizer

    if not os.path.isfile(path):
        raise PreprocessError(f"{path}: no such tokenizer file; give a Hugging Face tokenizer.json or use "
                              f"--train-tokenizer --vocab-size N")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise PreprocessError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None


def tokenizer_vocab_size(tokenizer) -> int:
    """Embedding rows the tokenizer needs: its largest id + 1 (ids of a user tokenizer may have gaps)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


# --- tokenizing -----------------------------------------------------------------------------------------------------

_WORKER_TOKENIZER = None


def _init_worker(tokenizer_json: str) -> None:
    global _WORKER_TOKENIZER
    from tokenizers import Tokenizer

    _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)


def _encode_chunk(chunk: List[str]) -> List[np.ndarray]:
    return _encode(_WORKER_TOKENIZER, chunk)


def _encode(tokenizer, chunk: List[str]) -> List[np.ndarray]:
    # No special tokens are added: the end-of-document token is appended by tokenize_documents.
    return [np.asarray(e.ids, dtype=np.int64) for e in tokenizer.encode_batch(chunk, add_special_tokens=False)]


def _chunks(items: Iterable[str], size: int) -> Iterator[List[str]]:
    chunk: List[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def tokenize_documents(documents: Iterable[str], tokenizer, eod_id: int, workers: int = 1,
                       chunk_size: int = 64) -> Iterator[np.ndarray]:
    """Token ids of each document with `eod_id` appended, in input order.

    `workers > 1` encodes chunks of `chunk_size` documents in a process pool. Chunks are submitted with a bounded
    look-ahead (2 per worker) rather than `Pool.imap`, whose feeder thread would read the whole corpus into memory
    ahead of the writer; the results are taken in submission order, so the output order equals the input order.
    With one worker, `encode_batch` already spreads a chunk over the cores (tokenizers' own thread pool).
    """
    eod = np.asarray([eod_id], dtype=np.int64)
    if workers <= 1:
        for chunk in _chunks(documents, chunk_size):
            for ids in _encode(tokenizer, chunk):
                yield np.concatenate([ids, eod])
        return
    # spawn, not fork: the parent may already run tokenizers' threads (training), which a fork would copy mid-use.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer.to_str(),)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in _chunks(documents, chunk_size):
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= 2 * workers:
                for ids in pending.popleft().get():
                    yield np.concatenate([ids, eod])
        while pending:
            for ids in pending.popleft().get():
                yield np.concatenate([ids, eod])


class Progress:
    """Documents/tokens done: a tqdm bar on a terminal (when tqdm is installed), else a plain line every
    `interval` seconds (log files of batch jobs get no carriage-return spam)."""

    def __init__(self, desc: str, enabled: bool = True, interval: float = 10.0):
        self.desc, self.enabled, self.interval = desc, enabled, interval
        self.docs = self.tokens = self.lines = 0
        self.start = self.last = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(desc=desc, unit=" docs", file=sys.stderr)
            except ImportError:
                pass

    def update(self, tokens: int) -> None:
        if self.docs == 0:  # the clock starts at the first document, after imports and tokenizer training
            self.start = self.last = time.perf_counter()
        self.docs += 1
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(1)
            if self.docs % 256 == 0:
                self.bar.set_postfix(tokens=f"{self.tokens:,}", refresh=False)
        elif self.enabled and time.perf_counter() - self.last >= self.interval:
            self.last = time.perf_counter()
            self._line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix(tokens=f"{self.tokens:,}", refresh=False)
            self.bar.close()
        elif self.enabled and self.lines:  # a short job gets only the caller's summary
            self._line()

    def _line(self) -> None:
        self.lines += 1
        elapsed = time.perf_counter() - self.start
        print(f"{self.desc}: {self.docs:,} documents, {self.tokens:,} tokens, {elapsed:.1f}s "
              f"({self.docs / max(elapsed, 1e-9):,.0f} docs/s)", file=sys.stderr, flush=True)


# --- writing --------------------------------------------------------------------------------------------------------


def write_indexed_dataset(prefix: str, token_docs: Iterable[np.ndarray], vocab_size: int,
                          progress: Optional[Progress] = None) -> Tuple[int, int]:
    """Write `<prefix>.bin/.idx` (one sequence per document); return (documents, tokens).

    Token ids are stored as uint16 when the vocabulary fits, else int32 (megatron's choice). The files are written
    under a temporary name and renamed at the end, so an interrupted run leaves no half-written dataset behind.
    Zero documents raise PreprocessError (an empty corpus cannot train anything).
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    tmp = f"{prefix}.tmp-{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=DType.optimal_dtype(vocab_size))
    n_docs = n_tokens = 0
    max_id = -1
    try:
        for ids in token_docs:
            builder.add_document(ids, [len(ids)])
            n_docs += 1
            n_tokens += len(ids)
            max_id = max(max_id, int(np.max(ids))) if len(ids) else max_id
            if progress is not None:
                progress.update(len(ids))
        builder.finalize(tmp + ".idx")
        if n_docs == 0:
            raise PreprocessError("the inputs hold no documents (every file or JSONL text is empty); check the "
                                  "input files and --jsonl-key")
        with open(tmp + STATS_SUFFIX, "w") as f:  # read at training start-up: no scan of the .bin is needed there
            json.dump({"max_token_id": max_id, "documents": n_docs, "tokens": n_tokens,
                       "bin_bytes": os.path.getsize(tmp + ".bin")}, f)
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")
        os.replace(tmp + STATS_SUFFIX, prefix + STATS_SUFFIX)
    finally:
        builder.data_file.close()
        for suffix in (".bin", ".idx", STATS_SUFFIX):
            if os.path.exists(tmp + suffix):
                os.remove(tmp + suffix)
    return n_docs, n_tokens


def preprocess(files: Sequence[str], output_prefix: str, tokenizer_path: Optional[str] = None,
               vocab_size: Optional[int] = None, jsonl_key: str = "text", eod_token: Optional[str] = None,
               workers: int = 1, overwrite: bool = False, progress: bool = True) -> dict:
    """The whole job (see the module docstring); returns a summary dict (documents, tokens, vocab_size, ...).

    Exactly one of `tokenizer_path` (a tokenizer.json) and `vocab_size` (train a byte-level BPE) is given.
    """
    t0 = time.perf_counter()
    files = input_files(files)
    existing = [output_prefix + s for s in DATASET_SUFFIXES if os.path.exists(output_prefix + s)]
    if existing and not overwrite:
        raise PreprocessError(f"{existing[0]} already exists; choose another --output-prefix or pass --overwrite")
    if tokenizer_path is not None:
        tokenizer = load_tokenizer_file(tokenizer_path)
    elif vocab_size is None:
        raise PreprocessError("give a tokenizer.json (--tokenizer) or a vocabulary size to train one "
                              "(--train-tokenizer --vocab-size N)")
    else:
        check_bpe_vocab_size(vocab_size)
        if next(read_documents(files, jsonl_key), None) is None:
            raise PreprocessError("the inputs hold no documents (every file or JSONL text is empty); check the "
                                  "input files and --jsonl-key")
        tokenizer = train_bpe(read_documents(files, jsonl_key), vocab_size, eod_token or EOD_TOKEN,
                              show_progress=progress and sys.stderr.isatty())
    eod, eod_id = find_eod(tokenizer, eod_token)
    vocab = tokenizer_vocab_size(tokenizer)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)

    bar = Progress("dsv4-preprocess", enabled=progress)
    token_docs = tokenize_documents(read_documents(files, jsonl_key), tokenizer, eod_id, workers=workers)
    try:
        n_docs, n_tokens = write_indexed_dataset(output_prefix, token_docs, vocab, bar)
    finally:
        bar.close()
    tokenizer.save(output_prefix + ".tokenizer.json")
    return {"output_prefix": output_prefix, "files": len(files), "documents": n_docs, "tokens": n_tokens,
            "vocab_size": vocab, "eod_token": eod, "eod_id": eod_id, "seconds": time.perf_counter() - t0}


# --- command line ---------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    usage, inputs = __doc__.split("\n\n")[1:3]
    p = argparse.ArgumentParser(prog="dsv4-preprocess", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=f"{usage}\n\n{inputs}")
    p.add_argument("inputs", nargs="*", help=".txt / .jsonl files, or directories holding them")
    p.add_argument("--output-prefix", "-o", required=True, help="writes <prefix>.bin, .idx and .tokenizer.json")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="a Hugging Face tokenizer.json to encode with")
    tok.add_argument("--train-tokenizer", action="store_true", help="train a byte-level BPE on the inputs")
    p.add_argument("--vocab-size", type=int, help="with --train-tokenizer: tokens of the BPE (e.g. 32000)")
    p.add_argument("--jsonl-key", default="text", help="the key of a JSONL object that holds the text (default: text)")
    p.add_argument("--eod-token", help=f"end-of-document token (default: {EOD_TOKEN} when training; for --tokenizer "
                                       f"the first of {', '.join(KNOWN_EOD_TOKENS)} it has)")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (default: 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at the output prefix")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    args = p.parse_args(argv)
    if args.train_tokenizer and args.vocab_size is None:
        p.error("--train-tokenizer needs --vocab-size N (e.g. 32000)")
    if args.tokenizer and args.vocab_size is not None:
        p.error("--vocab-size only applies to --train-tokenizer; the vocabulary of --tokenizer is fixed")
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        summary = preprocess(args.inputs, args.output_prefix, tokenizer_path=args.tokenizer,
                             vocab_size=args.vocab_size, jsonl_key=args.jsonl_key, eod_token=args.eod_token,
                             workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress)
    except PreprocessError as e:
        print(f"dsv4-preprocess: error: {e}", file=sys.stderr)
        return 2
    print(f"dsv4-preprocess: wrote {summary['output_prefix']}.bin/.idx: {summary['documents']:,} documents, "
          f"{summary['tokens']:,} tokens from {summary['files']} files; tokenizer ({summary['vocab_size']:,} tokens, "
          f"end of document {summary['eod_token']!r} = {summary['eod_id']}) in {summary['output_prefix']}"
          f".tokenizer.json; {summary['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
