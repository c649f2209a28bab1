"""Chat template, loss masks, the GSM8K reader and the supervised fine-tuning (SFT) loader.

Chat template (token level; the text form is what ``Tokenizer.decode`` shows)::

    <|bos|><|system|>{system}<|end|><|user|>{question}<|end|><|assistant|>{answer}<|end|>...

* A conversation starts with ``<|bos|>``; each message is ``<|role|>`` + content + ``<|end|>``, with
  nothing (no newline) between messages. Roles: ``system`` (optional), ``user``, ``assistant``.
* Markers are inserted by id; message content is encoded as plain text, so content containing a
  marker string cannot forge one.
* To generate a reply, feed :func:`encode_prompt` (the conversation so far + ``<|assistant|>``) and
  sample until ``<|end|>``.
* Loss mask: only the assistant's content tokens and the assistant's closing ``<|end|>`` are trained
  (the model must learn when to stop). ``<|bos|>``, role markers, system and user turns are not.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from mobilemoe.data.chat_format import ChatFormat
from mobilemoe.data.loader import EpochBatcher
from mobilemoe.data.readers import DataError, get_field, iter_jsonl
from mobilemoe.data.tokenizer import ASSISTANT, BOS, END, SYSTEM, USER, Tokenizer

Message = dict[str, str]
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index

_MARKER_RE = re.compile("(" + "|".join(re.escape(t) for t in (*ROLE_TOKENS.values(), END)) + ")")
_TOKEN_ROLES = {tok: role for role, tok in ROLE_TOKENS.items()}


@dataclass(frozen=True)
class EncodedChat:
    """Token ids of a conversation and, per id, whether it is a training target (assistant output)."""

    ids: list[int]
    mask: list[bool]


def _role_token(role: str) -> str:
    if role not in ROLE_TOKENS:
        raise DataError(f"unknown chat role {role!r} (expected one of {sorted(ROLE_TOKENS)})")
    return ROLE_TOKENS[role]


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Message], add_bos: bool = True) -> EncodedChat:
    """Encode a conversation with the chat template and its assistant-only loss mask."""
    end = tokenizer.require_id(END)
    ids: list[int] = [tokenizer.bos_id] if add_bos else []
    mask: list[bool] = [False] * len(ids)
    for msg in messages:
        content = tokenizer.encode(msg["content"]) + [end]
        ids += [tokenizer.require_id(_role_token(msg["role"]))] + content
        mask += [False] + [msg["role"] == "assistant"] * len(content)
    return EncodedChat(ids, mask)


def encode_prompt(tokenizer: Tokenizer, messages: Sequence[Message]) -> list[int]:
    """Ids to generate the next assistant turn from: the conversation + ``<|assistant|>``."""
    return encode_chat(tokenizer, messages).ids + [tokenizer.require_id(ASSISTANT)]


def render_chat(messages: Sequence[Message], add_bos: bool = True) -> str:
    """The template as text; equals ``tokenizer.decode(encode_chat(tokenizer, messages).ids)``."""
    body = "".join(f"{_role_token(m['role'])}{m['content']}{END}" for m in messages)
    return (BOS if add_bos else "") + body


def parse_chat(text: str) -> list[Message]:
    """Inverse of :func:`render_chat` (for content that does not itself contain marker strings)."""
    parts = _MARKER_RE.split(text.removeprefix(BOS))
    if parts[0]:
        raise DataError(f"chat text must start with a role marker, got {parts[0][:40]!r}")
    messages = []
    # After the split: "", <|role|>, content, <|end|>, "", <|role|>, content, <|end|>, "", ...
    for i in range(1, len(parts) - 1, 4):
        role_tok, content, end = parts[i], parts[i + 1], parts[i + 2] if i + 2 < len(parts) else None
        if role_tok not in _TOKEN_ROLES or end != END or (i + 3 < len(parts) and parts[i + 3]):
            raise DataError(f"malformed chat text near message {len(messages)}: {text[:80]!r}")
        messages.append({"role": _TOKEN_ROLES[role_tok], "content": content})
    return messages


def read_gsm8k(
    path: str | os.PathLike, strip_calculator: bool = False, system: str | None = None
) -> Iterator[list[Message]]:
    """Yield GSM8K ``{question, answer}`` lines as user/assistant conversations.

    The answer keeps its reasoning and the final ``#### N`` line (see :func:`gsm8k_final_answer`).
    ``strip_calculator`` removes the ``<<48/2=24>>`` calculator annotations.
    """
    for lineno, record in iter_jsonl(path):
        where = f"{path}:{lineno}"
        question, answer = get_field(record, "question", where), get_field(record, "answer", where)
        if not isinstance(question, str) or not isinstance(answer, str):
            raise DataError(f"{where}: 'question' and 'answer' must be strings")
        if strip_calculator:
            answer = re.sub(r"<<[^>]*>>", "", answer)
        conversation = [{"role": "system", "content": system}] if system else []
        yield conversation + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def gsm8k_final_answer(text: str) -> str | None:
    """The number after the last ``####`` in a GSM8K answer (commas removed), or ``None``."""
    found = re.findall(r"####\s*(-?[\d,]*\.?\d+)", text)
    return found[-1].replace(",", "") if found else None


