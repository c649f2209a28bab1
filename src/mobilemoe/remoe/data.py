"""Token data for ReMoE: text sources tokenized with the model directory's tokenizer.json.

``spec`` forms:
* ``stdlib`` / ``stdlib:N`` -- the embedded Python-stdlib corpus (first N files, 5% of files held out,
  the same split as ``recipes/tiny.yaml``);
* a ShareGPT ``.json`` list (``conversations: [{from, value}]``): one unit per conversation;
* a ``.jsonl`` / ``.parquet`` file (:func:`mobilemoe.data.iter_documents`, field ``text``): one unit per row;
* any other single file, read as UTF-8 text (``.txt``, ``.md``, ``.py``, ...): one unit per blank-line
  separated paragraph;
* a directory: one unit per text file under it whose suffix is in :data:`TEXT_SUFFIXES` (hidden files and
  folders skipped), or per file matching ``glob`` (``--glob``); ``DIR/**/*.c`` in the spec itself works too;
* ``random`` / ``random:V`` -- uniformly random token ids (smoke tests; needs no tokenizer).

Train/validation split (deterministic, disjoint): every 20th unit is held out. A source of fewer than 20
units (a short file, a few files) instead holds out the last 5% of each unit's characters, cut at a
line break or space, so a single file always gives both splits.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from mobilemoe.errors import MobileMoEError
from mobilemoe.train.data import TokenWindowSource, pack_documents

HOLDOUT_EVERY = 20
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
SPLITS = ("train", "validation")


def _sharegpt(path: Path) -> Iterator[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MobileMoEError(f"--data {path}: not a ShareGPT JSON file ({exc})") from None
    if not isinstance(data, list):
        raise MobileMoEError(f"--data {path}: expected a ShareGPT JSON list of conversations, "
                             f"got {type(data).__name__}")
    for i, rec in enumerate(data):
        turns = (rec.get("conversations") or rec.get("messages") or []) if isinstance(rec, dict) else None
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise MobileMoEError(f"--data {path}: record {i} has no 'conversations' list of {{from, value}} turns")
        text = "\n".join(str(t.get("value", t.get("content", ""))) for t in turns)
        if text.strip():
            yield text


def _text_files(root: Path, glob: str | None) -> Iterator[str]:
    from mobilemoe.data.readers import iter_source_files

    if glob:
        files = sorted(p for p in root.glob(glob) if p.is_file())
    else:  # hidden entries are VCS/editor state (.git, .venv), not corpus text
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        want = repr(glob) if glob else "text files (" + ", ".join(f"*{s}" for s in TEXT_SUFFIXES) + ")"
        raise MobileMoEError(f"--data {root}: no {want} found; pick others with --glob PATTERN")
    return iter_source_files(files)


def _units(spec: str, glob: str | None) -> Iterator[str]:
    """The units (documents) of a file/directory source, before the split."""
    path = Path(spec)
    if not path.exists() and any(c in spec for c in "*?["):  # DIR/**/*.txt: split off the pattern
        parts = Path(spec).parts
        k = next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))
        path, glob = Path(*parts[:k]) if k else Path("."), str(Path(*parts[k:]))
    if not path.exists():
        raise MobileMoEError(f"--data {spec}: no such file or directory (or use stdlib[:N] / random[:V])")
    if path.is_dir():
        return _text_files(path, glob)
    if glob:
        raise MobileMoEError(f"--glob {glob}: applies to a directory, but --data {spec} is a file")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _sharegpt(path)
    from mobilemoe.data.readers import iter_documents, read_text_file

    if suffix in (".jsonl", ".parquet"):
        return iter_documents(path)
    return read_text_file(path, split_blank_lines=True)


def _tail_cut(text: str) -> int:
    """Where the held-out last 5% of ``text`` starts: after a line break or space within the 5% before
    that point if there is one (so at most ~10% is held out), else mid-word."""
    n = len(text)
    cut = max(1, min(n - 1, n * (HOLDOUT_EVERY - 1) // HOLDOUT_EVERY))
    for sep in ("\n", " "):
        at = text.rfind(sep, max(1, cut - n // HOLDOUT_EVERY), cut)
        if at > 0:
            return at + 1
    return cut


def split_units(units: Iterable[str], split: str) -> Iterator[str]:
    """``split`` of ``units``: every 20th unit held out, or each unit's last 5% if there are under 20."""
    if split not in SPLITS:
        raise MobileMoEError(f"split must be one of {SPLITS}, got {split!r}")
    it = iter(units)
    head = list(itertools.islice(it, HOLDOUT_EVERY))  # streams large sources: only 20 units are buffered
    if len(head) < HOLDOUT_EVERY:
        for u in head:
            u = u.strip()
            if len(u) >= 2:
                cut = _tail_cut(u)
                yield u[:cut].rstrip() if split == "train" else u[cut:]
        return
    for i, u in enumerate(itertools.chain(head, it)):
        if (i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1) == (split == "validation"):
            yield u


def documents(spec: str, split: str, glob: str | None = None) -> Iterator[str]:
    """The ``split`` ('train' or 'validation') documents of ``spec`` (see the module docstring)."""
    if spec.startswith("stdlib"):
        from mobilemoe.data import stdlib_corpus

        _, _, n = spec.partition(":")
        corpus = stdlib_corpus(val_fraction=0.05, limit=int(n) if n else 80)
        return corpus.documents(split)
    return split_units(_units(spec, glob), split)


def load_tokenizer(model_dir: str | Path):
    from mobilemoe.data import Tokenizer

    p = Path(model_dir) / "tokenizer.json"
    if not p.is_file():
        raise MobileMoEError(f"{model_dir}: no tokenizer.json to tokenize text data (use --data random for ids)")
    return Tokenizer.load(p)


def token_array(spec: str, model_dir: str | Path | None, split: str, max_tokens: int,
                vocab_size: int | None = None, seed: int = 0, glob: str | None = None) -> np.ndarray:
    """A 1-D int64 token array for ``split`` ('train' or 'validation')."""
    if spec.startswith("random"):
        _, _, v = spec.partition(":")
        V = int(v) if v else int(vocab_size or 256)
        g = np.random.default_rng(seed + (1 if split == "validation" else 0))
        return g.integers(0, V, size=max_tokens, dtype=np.int64)
    tok = load_tokenizer(model_dir)
    arr = pack_documents(documents(spec, split, glob), tok, max_tokens=max_tokens)
    if vocab_size is not None and arr.size and int(arr.max()) >= vocab_size:
        raise MobileMoEError(f"tokenizer ids reach {int(arr.max())} but the model vocabulary is {vocab_size}")
    return arr


def batches(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0) -> TokenWindowSource:
    return TokenWindowSource(tokens, seq_len, batch_size, seed=seed)


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> list[torch.Tensor]:
    """Consecutive, non-overlapping [1, seq_len + 1] windows (deterministic validation)."""
    t = torch.as_tensor(tokens, dtype=torch.long)
    n = min(max_windows, (len(t) - 1) // seq_len)
    if n < 1:
        raise MobileMoEError(f"not enough validation tokens ({len(t)}) for seq_len {seq_len}: need at least "
                             f"{seq_len + 1}; use more data or a smaller --seq-len")
    return [t[i * seq_len: i * seq_len + seq_len + 1][None] for i in range(n)]
