"""The generation worker: one thread owns the engine (it is not thread-safe) and runs queued jobs in turn.

A job reports back through ``post`` (called from the worker thread; the app makes it thread-safe):
``("text", delta)`` as text becomes final, then ``("done", finish_reason, completion_tokens)`` or
``("error", APIError)``. A job whose ``cancelled`` event is set (client gone, timed out) or whose
deadline has passed stops at the next token, or is skipped if still queued, so the worker is free for
the next request.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from mobilemoe.errors import MobileMoEError
from mobilemoe.runtime.sampling import SamplingParams
from mobilemoe.serve.protocol import APIError

log = logging.getLogger("mobilemoe.serve")


@dataclass
class Job:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stop_ids: Sequence[int]
    stop_strings: Sequence[str]
    deadline: float  # time.monotonic() after which the job is abandoned
    post: Callable[[tuple[Any, ...]], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    def abandoned(self) -> bool:
        return self.cancelled.is_set() or time.monotonic() > self.deadline


class TextStream:
    """Decoded text of a growing token list, released only once it cannot change.

    Held back: a trailing U+FFFD (a UTF-8 character split across tokens decodes as one until its last
    byte arrives) and a tail that could be the start of a stop string. When a stop string appears the
    text is cut before it and ``stopped`` is set.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()) -> None:
        self.tokenizer, self.stops = tokenizer, [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of self.text already released
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the newly final text (may be empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self._release(len(self.text))
        self.text = text
        return self._release(len(text) - self._unsettled(text))

    def finish(self) -> str:
        """The rest of the text (generation is over: nothing is held back any more)."""
        return self._release(len(self.text))

    def _unsettled(self, text: str) -> int:
        n = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stops:  # the longest tail that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    n = max(n, k)
                    break
        return n

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent:upto], upto
        return delta


class _Abandon(Exception):
    """Raised from the token callback to stop a job whose client is gone or whose time is up."""


class _StopString(Exception):
    """Raised from the token callback when a stop string ended the text."""


class Worker:
    """Runs jobs on ``engine`` one at a time in a daemon thread; ``submit`` refuses when the queue is full."""

    def __init__(self, engine, tokenizer, queue_size: int) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.thread = threading.Thread(target=self._loop, name="mobilemoe-generate", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(503, f"the server is busy: {self.jobs.maxsize} requests are already waiting; retry later",
                           type="server_error", code="queue_full") from None

    def close(self) -> None:
        self.jobs.put(None)

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.abandoned():
                continue
            try:
                self._run(job)
            except Exception:  # a bug must not kill the only worker: answer 500 and go on
                log.exception("generation failed")
                job.post(("error", APIError(500, "internal error during generation", type="server_error")))

    def _run(self, job: Job) -> None:
        stream = TextStream(self.tokenizer, job.stop_strings)

        def on_token(token: int) -> None:
            if job.abandoned():
                raise _Abandon
            delta = stream.push(token)
            if delta:
                job.post(("text", delta))
            if stream.stopped:
                raise _StopString

        try:
            result = self.engine.generate(job.prompt_ids, job.max_new_tokens, job.sampling, job.stop_ids,
                                          on_token=on_token)
            finish = result.stopped_by
        except _StopString:
            finish = "stop"
        except _Abandon:
            return
        except MobileMoEError as exc:  # input the app's checks let through: still the client's error
            job.post(("error", APIError(400, str(exc))))
            return
        rest = stream.finish()
        if rest:
            job.post(("text", rest))
        job.post(("done", finish, len(stream.ids)))