class SFTLoader(EpochBatcher):
    """Yields ``(x, y, mask)`` batches of shape ``[batch_size, seq_len]`` for supervised fine-tuning.

    ``x`` and ``y`` are int64 (``y`` is ``x`` shifted by one, with :data:`IGNORE_INDEX` wherever the
    target is not an assistant token or is padding); ``mask`` is the bool tensor ``y != IGNORE_INDEX``.

    With ``pack=True`` whole conversations are packed greedily (in the epoch's seeded order) into rows
    of ``seq_len + 1`` tokens and the rest padded; with ``pack=False`` each row holds one conversation.
    Conversations longer than ``seq_len + 1`` are truncated (see ``num_truncated``). Packed
    conversations can attend to each other (no block-diagonal mask); each starts with ``<|bos|>``.
    Seeding, rank split and ``state_dict`` work as in :class:`~mobilemoe.data.loader.PretrainLoader`;
    ranks get disjoint rows, hence disjoint conversations.

    ``tokenizer`` may be a :class:`~mobilemoe.data.chat_format.ChatFormat`: conversations are then
    rendered with its template (a checkpoint's ``chat_template``) and masked per
    :meth:`~mobilemoe.data.chat_format.ChatFormat.encode_chat`.
    """

    def __init__(
        self,
        conversations: Iterable[Sequence[Message]],
        tokenizer: Tokenizer | ChatFormat,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pack: bool = True,
        shuffle: bool = True,
    ) -> None:
        super().__init__(batch_size, seed, rank, world_size)
        if seq_len <= 0:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        self.seq_len, self.pack, self.shuffle = seq_len, pack, shuffle
        self.pad_id = tokenizer.pad_id
        if isinstance(tokenizer, ChatFormat):  # a checkpoint's own chat_template (see format_beside)
            encode = tokenizer.encode_chat
        else:
            encode = lambda c: encode_chat(tokenizer, c)  # noqa: E731
        self._chats = [encode(c) for c in conversations]
        if not self._chats:
            raise DataError("SFTLoader: no conversations")
        self.num_truncated = sum(len(c.ids) > seq_len + 1 for c in self._chats)
        self._rows: list[list[int]] = []  # conversation indices per row, for the cached epoch

    def _pack(self, order: np.ndarray) -> list[list[int]]:
        """Group conversation indices (in ``order``) into rows that fit ``seq_len + 1`` tokens."""
        width = self.seq_len + 1
        rows: list[list[int]] = []
        used = width  # forces a new row for the first conversation
        for c in order.tolist():
            n = min(len(self._chats[c].ids), width)
            if not self.pack or used + n > width:
                rows.append([])
                used = 0
            rows[-1].append(c)
            used += n
        return rows

    def _epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self._chats)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        self._rows = self._pack(order)  # same epoch as the returned order (cached together)
        return np.arange(len(self._rows))

    def _make_batch(self, items: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = self.seq_len + 1
        ids = np.full((len(items), width), self.pad_id, dtype=np.int64)
        target = np.zeros((len(items), width), dtype=bool)
        for r, row in enumerate(items):
            pos = 0
            for c in self._rows[row]:
                chat = self._chats[c]
                n = min(len(chat.ids), width - pos)
                ids[r, pos : pos + n] = chat.ids[:n]
                target[r, pos : pos + n] = chat.mask[:n]
                pos += n
        x = torch.from_numpy(ids[:, :-1].copy())
        y = torch.from_numpy(np.where(target[:, 1:], ids[:, 1:], IGNORE_INDEX))
        return x, y, y != IGNORE_INDEX

    def _settings(self) -> dict:
        n = len(self._chats)
        return {"seq_len": self.seq_len, "num_conversations": n, "pack": self.pack, "shuffle": self.shuffle}
