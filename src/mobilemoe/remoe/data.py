"""Token data for ReMoE: text sources tokenized with the model directory's tokenizer.json.

``spec`` forms:
* ``stdlib`` / ``stdlib:N`` -- the embedded Python-stdlib corpus (first N files, 5% of files held out,
  the same split as ``recipes/tiny.yaml``);
* a ``.txt``/``.md``/``.jsonl``/``.parquet`` file or a directory (:func:`mobilemoe.data.iter_documents`),
  or a ShareGPT ``.json`` list (``conversations: [{from, value}]``); every 20th document is held out;
* ``random`` / ``random:V`` -- uniformly random token ids (smoke tests; needs no tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from mobilemoe.errors import MobileMoEError
from mobilemoe.train.data import TokenWindowSource, pack_documents

HOLDOUT_EVERY = 20


def _sharegpt(path: Path) -> Iterator[str]:
    data = json.loads(path.read_text(encoding="utf-8"))
    for rec in data:
        turns = rec.get("conversations") or rec.get("messages") or []
        text = "\n".join(str(t.get("value", t.get("content", ""))) for t in turns)
        if text.strip():
            yield text


def documents(spec: str, split: str) -> Iterator[str]:
    if spec.startswith("stdlib"):
        from mobilemoe.data import stdlib_corpus

        _, _, n = spec.partition(":")
        corpus = stdlib_corpus(val_fraction=0.05, limit=int(n) if n else 80)
        return corpus.documents(split)
    path = Path(spec)
    if not path.exists():
        raise MobileMoEError(f"--data {spec}: no such file or directory (or use stdlib[:N] / random[:V])")
    if path.suffix.lower() == ".json":
        docs = _sharegpt(path)
    else:
        from mobilemoe.data import iter_documents

        docs = iter_documents(path)

    def gen():
        for i, d in enumerate(docs):
            if (i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1) == (split == "validation"):
                yield d
    return gen()


def load_tokenizer(model_dir: str | Path):
    from mobilemoe.data import Tokenizer

    p = Path(model_dir) / "tokenizer.json"
    if not p.is_file():
        raise MobileMoEError(f"{model_dir}: no tokenizer.json to tokenize text data (use --data random for ids)")
    return Tokenizer.load(p)


def token_array(spec: str, model_dir: str | Path | None, split: str, max_tokens: int,
                vocab_size: int | None = None, seed: int = 0) -> np.ndarray:
    """A 1-D int64 token array for ``split`` ('train' or 'validation')."""
    if spec.startswith("random"):
        _, _, v = spec.partition(":")
        V = int(v) if v else int(vocab_size or 256)
        g = np.random.default_rng(seed + (1 if split == "validation" else 0))
        return g.integers(0, V, size=max_tokens, dtype=np.int64)
    tok = load_tokenizer(model_dir)
    arr = pack_documents(documents(spec, split), tok, max_tokens=max_tokens)
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
        raise MobileMoEError(f"not enough validation tokens ({len(t)}) for seq_len {seq_len}")
    return [t[i * seq_len: i * seq_len + seq_len + 1][None] for i in range(n)]
