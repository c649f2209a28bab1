"""Tokenize a document stream once into flat token shards plus a JSON index.

Layout of an output directory::

    index.json           # dtype, tokenizer hash, source, shard list (file, tokens, docs), complete flag
    shard_00000.bin      # raw little-endian uint16 (vocab <= 65536) or uint32 token ids;
    shard_00001.bin      # open with np.memmap(path, dtype=index.dtype, mode="r")

Each document is encoded and followed by the EOS id, so a shard is ``doc EOS doc EOS ...``.

Documents are cut into shards by a character budget (``shard_chars``), in stream order, so shard
``i`` always holds the same documents for the same input. That makes the work parallel (each shard is
tokenized by a worker process), deterministic (independent of ``workers``), and resumable: a shard
file is written atomically (temp file + ``os.replace``) and only then recorded in ``index.json``; a
rerun after a crash or kill skips the recorded shards and tokenizes the rest. A completed index is
returned at once without reading the documents again.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from mobilemoe.data.readers import DataError
from mobilemoe.data.tokenizer import Tokenizer
from mobilemoe.utils import atomic_path, atomic_write_text

INDEX_NAME = "index.json"
FORMAT_VERSION = 1
DEFAULT_SHARD_CHARS = 2_000_000  # ~0.5M tokens of code (~1 MB as uint16): enough shards to use all workers


@dataclass
class ShardInfo:
    """One finished shard: its file name (relative to the index), token and document counts."""

    file: str
    tokens: int
    docs: int


@dataclass
class ShardIndex:
    """The content of ``index.json``; ``directory`` is where it lives (not serialized)."""

    dtype: str
    vocab_size: int
    eos_id: int
    tokenizer_sha256: str
    source: str
    shard_chars: int
    shards: list[ShardInfo] = field(default_factory=list)
    complete: bool = False
    format: int = FORMAT_VERSION
    directory: Path = field(default=Path("."), compare=False)

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def arrays(self) -> list[np.memmap]:
        """Read-only memory maps of every shard, in order (empty shards are left out)."""
        return [np.memmap(self.directory / s.file, dtype=self.dtype, mode="r") for s in self.shards if s.tokens]

    def save(self) -> None:
        data = asdict(self)
        data.pop("directory")
        data["total_tokens"] = self.total_tokens  # for humans; recomputed on load
        atomic_write_text(self.directory / INDEX_NAME, json.dumps(data, indent=1) + "\n")

    def settings(self) -> dict:
        """The fields that must match for a rerun to resume (rather than clash with) this index."""
        return {k: getattr(self, k) for k in ("format", "dtype", "tokenizer_sha256", "source", "shard_chars")}


def load_index(directory: str | os.PathLike, require_complete: bool = True) -> ShardIndex:
    """Read ``directory/index.json``; by default a :class:`DataError` if sharding did not finish."""
    directory = Path(directory)
    path = directory / INDEX_NAME
    if not path.is_file():
        raise DataError(f"{path}: no shard index (run shard_documents first)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data.pop("total_tokens", None)
        shards = [ShardInfo(**s) for s in data.pop("shards")]
        index = ShardIndex(**data, shards=shards, directory=directory)
    except (json.JSONDecodeError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: corrupt shard index ({exc}); delete the directory and shard again") from None
    if require_complete and not index.complete:
        raise DataError(f"{path}: sharding is incomplete; rerun shard_documents with the same inputs to finish it")
    return index


def token_dtype(vocab_size: int) -> str:
    """Smallest unsigned dtype that holds every id of a ``vocab_size`` vocabulary."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def _chunk_documents(docs: Iterable[str], shard_chars: int) -> Iterator[list[str]]:
    """Group documents (stream order) into lists of at least ``shard_chars`` characters (last may be short)."""
    chunk: list[str] = []
    size = 0
    for doc in docs:
        if not doc:
            continue
        chunk.append(doc)
        size += len(doc)
        if size >= shard_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# Per-process worker state, set once by _init_worker (avoids pickling the tokenizer per task).
_WORKER: dict = {}


