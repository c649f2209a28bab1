"""Byte-level BPE tokenizer: train with the ``tokenizers`` library, save/load ``tokenizer.json``.

Byte-level means every string (any Unicode, any whitespace, control bytes) encodes losslessly, so
``decode(encode(s)) == s`` always holds for our trained tokenizers.

Special tokens get the first ids, in the order of :data:`SPECIAL_TOKENS`. Plain text is *never*
parsed for special tokens (``encode_special_tokens`` is on): a document that happens to contain the
string ``"<|assistant|>"`` encodes as ordinary bytes, so data cannot forge a role marker or an EOS.
Special ids are inserted by id (see :mod:`mobilemoe.data.chat`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from mobilemoe.data.readers import DataError
from mobilemoe.utils import atomic_path

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END)

# Begin/end-of-document names used by common foreign tokenizer.json files (GPT-2, Llama 2/3, Gemma),
# tried after our own.
_BOS_FALLBACKS = (BOS, "<|begin_of_text|>", "<s>", "<bos>")
_EOS_FALLBACKS = (EOS, "<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")


class Tokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer`` with the ids the data pipeline needs."""

    def __init__(self, hf: HFTokenizer, name: str = "<in-memory tokenizer>") -> None:
        self.hf = hf
        self.name = name
        # Raw text must not turn into control tokens (see the module docstring).
        self.hf.encode_special_tokens = True

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load any ``tokenizer.json`` (or a directory containing one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{path}: tokenizer file not found")
        try:
            return cls(HFTokenizer.from_file(str(path)), name=str(path))
        except Exception as exc:  # the Rust error type is not importable; re-raise with the path
            raise DataError(f"{path}: not a valid tokenizer.json ({exc})") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` atomically (``path`` may be a directory). Returns the file path."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / "tokenizer.json"
        with atomic_path(path) as tmp:
            tmp.write_text(self.hf.to_str(), encoding="utf-8")
        self.name = str(path)
        return path

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no BOS/EOS added)."""
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; special tokens are kept as their strings unless ``skip_special_tokens``."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        """Id of a token string, or ``None`` if the vocabulary lacks it."""
        return self.hf.token_to_id(token)

    def require_id(self, token: str) -> int:
        """Id of a token that must exist (a :class:`DataError` names the tokenizer otherwise)."""
        tid = self.token_id(token)
        if tid is None:
            raise DataError(f"{self.name}: tokenizer has no {token!r} token (train one with train_bpe)")
        return tid

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        for token in _BOS_FALLBACKS:
            tid = self.token_id(token)
            if tid is not None:
                return tid
        return self.require_id(BOS)  # raises with the tokenizer's name

    @property
    def eos_id(self) -> int:
        for token in _EOS_FALLBACKS:
            tid = self.token_id(token)
            if tid is not None:
                return tid
        return self.require_id(EOS)  # raises with the tokenizer's name

    @property
    def pad_id(self) -> int:
        """The pad id (falls back to EOS: padded positions are masked out of the loss anyway)."""
        tid = self.token_id(PAD)
        return self.eos_id if tid is None else tid

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the serialized tokenizer: shards record it to refuse a mismatched tokenizer."""
        return hashlib.sha256(self.hf.to_str().encode("utf-8")).hexdigest()


def train_bpe(
    docs: Iterable[str],
    vocab_size: int = 8192,
    min_frequency: int = 2,
    special_tokens: Iterable[str] = SPECIAL_TOKENS,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``docs``.

    ``vocab_size`` counts the special tokens and the 256 byte symbols, so it must exceed both; keep it
    <= 65535 for compact uint16 shards.
    """
    special_tokens = list(special_tokens)
    minimum = len(special_tokens) + 256
    if vocab_size <= minimum:
        raise DataError(
            f"vocab_size must be > {minimum} (256 bytes + {len(special_tokens)} special tokens), got {vocab_size}"
        )
    hf = HFTokenizer(models.BPE())
    # add_prefix_space=False keeps encode/decode an exact round trip.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    hf.train_from_iterator(docs, trainer)
    return Tokenizer(hf, name=f"<trained BPE, vocab {vocab_size}>")
