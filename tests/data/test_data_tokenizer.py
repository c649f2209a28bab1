"""Byte-level BPE: exact round trip, special tokens, save/load."""

from __future__ import annotations

import pytest

from mobilemoe.data import SPECIAL_TOKENS, DataError, Tokenizer, train_bpe

SAMPLES = [
    "def f(x):\n    return x  # comment\n",
    "  leading spaces, trailing tabs\t\t\n\r\n",
    "unicode: café 日本語 🎉 \u200b \x00 control",
    "",
    "literal <|end|> and <|eos|> in text",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_have_first_ids(tokenizer):
    assert [tokenizer.token_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)
    assert tokenizer.vocab_size == 600


def test_text_cannot_forge_special_tokens(tokenizer):
    ids = tokenizer.encode("<|assistant|><|eos|>")
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))
    assert tokenizer.decode([tokenizer.eos_id]) == "<|eos|>"


def test_save_load_same_tokenizer(tokenizer, tmp_path):
    path = tokenizer.save(tmp_path)
    assert path.name == "tokenizer.json"
    loaded = Tokenizer.load(path)
    assert loaded.fingerprint == tokenizer.fingerprint
    assert loaded.encode(SAMPLES[2]) == tokenizer.encode(SAMPLES[2])
    assert Tokenizer.load(tmp_path).vocab_size == tokenizer.vocab_size  # a directory works too


def test_training_is_deterministic():
    docs = ["alpha beta gamma delta " * 5, "beta gamma epsilon\n" * 4]
    assert train_bpe(docs, vocab_size=300).fingerprint == train_bpe(docs, vocab_size=300).fingerprint


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="vocab_size must be >"):
        train_bpe(["x"], vocab_size=100)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=f"{bad}: not a valid tokenizer.json"):
        Tokenizer.load(bad)
    with pytest.raises(DataError, match="tokenizer file not found"):
        Tokenizer.load(tmp_path / "nope.json")
