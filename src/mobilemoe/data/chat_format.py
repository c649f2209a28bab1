"""How a checkpoint's chat turns become token ids, and which ids end a reply.

Two sources of truth, picked per checkpoint by :func:`load_chat_format`:

* ``"checkpoint chat_template"``: the checkpoint carries a Jinja ``chat_template`` (in
  ``tokenizer_config.json`` or ``chat_template.jinja``, as transformers saves them). It is rendered by
  transformers' own ``apply_chat_template`` (never re-implemented here), so prompt ids equal what
  transformers feeds the model. Control tokens inside message *content* are encoded as ordinary text
  (``sanitize_control_tokens``), so a user message cannot forge ``<|eot_id|>`` or a header.
* ``"mobilemoe template"``: models trained here (no ``chat_template``) keep the project's template
  (:mod:`mobilemoe.data.chat`).

Stop ids are the union of ``config.json``'s and ``generation_config.json``'s ``eos_token_id`` (an int
or a list), the tokenizer's EOS, and the token the template closes an assistant turn with.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from mobilemoe.data.tokenizer import Tokenizer
from mobilemoe.errors import MobileMoEError

Message = dict[str, str]
CHECKPOINT_TEMPLATE = "checkpoint chat_template"
MOBILEMOE_TEMPLATE = "mobilemoe template"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")
_ROLES = ("system", "user", "assistant")


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, ``{}`` when absent; one clear line when unreadable."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MobileMoEError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise MobileMoEError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _id_list(value: Any, where: str) -> list[int]:
    """``eos_token_id`` as a list: ``None`` -> [], int -> [int], list of ints as is."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise MobileMoEError(f"{where}: eos_token_id must be a token id or a list of ids, got {value!r}")
    return list(values)


