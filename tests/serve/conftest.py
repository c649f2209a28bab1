"""Fixtures of the server tests: a tiny INT4 checkpoint with a tokenizer, ``mobilemoe serve`` on it in a
subprocess on a free loopback port, and an in-process server (a uvicorn thread) for fake engines."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

MODEL_NAME = "tiny-chat"  # the served id (the checkpoint directory name)
TEXT = ("The quick brown fox jumps over the lazy dog. The sky is blue and the grass is green. "
        "Question: what is two plus two? Answer: four. def add(a, b): return a + b\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    """Poll ``GET /v1/models`` until the server answers."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(f"{base}/models", timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"no server at {base} after {timeout} s")


@pytest.fixture(scope="session")
def chat_ckpt(tmp_path_factory) -> Path:
    """A seeded random tiny-moe INT4 checkpoint (128 positions) with a trained BPE tokenizer.json."""
    from mobilemoe.checkpoint import save_checkpoint
    from mobilemoe.config import preset
    from mobilemoe.data.tokenizer import train_bpe
    from mobilemoe.model import MobileMoEForCausalLM
    from mobilemoe.quant import quantize_checkpoint

    root = tmp_path_factory.mktemp("serve")
    tok = train_bpe([TEXT] * 20, vocab_size=300)
    model = MobileMoEForCausalLM(preset("tiny-moe", vocab_size=tok.vocab_size, max_position_embeddings=128))
    model.reset_parameters(seed=3)
    save_checkpoint(model, root / "float")
    tok.save(root / "float")
    quantize_checkpoint(root / "float", root / MODEL_NAME)  # the tokenizer travels with the weights
    return root / MODEL_NAME


@pytest.fixture(scope="session")
def server(chat_ckpt):
    """``mobilemoe serve`` in a subprocess; yields its base URL (``http://127.0.0.1:PORT/v1``)."""
    port = free_port()
    cmd = [sys.executable, "-m", "mobilemoe.cli", "serve", "--model", str(chat_ckpt), "--port", str(port),
           "--log-level", "warning", "--request-timeout", "30"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        wait_ready(base, proc)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def client(server):
    import openai

    with openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=30) as c:
        yield c


@pytest.fixture
def serve_app():
    """``serve_app(app)`` runs an ASGI app with uvicorn in a thread on a free port; returns the base URL."""
    import uvicorn

    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(app) -> str:
        port = free_port()
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        servers.append((srv, thread))
        base = f"http://127.0.0.1:{port}/v1"
        wait_ready(base, timeout=20)
        return base

    yield start
    for srv, thread in servers:
        srv.should_exit = True
        thread.join(timeout=10)
