"""Readers: each source kind, and errors that name the file (and line / byte offset)."""

from __future__ import annotations

import json
import re

import pytest

from mobilemoe.data import DataError, iter_documents, read_jsonl, read_jsonl_chats, read_source_dir, read_text_file
from mobilemoe.errors import MobileMoEError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_data_error_is_user_error():
    assert issubclass(DataError, MobileMoEError)


def test_text_file_whole_and_paragraphs(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("one\nline\n\n  \ntwo\n\n\nthree", encoding="utf-8")
    assert list(read_text_file(p)) == ["one\nline\n\n  \ntwo\n\n\nthree"]
    assert list(read_text_file(p, split_blank_lines=True)) == ["one\nline", "two", "three"]


def test_jsonl_text_custom_field_and_messages(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello"}, {"text": "wörld"}])
    assert list(iter_documents(p)) == ["hello", "wörld"]
    q = write_jsonl(tmp_path / "b.jsonl", [{"body": "x"}])
    assert list(read_jsonl(q, field="body")) == ["x"]
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    c = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    assert list(read_jsonl(c, field="messages")) == ["user: hi\n\nassistant: yo"]
    assert list(read_jsonl_chats(c)) == [msgs]


def test_source_dir_glob(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "b.py").write_text("b = 2\n")
    (tmp_path / "pkg" / "sub" / "a.py").write_text("a = 1\n")
    (tmp_path / "pkg" / "__init__.py").write_text("")  # empty: skipped
    (tmp_path / "pkg" / "notes.txt").write_text("not code")
    assert list(iter_documents(tmp_path, pattern="**/*.py")) == ["b = 2\n", "a = 1\n"]
    with pytest.raises(DataError, match=r"no files match '\*\*/\*\.rs'"):
        list(read_source_dir(tmp_path, "**/*.rs"))


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl"])
def test_empty_file_names_path(tmp_path, name):
    p = tmp_path / name
    p.write_text("\n  \n")
    with pytest.raises(DataError, match=re.escape(str(p)) + ": file is empty"):
        list(iter_documents(p))


def test_non_utf8_names_path_and_offset(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("abc caf".encode() + "é".encode("latin-1") + b" more")
    with pytest.raises(DataError, match=re.escape(str(p)) + r": not valid UTF-8 at byte offset 7"):
        list(iter_documents(p))
    j = tmp_path / "bad.jsonl"
    j.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=re.escape(str(j)) + r":2: not valid UTF-8 at byte offset 25"):
        list(iter_documents(j))


def test_non_utf8_in_source_dir_raises_or_skips(tmp_path):
    (tmp_path / "bad.py").write_bytes(b"x = '\xe9'\n")
    (tmp_path / "good.py").write_text("y = 1\n")
    with pytest.raises(DataError, match="bad.py: not valid UTF-8 at byte offset 5"):
        list(read_source_dir(tmp_path))
    assert list(read_source_dir(tmp_path, skip_undecodable=True)) == ["y = 1\n"]


def test_malformed_jsonl_reports_file_and_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{p}:3: malformed JSON")):
        list(read_jsonl(p))


def test_missing_field_and_wrong_type(tmp_path):
    p = write_jsonl(tmp_path / "f.jsonl", [{"text": "a"}, {"content": "b"}])
    with pytest.raises(DataError, match=re.escape(f"{p}:2: missing field 'text' (found keys: ['content'])")):
        list(read_jsonl(p))
    q = write_jsonl(tmp_path / "g.jsonl", [{"text": 3}])
    with pytest.raises(DataError, match=re.escape(f"{q}:1: field 'text' must be a string")):
        list(read_jsonl(q))
    r = write_jsonl(tmp_path / "h.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(DataError, match=re.escape(f"{r}:1: message 0")):
        list(read_jsonl_chats(r))


def test_optional_backends_give_install_hint(tmp_path):
    p = tmp_path / "x.parquet"
    p.write_bytes(b"PAR1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="pip install pyarrow"):
            list(iter_documents(p))
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="pip install datasets"):
            list(iter_documents("hf:some/dataset"))


def test_unsupported_and_missing(tmp_path):
    with pytest.raises(DataError, match="unsupported data source"):
        list(iter_documents(tmp_path / "a.csv"))
    with pytest.raises(DataError, match="no such file"):
        list(iter_documents(tmp_path / "missing.txt"))