def _init_worker(tokenizer_json: str, directory: str, dtype: str) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    tok = Tokenizer(HFTokenizer.from_str(tokenizer_json))
    _WORKER.update(tokenizer=tok, eos=tok.eos_id, directory=Path(directory), dtype=dtype)


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.bin"


def _tokenize_shard(task: tuple[int, list[str]]) -> ShardInfo:
    """Encode one chunk of documents, append EOS after each, write the shard atomically."""
    i, docs = task
    tok, eos = _WORKER["tokenizer"], _WORKER["eos"]
    ids: list[int] = []
    for doc_ids in tok.encode_batch(docs):
        ids.extend(doc_ids)
        ids.append(eos)
    name = _shard_name(i)
    with atomic_path(_WORKER["directory"] / name) as tmp:
        np.asarray(ids, dtype=_WORKER["dtype"]).tofile(tmp)
    return ShardInfo(name, len(ids), len(docs))


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _run_tasks(tasks: Iterator[tuple[int, list[str]]], workers: int, initargs: tuple) -> Iterator[ShardInfo]:
    """Run ``_tokenize_shard`` over ``tasks``, yielding results in task order.

    At most ``2 * workers`` tasks are in flight, so memory stays bounded however long the stream
    (``Pool.imap`` would read the whole document iterator ahead).
    """
    if workers <= 1:
        _init_worker(*initargs)
        yield from map(_tokenize_shard, tasks)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    # Workers each use one core; turning off the tokenizers thread pool also avoids its fork warning.
    with _env("TOKENIZERS_PARALLELISM", "false"), mp.get_context(method).Pool(
        workers, initializer=_init_worker, initargs=initargs
    ) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(_tokenize_shard, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _resume_or_create(out_dir: Path, fresh: ShardIndex) -> ShardIndex:
    """The existing index if its settings match ``fresh`` (keeping only intact shards), else ``fresh``."""
    if not (out_dir / INDEX_NAME).is_file():
        return fresh
    old = load_index(out_dir, require_complete=False)
    if old.settings() != fresh.settings():
        diff = {k: (v, fresh.settings()[k]) for k, v in old.settings().items() if v != fresh.settings()[k]}
        raise DataError(
            f"{out_dir}: already holds shards made with different settings {diff} (old, new); "
            "use another output directory or delete this one"
        )
    itemsize = np.dtype(old.dtype).itemsize
    for n, shard in enumerate(old.shards):
        path = out_dir / shard.file
        if not path.is_file() or path.stat().st_size != shard.tokens * itemsize:
            # A missing/truncated file: redo it and everything after it (they are recorded in order).
            old.shards = old.shards[:n]
            old.complete = False
            break
    return old


def shard_documents(
    docs: Iterable[str],
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    *,
    source: str = "",
    shard_chars: int = DEFAULT_SHARD_CHARS,
    workers: int = 2,
    progress: bool = True,
) -> ShardIndex:
    """Tokenize ``docs`` into shards under ``out_dir`` (resuming a previous partial run) and return the index.

    ``source`` describes the input (recorded in the index; a rerun with a different description is
    refused instead of mixing data). The output is byte-identical for any ``workers``.
    """
    if shard_chars <= 0:
        raise DataError(f"shard_chars must be positive, got {shard_chars}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    fresh = ShardIndex(
        dtype, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.fingerprint, source, shard_chars, directory=out_dir
    )
    index = _resume_or_create(out_dir, fresh)
    if index.complete:
        return index
    done = len(index.shards)
    tasks = ((i, chunk) for i, chunk in enumerate(_chunk_documents(docs, shard_chars)) if i >= done)
    done_docs = sum(s.docs for s in index.shards)
    bar = tqdm(desc=f"sharding {out_dir.name}", unit="doc", initial=done_docs, disable=not progress)
    with bar:
        for info in _run_tasks(tasks, workers, (tokenizer.hf.to_str(), str(out_dir), dtype)):
            index.shards.append(info)
            index.save()  # record only after the shard file is in place
            bar.update(info.docs)
            bar.set_postfix(tokens=index.total_tokens)
    if not index.shards:
        raise DataError(f"{source or out_dir}: no documents to shard")
    index.complete = True
    index.save()
    return index