def _token_str(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def check_messages(messages: Sequence[Message]) -> None:
    """OpenAI-style messages: a list of ``{"role": system|user|assistant, "content": str}``."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise MobileMoEError("messages: expected a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise MobileMoEError(f"messages[{i}]: expected {{'role': one of {list(_ROLES)}, 'content': a string}}, "
                                 f"got {m!r:.80}")


class ChatFormat:
    """How a checkpoint's chat turns become token ids, and which ids end a reply."""

    def __init__(self, tokenizer: Tokenizer, stop_ids: list[int], source: str, add_bos: bool,
                 hf_tokenizer: Any = None, eos_ids: list[int] | None = None) -> None:
        self.tokenizer = tokenizer  # the checkpoint's tokenizer (encode/decode)
        self.stop_ids = stop_ids  # every id that ends a reply (eos lists + the template's turn end)
        # ids that end plain (non-chat) text: the eos lists and the tokenizer's EOS, not the turn end
        self.eos_ids = list(stop_ids if eos_ids is None else eos_ids)
        self.source = source  # CHECKPOINT_TEMPLATE or MOBILEMOE_TEMPLATE
        self.add_bos = add_bos  # whether a plain prompt starts with BOS
        self._hf = hf_tokenizer  # transformers tokenizer that renders the chat_template (checkpoint source)

    def __repr__(self) -> str:
        return f"ChatFormat(source={self.source!r}, stop_ids={self.stop_ids}, tokenizer={self.tokenizer.name!r})"

    def prompt_ids(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` (plus the assistant header when ``add_generation_prompt``)."""
        check_messages(messages)
        if self._hf is None:
            from mobilemoe.data.chat import encode_chat, encode_prompt

            if add_generation_prompt:
                return encode_prompt(self.tokenizer, messages)
            return encode_chat(self.tokenizer, messages).ids
        return self.render_ids(messages, add_generation_prompt)

    def render_ids(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
        """The checkpoint's chat_template through transformers' ``apply_chat_template``."""
        try:
            out = self._hf.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                               tokenize=True, return_dict=False, sanitize_control_tokens=True)
        except Exception as exc:  # jinja2's TemplateError, raise_exception() in the template, ...
            raise MobileMoEError(f"{self.tokenizer.name}: the checkpoint's chat_template failed on these "
                                 f"messages: {exc}") from None
        return [int(t) for t in out]

    def encode_chat(self, messages: Sequence[Message]) -> "EncodedChat":
        """Ids of a whole conversation and its assistant-only loss mask (SFT data).

        With a checkpoint template, assistant turn ``i`` is trained on the ids between the rendering of
        ``messages[:i]`` + the generation prompt and the rendering of ``messages[:i + 1]``: its content
        and the template's turn end (``<|eot_id|>``), exactly what generation must produce.
        """
        from mobilemoe.data.chat import EncodedChat, encode_chat

        if self._hf is None:
            return encode_chat(self.tokenizer, messages)
        ids = self.prompt_ids(messages, add_generation_prompt=False)
        mask = [False] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = self.render_ids(messages[:i], add_generation_prompt=True) if i else []
            end = self.render_ids(messages[: i + 1], add_generation_prompt=False)
            if ids[: len(start)] != start or ids[: len(end)] != end:
                raise MobileMoEError(f"{self.tokenizer.name}: the chat_template does not render a conversation "
                                     "as a prefix of its continuation, so the assistant turns cannot be masked")
            mask[len(start): len(end)] = [True] * (len(end) - len(start))
        return EncodedChat(ids, mask)

    @property
    def pad_id(self) -> int:
        """An id to pad SFT rows with (masked out of the loss): the tokenizer's pad, else an EOS."""
        if self._hf is None:
            return self.tokenizer.pad_id
        if self._hf.pad_token_id is not None:
            return int(self._hf.pad_token_id)
        return self.eos_ids[0] if self.eos_ids else self.stop_ids[0] if self.stop_ids else 0

    def render_text(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt as text (for display and debugging)."""
        return self.tokenizer.decode(self.prompt_ids(messages, add_generation_prompt))

    def text_ids(self, text: str) -> list[int]:
        """A plain (non-chat) prompt: BOS only where the tokenizer config says so."""
        ids = self.tokenizer.encode(text)
        if self.add_bos:
            return [self.tokenizer.bos_id if self._hf is None else self._hf.bos_token_id] + ids
        return ids


def _has_chat_template(ckpt: Path, tok_config: dict[str, Any]) -> bool:
    """Whether the checkpoint carries a Jinja chat template where transformers looks for one:
    ``chat_template.jinja`` (transformers >= 4.43 saves it there) or tokenizer_config.json's
    ``chat_template`` (a string, or a list of named templates)."""
    return (ckpt / "chat_template.jinja").is_file() or bool(tok_config.get("chat_template"))


def _hf_tokenizer(ckpt: Path):
    """transformers' own loading of the checkpoint's tokenizer files (local only: nothing is fetched),
    so the template, special tokens and added tokens are exactly what transformers would use."""
    from transformers import PreTrainedTokenizerFast

    try:
        hf = PreTrainedTokenizerFast.from_pretrained(str(ckpt), local_files_only=True)
    except Exception as exc:
        raise MobileMoEError(f"{ckpt}: transformers cannot load the tokenizer files ({exc})") from None
    if not hf.chat_template:
        raise MobileMoEError(f"{ckpt}: transformers found no usable chat_template in the tokenizer files")
    return hf


def _turn_end_id(hf, tokenizer: Tokenizer) -> int | None:
    """The id the template closes an assistant turn with (Llama 3: ``<|eot_id|>``; ChatML:
    ``<|im_end|>``): the first special token rendered right after an assistant message's content."""
    marker = "mobilemoe-probe-7f3a"
    try:
        text = hf.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                                      tokenize=False)
    except Exception:  # a template that refuses this probe: the eos lists still apply
        return None
    if not isinstance(text, str) or marker not in text:
        return None
    after = text[text.rindex(marker) + len(marker):]
    specials = set(hf.all_special_ids) | {i for i, t in hf.added_tokens_decoder.items() if t.special}
    for tid in hf(after, add_special_tokens=False)["input_ids"]:
        if tid in specials:
            return int(tid)
    return None


def _post_processor_adds_bos(hf) -> bool:
    """Whether the tokenizer.json's post-processor puts BOS in front of plain text (Llama 3 does)."""
    if hf.bos_token_id is None:
        return False
    ids = hf("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == hf.bos_token_id


def format_beside(tokenizer: Tokenizer) -> ChatFormat | None:
    """The checkpoint chat template of the directory a tokenizer was loaded from (``None`` when that
    directory has none, or the tokenizer is in memory): SFT and eval of checkpoints imported from
    Hugging Face then use the template the model was trained with."""
    path = Path(tokenizer.name)
    if path.name != "tokenizer.json" or not path.is_file():
        return None
    if not _has_chat_template(path.parent, _read_json(path.parent / "tokenizer_config.json")):
        return None
    return load_chat_format(path.parent)


def load_chat_format(ckpt_dir: str | os.PathLike) -> ChatFormat:
    """The chat format of a checkpoint directory (MobileMoEError if it has no tokenizer.json)."""
    ckpt = Path(ckpt_dir)
    if not (ckpt / "tokenizer.json").is_file():
        raise MobileMoEError(f"{ckpt}: no tokenizer.json (chat and text prompts need the checkpoint's tokenizer)")
    tokenizer = Tokenizer.load(ckpt)
    tok_config = _read_json(ckpt / "tokenizer_config.json")
    stops = _id_list(_read_json(ckpt / "config.json").get("eos_token_id"), str(ckpt / "config.json"))
    stops += _id_list(_read_json(ckpt / "generation_config.json").get("eos_token_id"),
                      str(ckpt / "generation_config.json"))
    if not _has_chat_template(ckpt, tok_config):
        return _mobilemoe_format(tokenizer, tok_config, stops)
    hf = _hf_tokenizer(ckpt)
    eos = _token_str(tok_config.get("eos_token"))
    stops += [t for t in (hf.convert_tokens_to_ids(eos) if eos else None, hf.eos_token_id) if isinstance(t, int)]
    eos_ids = _unique(stops)
    turn_end = _turn_end_id(hf, tokenizer)
    add_bos = tok_config["add_bos_token"] if isinstance(tok_config.get("add_bos_token"), bool) \
        else _post_processor_adds_bos(hf)
    if add_bos and hf.bos_token_id is None:
        raise MobileMoEError(f"{ckpt / 'tokenizer_config.json'}: add_bos_token is set but there is no bos_token")
    return ChatFormat(tokenizer, _unique(eos_ids + ([turn_end] if turn_end is not None else [])),
                      CHECKPOINT_TEMPLATE, add_bos, hf, eos_ids)


def _mobilemoe_format(tokenizer: Tokenizer, tok_config: dict[str, Any], stops: list[int]) -> ChatFormat:
    """The project's own template; plain prompts get no BOS unless tokenizer_config.json asks for it."""
    from mobilemoe.data.tokenizer import _EOS_FALLBACKS as EOS_NAMES, END

    eos = next((t for t in map(tokenizer.token_id, EOS_NAMES) if t is not None), None)
    eos_ids = _unique(stops + ([eos] if eos is not None else []))
    end = tokenizer.token_id(END)
    return ChatFormat(tokenizer, _unique(eos_ids + ([end] if end is not None else [])), MOBILEMOE_TEMPLATE,
                      tok_config.get("add_bos_token") is True, eos_ids=eos_ids)


def _unique(ids: list[int]) -> list[int]:
    return list(dict.fromkeys(ids))
