"""The server's queue, timeout, cancellation and stop-string streaming, on a slow fake engine (in process)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import openai
import pytest

from mobilemoe.data.chat_format import load_chat_format
from mobilemoe.data.tokenizer import train_bpe
from mobilemoe.serve import ServeSettings, create_app
from mobilemoe.serve.worker import TextStream

TEXT = "hello world, the sky is blue and the grass is green; stop here please. " * 10


@pytest.fixture(scope="module")
def chat_format(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_bpe([TEXT] * 5, vocab_size=300).save(d)
    return load_chat_format(d)


class SlowEngine:
    """Emits the token ids of ``TEXT`` one by one, ``delay`` seconds apart; records how far each run got."""

    def __init__(self, tokenizer, delay: float) -> None:
        self.ids = tokenizer.encode(TEXT)
        self.config = SimpleNamespace(vocab_size=tokenizer.vocab_size)
        self.backend = SimpleNamespace(max_seq_len=4096)
        self.delay, self.runs = delay, []

    def generate(self, prompt_ids, max_new_tokens, sampling, stop_ids, on_token=None):
        run = {"tokens": 0, "finished": False}
        self.runs.append(run)
        for i in range(max_new_tokens):
            time.sleep(self.delay)
            on_token(self.ids[i % len(self.ids)])  # raises when the server abandons the job
            run["tokens"] += 1
        run["finished"] = True
        return SimpleNamespace(stopped_by="length")


def start(serve_app, chat_format, delay: float, **settings):
    engine = SlowEngine(chat_format.tokenizer, delay)
    base = serve_app(create_app(engine, chat_format, ServeSettings(model_name="slow", **settings)))
    return engine, base


def post(base: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(base + "/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_for(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_text_stream_trims_a_stop_string_split_across_tokens(chat_format):
    tok = chat_format.tokenizer
    ids = tok.encode("the sky is blue")
    stream = TextStream(tok, ["sky is"])
    out = ""
    for t in ids:
        out += stream.push(t)
        assert "s" not in out[len("the "):] or stream.stopped  # "s..." is held while it may start the stop
        if stream.stopped:
            break
    assert stream.stopped and out + stream.finish() == "the "


def test_text_stream_holds_a_split_utf8_character(chat_format):
    tok = chat_format.tokenizer
    ids = tok.encode("é!")  # not in the training text: one byte token each for 0xC3 0xA9
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in ids] + [stream.finish()]
    assert "\ufffd" not in "".join(pieces) and "".join(pieces) == "é!"


def test_client_disconnect_stops_the_generation(serve_app, chat_format):
    engine, base = start(serve_app, chat_format, delay=0.01)
    with openai.OpenAI(base_url=base, api_key="x", max_retries=0) as client:
        stream = client.completions.create(model="slow", prompt="a", max_tokens=2000, stream=True)
        for _ in zip(range(3), stream):
            pass
        stream.close()
        tokens_then = engine.runs[0]["tokens"]
        assert wait_for(lambda: len(engine.runs) == 1 and engine.runs[0]["tokens"] < tokens_then + 100)
        time.sleep(0.2)
        stopped_at = engine.runs[0]["tokens"]
        time.sleep(0.2)
        assert engine.runs[0]["tokens"] == stopped_at < 2000 and not engine.runs[0]["finished"]
        out = client.completions.create(model="slow", prompt="a", max_tokens=3)  # the worker is free
    assert out.usage.completion_tokens == 3 and engine.runs[1]["finished"]


def test_full_queue_is_refused_with_503(serve_app, chat_format):
    engine, base = start(serve_app, chat_format, delay=0.01, queue_size=1)
    results = []
    busy = threading.Thread(target=lambda: results.append(post(base, {"model": "slow", "prompt": "a",
                                                                       "max_tokens": 60})))
    busy.start()
    assert wait_for(lambda: engine.runs)  # generating; the next one waits in the queue
    waiting = threading.Thread(target=lambda: results.append(post(base, {"model": "slow", "prompt": "a",
                                                                          "max_tokens": 1})))
    waiting.start()
    time.sleep(0.1)
    status, body = post(base, {"model": "slow", "prompt": "a", "max_tokens": 1})
    busy.join(), waiting.join()
    assert status == 503 and body["error"]["code"] == "queue_full"
    assert sorted(s for s, _ in results) == [200, 200]


def test_request_timeout_answers_504_and_frees_the_worker(serve_app, chat_format):
    engine, base = start(serve_app, chat_format, delay=0.01, request_timeout_s=0.3)
    status, body = post(base, {"model": "slow", "prompt": "a", "max_tokens": 1000})
    assert status == 504 and body["error"]["code"] == "request_timeout"
    assert wait_for(lambda: engine.runs[0]["tokens"] < 100 and post(base, {"model": "slow", "prompt": "a",
                                                                            "max_tokens": 2})[0] == 200)
    assert not engine.runs[0]["finished"]
