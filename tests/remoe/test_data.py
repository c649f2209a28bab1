"""ReMoE --data sources: single files split into train/validation, folders of text files, clear errors."""

import json

import pytest

from mobilemoe.cli import main
from mobilemoe.errors import MobileMoEError
from mobilemoe.remoe.data import documents, split_units


def paragraphs(n):
    return [f"Paragraph {i}: the quick brown fox {i} jumps over the lazy dog." for i in range(n)]


def both(spec, **kw):
    return list(documents(str(spec), "train", **kw)), list(documents(str(spec), "validation", **kw))


def test_single_txt_splits_by_paragraph(tmp_path):
    """45 blank-line paragraphs: every 20th is held out; both splits non-empty, disjoint, all covered."""
    p = tmp_path / "book.txt"
    p.write_text("\n\n".join(paragraphs(45)) + "\n")
    train, val = both(p)
    assert val == [paragraphs(45)[19], paragraphs(45)[39]]
    assert len(train) == 43 and not set(train) & set(val) and set(train) | set(val) == set(paragraphs(45))
    assert both(p) == (train, val)  # deterministic


@pytest.mark.parametrize("text", [
    "one single paragraph " * 200,                          # no blank lines at all
    "few\n\n" + "short paragraphs here\n" * 30 + "\n\nend",  # 3 paragraphs (< 20)
    "a" * 400,                                               # no whitespace: cut mid-word
    "x\n" + "word " * 300,                                   # a line break only at the start: not used
])
def test_short_file_holds_out_each_tail(tmp_path, text):
    """Under 20 paragraphs: each one's last ~5% is validation; train + validation is the text, no overlap."""
    p = tmp_path / "short.md"
    p.write_text(text)
    train, val = both(p)
    assert len(train) == len(val) >= 1 and all(train) and all(val)
    units = [u.strip() for u in text.split("\n\n") if u.strip()]
    for u, t, v in zip(units, train, val):
        assert u.startswith(t) and u.endswith(v) and len(t) + len(v) <= len(u)
        assert len(u) < 100 or 0.04 <= len(v) / len(u) <= 0.1


def test_split_units_keeps_every_20th_rule():
    units = [f"doc {i}" for i in range(41)]
    assert list(split_units(units, "validation")) == ["doc 19", "doc 39"]
    assert len(list(split_units(units, "train"))) == 39
    with pytest.raises(MobileMoEError, match="split must be one of"):
        list(split_units(units, "test"))


def test_sharegpt_and_jsonl_keep_row_holdout(tmp_path):
    convs = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
             for i in range(40)]
    (tmp_path / "chat.json").write_text(json.dumps(convs))
    train, val = both(tmp_path / "chat.json")
    assert val == ["q19\na19", "q39\na39"] and len(train) == 38
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(20)))
    assert both(tmp_path / "rows.jsonl")[1] == ["row 19"]


@pytest.fixture
def text_dir(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / ".git").mkdir()
    (d / "a.txt").write_text("alpha " * 100)
    (d / "sub" / "b.md").write_text("bravo " * 100)
    (d / "c.py").write_text("charlie = 1\n" * 50)
    (d / "d.c").write_text("int delta;\n" * 50)
    (d / ".git" / "e.txt").write_text("echo " * 100)
    (d / "f.bin").write_bytes(b"\xff\xfe" * 10)
    return d


def test_directory_reads_text_files(text_dir):
    """Text suffixes by default (hidden folders and other files skipped); --glob and DIR/**/*.EXT pick others."""
    train, val = both(text_dir)
    assert [t.split()[0] for t in train] == ["alpha", "charlie", "bravo"] and len(val) == 3
    assert [t.split()[0] for t in both(text_dir, glob="**/*.c")[0]] == ["int"]
    assert [t.split()[0] for t in both(text_dir / "**" / "*.md")[0]] == ["bravo"]


@pytest.mark.parametrize("make, spec, glob, msg", [
    (lambda d: d.mkdir(), "empty", None, r"empty: no text files \(\*\.txt"),
    (lambda d: d.mkdir(), "empty", "*.c", r"no '\*\.c' found"),
    (lambda d: d.write_text("hi there"), "f.txt", "*.c", "applies to a directory"),
    (lambda d: d.write_text("{not json"), "x.json", None, "not a ShareGPT JSON file"),
    (lambda d: d.write_text('{"a": 1}'), "x.json", None, "expected a ShareGPT JSON list"),
    (lambda d: d.write_bytes(b"ok\xff"), "x.txt", None, "not valid UTF-8 at byte offset 2"),
    (lambda d: None, "missing.txt", None, "no such file or directory"),
])
def test_bad_sources_one_line_error(tmp_path, make, spec, glob, msg):
    make(tmp_path / spec)
    with pytest.raises(MobileMoEError, match=msg):
        both(tmp_path / spec, glob=glob)


def _eval(model, data, capsys, *extra):
    rc = main(["remoe", "eval", "--model", str(model), "--data", str(data), "--seq-len", "8", "--windows", "2",
               "--json", *extra])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


def test_remoe_eval_on_single_txt(text_model_dir, tmp_path, capsys):
    """Used to fail with 'not enough validation tokens (0)': one file is one document, never held out."""
    p = tmp_path / "one.txt"
    p.write_text("The quick brown fox jumps over the lazy dog. The sky is blue. " * 40)
    res = _eval(text_model_dir, p, capsys)
    assert res["before"]["perplexity"] > 1


def test_remoe_eval_and_train_on_directory(text_model_dir, text_dir, tmp_path, capsys):
    """Used to fail with "no files match '**/*.py'" for a folder of .txt files."""
    for f in ("c.py", "sub/b.md"):
        (text_dir / f).unlink()
    (text_dir / "a2.txt").write_text("The quick brown fox jumps over the lazy dog. " * 60)
    assert _eval(text_model_dir, text_dir, capsys)["before"]["perplexity"] > 1
    rc = main(["remoe", "train", "--model", str(text_model_dir), "--out", str(tmp_path / "o"), "--data", str(text_dir),
               "--steps", "1", "--warmup", "0", "--grad-accum", "1", "--seq-len", "8", "--json"])
    assert rc == 0, capsys.readouterr().err


def test_remoe_eval_too_little_validation_is_one_line(text_model_dir, tmp_path, capsys):
    p = tmp_path / "tiny.txt"
    p.write_text("The sky is blue. " * 10)
    assert main(["remoe", "eval", "--model", str(text_model_dir), "--data", str(p), "--seq-len", "64"]) == 2
    assert "not enough validation tokens" in capsys.readouterr().err
