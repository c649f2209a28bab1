"""``mobilemoe serve`` on a tiny INT4 checkpoint, driven by the real ``openai`` client over loopback."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from mobilemoe.cli import main

MODEL_NAME = "tiny-chat"  # the served id: the checkpoint directory's name (conftest.chat_ckpt)
CHAT = [{"role": "user", "content": "what is two plus two?"}]
SAMPLED = dict(temperature=0.9, top_p=0.95, seed=7, max_tokens=12)


def generate_chat(ckpt, capsys) -> dict:
    """``mobilemoe generate --chat --json`` with the SAMPLED settings."""
    capsys.readouterr()
    assert main(["generate", "--model", str(ckpt), "--prompt", CHAT[0]["content"], "--chat", "--json",
                 "--temperature", "0.9", "--top-p", "0.95", "--seed", "7", "--max-new-tokens", "12"]) == 0
    return json.loads(capsys.readouterr().out)


def post_raw(base: str, path: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(base + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_chat_completion_equals_generate(client, chat_ckpt, capsys):
    ref = generate_chat(chat_ckpt, capsys)
    out = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, **SAMPLED)
    assert out.choices[0].message.content == ref["text"]
    assert out.choices[0].finish_reason == ref["stopped_by"]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (ref["prompt_tokens"], ref["generated_tokens"])
    assert out.usage.total_tokens == ref["prompt_tokens"] + ref["generated_tokens"]


def test_streamed_chat_completion_equals_generate(client, chat_ckpt, capsys):
    ref = generate_chat(chat_ckpt, capsys)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=CHAT, stream=True,
                                                 stream_options={"include_usage": True}, **SAMPLED))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref["stopped_by"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref["generated_tokens"]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_and_is_trimmed(client, stream):
    args = dict(model=MODEL_NAME, prompt="The sky is", max_tokens=16, temperature=1.0, seed=5)
    full = client.completions.create(**args).choices[0].text
    assert len(full) > 6, full
    stop = full[3:5]  # a stop string that occurs: the text ends before its first occurrence
    if stream:
        chunks = list(client.completions.create(stop=[stop, "never-there"], stream=True, **args))
        text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        out = client.completions.create(stop=stop, **args).choices[0]
        text, finish = out.text, out.finish_reason
    assert (text, finish) == (full[:full.index(stop)], "stop")


def test_bad_requests_get_openai_errors(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-5", messages=CHAT)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:  # 128-token context
        client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=500)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="x " * 300)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "tool", "content": "x"}])
    assert e.value.body["param"] == "messages"
    status, body = post_raw(server, "/chat/completions", b'{"model": "tiny-chat", "messages": [')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = post_raw(server, "/completions", json.dumps({"model": MODEL_NAME, "prompt": "a", "n": 2}).encode())
    assert status == 400 and body["error"]["param"] == "n"
    status, body = post_raw(server, "/nowhere", b"{}")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}
    # and the server still answers
    assert client.completions.create(model=MODEL_NAME, prompt="a", max_tokens=2).usage.completion_tokens == 2


def test_client_disconnect_mid_stream_then_next_request_served(client, server, chat_ckpt, capsys):
    with openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=30) as other:
        stream = other.chat.completions.create(model=MODEL_NAME, messages=CHAT, stream=True, max_tokens=100,
                                               temperature=1.0, seed=1)
        for i, _ in zip(range(3), stream):
            pass
        stream.close()  # drop the connection with the reply half read
    ref = generate_chat(chat_ckpt, capsys)
    out = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, **SAMPLED)
    assert out.choices[0].message.content == ref["text"]
