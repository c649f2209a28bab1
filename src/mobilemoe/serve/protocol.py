"""The OpenAI wire format: request schemas, errors and response bodies (the subset the server speaks).

Requests are validated strictly (``"5"`` is not an integer, ``NaN`` is not a temperature); unknown
fields are ignored, as OpenAI-compatible servers do, so clients that send extra options still work.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mobilemoe.runtime.sampling import MAX_SEED

MAX_STOP_STRINGS = 16


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's; vLLM and llama.cpp take it too
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)  # batch 1: one choice per request

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise APIError(400, f"stop: expected at most {MAX_STOP_STRINGS} non-empty strings", param="stop")
        return stops


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)  # the newer name of max_tokens

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def message_dicts(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for the system role
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Common):
    prompt: str | list[int]
    # echo / suffix / best_of > 1 are not supported: refused, not silently ignored
    echo: Literal[False] = False
    suffix: None = None
    best_of: Literal[1] = 1

    def token_limit(self) -> int | None:
        return self.max_tokens


# pydantic tags union members in error locations ('stop', 'list[str]'); those tags are not parameters
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|.*\[.*\])$", re.IGNORECASE)


def parse_request(raw: bytes, schema: type[_Common]) -> _Common:
    """The request body as ``schema``, or a 400 ``APIError`` naming the first bad parameter."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"] if isinstance(p, int) or not _UNION_TAG.match(str(p))]
        param = ".".join(loc) or None
        raise APIError(400, f"{param or 'body'}: {err['msg']}", param=param) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_body(rid: str, model: str, text: str, finish: str, use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish, "logprobs": None}],
            "usage": use}


def completion_body(rid: str, model: str, text: str, finish: str, use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            "usage": use}


def chat_chunk(rid: str, model: str, delta: dict[str, str] | None, finish: str | None = None,
               use: dict[str, int] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``delta=None`` is the usage-only chunk (no choices)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": choices}
    if use is not None:
        chunk["usage"] = use
    return chunk


def completion_chunk(rid: str, model: str, text: str | None, finish: str | None = None,
                     use: dict[str, int] | None = None) -> dict[str, Any]:
    """One streamed ``text_completion``; ``text=None`` is the usage-only chunk (no choices)."""
    choices = [] if text is None else [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]
    chunk = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
             "choices": choices}
    if use is not None:
        chunk["usage"] = use
    return chunk


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event (``data: ...`` and a blank line)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
