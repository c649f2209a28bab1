"""Document readers: turn files, directories and datasets into an iterator of text documents.

Every reader yields plain ``str`` documents. Problems with the input raise :class:`DataError` with a
message that names the file (and the line or byte offset where that makes sense), so a user can
fix the data without reading a traceback.

Supported sources (see :func:`iter_documents` for the dispatch rules):

* ``.txt``: the whole file is one document, or one document per blank-line separated paragraph.
* ``.jsonl``: one JSON object per line; the document is the string in ``field`` (default
  ``"text"``). If that field holds a chat ``messages`` list of ``{"role", "content"}`` objects, the
  conversation becomes plain text by :func:`chat_as_text`. (For supervised fine-tuning with real
  role-marker tokens and a loss mask use :func:`read_jsonl_chats` with :mod:`mobilemoe.data.chat`.)
* ``.parquet``: one document per row of the ``field`` column (needs ``pyarrow``).
* a directory: every file matching a glob pattern (default ``"**/*.py"``) is one document.
* ``hf:NAME[:CONFIG]``: a Hugging Face ``datasets`` dataset (needs ``datasets``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from mobilemoe.errors import MobileMoEError

PathLike = str | os.PathLike


class DataError(MobileMoEError):
    """Bad or unreadable training data; the message names the file (and line/offset)."""


def decode_utf8(data: bytes, path: PathLike, base_offset: int = 0) -> str:
    """Decode ``data`` as strict UTF-8, raising :class:`DataError` with the byte offset on failure.

    ``base_offset`` is added to the reported offset when ``data`` is a slice of the file.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not valid UTF-8 at byte offset {base_offset + exc.start} ({exc.reason}); "
            "convert the file to UTF-8"
        ) from None


def _read_nonempty_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{path}: file is empty")
    return data


def read_text_file(path: PathLike, split_blank_lines: bool = False) -> Iterator[str]:
    """Yield the documents of a UTF-8 text file.

    With ``split_blank_lines`` each paragraph (text between blank lines) is a document; otherwise the
    whole file is one document.
    """
    path = Path(path)
    text = decode_utf8(_read_nonempty_bytes(path), path)
    if not split_blank_lines:
        yield text
        return
    for paragraph in re.split(r"\n(?:[ \t]*\n)+", text):
        if paragraph.strip():
            yield paragraph.strip("\n")


def iter_jsonl(path: PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line of a JSON-lines file (1-based lines).

    Raises :class:`DataError` naming ``file:line`` for malformed JSON or a line that is not an object.
    """
    path = Path(path)
    _read_nonempty_bytes(path)  # fail early with a clear message on a missing or empty file
    offset = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = decode_utf8(raw, f"{path}:{lineno}", base_offset=offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def get_field(record: dict[str, Any], field: str, where: str) -> Any:
    """``record[field]``, or a :class:`DataError` at ``where`` listing the keys that do exist."""
    if field not in record:
        raise DataError(f"{where}: missing field {field!r} (found keys: {sorted(record)})")
    return record[field]


def validate_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """Check a chat ``messages`` value is a list of ``{"role": str, "content": str}`` and return it."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise DataError(f"{where}: message {i} must be an object with string 'role' and 'content', got {msg!r:.80}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def chat_as_text(messages: list[dict[str, str]]) -> str:
    """A conversation as plain pretraining text: ``"role: content"`` paragraphs.

    Deliberately not the chat template: in pretraining shards the markers would be tokenized as plain
    bytes (never as the special ids), teaching the model look-alike strings.
    """
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def read_jsonl(path: PathLike, field: str = "text") -> Iterator[str]:
    """Yield one document per line of a JSON-lines file: the string in ``field``.

    A list value is treated as chat messages and rendered by :func:`chat_as_text`.
    """
    for lineno, record in iter_jsonl(path):
        where = f"{path}:{lineno}"
        value = get_field(record, field, where)
        if isinstance(value, list):
            value = chat_as_text(validate_messages(value, where))
        elif not isinstance(value, str):
            raise DataError(f"{where}: field {field!r} must be a string or a messages list, got {type(value).__name__}")
        yield value


def read_jsonl_chats(path: PathLike, field: str = "messages") -> Iterator[list[dict[str, str]]]:
    """Yield the validated chat ``messages`` list of each line of a JSON-lines file."""
    for lineno, record in iter_jsonl(path):
        where = f"{path}:{lineno}"
        yield validate_messages(get_field(record, field, where), where)


def read_parquet(path: PathLike, field: str = "text") -> Iterator[str]:
    """Yield the string column ``field`` of a Parquet file, row by row (needs ``pyarrow``)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow; install it with `pip install pyarrow`") from None
    path = Path(path)
    _read_nonempty_bytes(path)
    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise DataError(f"{path}: missing column {field!r} (found columns: {pf.schema_arrow.names})")
    for batch in pf.iter_batches(columns=[field]):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield value


def read_source_dir(root: PathLike, pattern: str = "**/*.py", skip_undecodable: bool = False) -> Iterator[str]:
    """Yield each file under ``root`` matching the glob ``pattern`` as one document (sorted by path).

    Empty files (e.g. bare ``__init__.py``) are skipped silently. A non-UTF-8 file raises
    :class:`DataError` unless ``skip_undecodable`` is set.
    """
    root = Path(root)
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    if not files:
        raise DataError(f"{root}: no files match {pattern!r}")
    yield from iter_source_files(files, skip_undecodable=skip_undecodable)


def iter_source_files(files: Iterable[Path], skip_undecodable: bool = False) -> Iterator[str]:
    """Yield the text of each file in ``files``, skipping empty ones (and undecodable ones if asked)."""
    for path in files:
        data = Path(path).read_bytes()
        if not data.strip():
            continue
        try:
            yield decode_utf8(data, path)
        except DataError:
            if not skip_undecodable:
                raise


def read_hf_dataset(name: str, config: str | None = None, split: str = "train", field: str = "text") -> Iterator[str]:
    """Yield ``field`` of each row of a Hugging Face dataset (streamed; needs ``datasets``).

    The dataset must already be in the local cache or reachable; nothing here forces a download.
    """
    try:
        import datasets
    except ImportError:
        raise DataError(f"hf:{name}: reading Hugging Face datasets needs `pip install datasets`") from None
    ds = datasets.load_dataset(name, config, split=split, streaming=True)
    for i, row in enumerate(ds):
        value = get_field(row, field, f"hf:{name} row {i}")
        if value:
            yield value


def iter_documents(
    source: PathLike,
    *,
    field: str = "text",
    pattern: str = "**/*.py",
    split_blank_lines: bool = False,
) -> Iterator[str]:
    """Yield the documents of ``source``, choosing the reader from its form.

    ``hf:NAME`` or ``hf:NAME:CONFIG`` reads a Hugging Face dataset; a directory reads files matching
    ``pattern``; otherwise the file suffix picks the reader (``.txt``/``.md``, ``.jsonl``, ``.parquet``).
    """
    text = os.fspath(source)
    if text.startswith("hf:"):
        name, _, config = text[3:].partition(":")
        return read_hf_dataset(name, config or None, field=field)
    path = Path(text)
    if path.is_dir():
        return read_source_dir(path, pattern)
    suffix = path.suffix.lower()
    if suffix in (".txt", ".md", ".text"):
        return read_text_file(path, split_blank_lines=split_blank_lines)
    if suffix == ".jsonl":
        return read_jsonl(path, field=field)
    if suffix == ".parquet":
        return read_parquet(path, field=field)
    raise DataError(f"{path}: unsupported data source (expected .txt, .jsonl, .parquet, a directory or hf:NAME)")
