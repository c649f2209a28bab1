"""Shared fixtures: a tiny random MoE checkpoint with a tiny BPE tokenizer, and hermetic task files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The sky is blue and the grass is green.",
    "Question: What is two plus two?\nAnswer: four. Question: What color is the sky?\nAnswer: blue.",
    "Janet has 16 eggs. She eats 3 and bakes 4, so she sells 9 eggs for $2 each: 9 * 2 = 18. #### 18",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "Sarah was a much better surgeon than Maria so Maria always got the harder cases.",
] * 20


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest (and steadiest on a shared machine) on one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from mobilemoe.checkpoint import save_checkpoint
    from mobilemoe.config import preset
    from mobilemoe.data.tokenizer import train_bpe
    from mobilemoe.model import MobileMoEForCausalLM

    out = tmp_path_factory.mktemp("ckpt")
    tok = train_bpe(CORPUS, vocab_size=320)
    torch.manual_seed(0)
    model = MobileMoEForCausalLM(preset("tiny-moe", num_hidden_layers=2, max_position_embeddings=256))
    model.reset_parameters(seed=0)
    with torch.no_grad():  # sharper logits than N(0, 0.02) so argmax/greedy tests are not all ties
        model.model.embed_tokens.weight.mul_(10)
    save_checkpoint(model, out)
    tok.save(out)
    return out


@pytest.fixture(scope="session")
def tiny_lm(tiny_ckpt):
    from mobilemoe.eval import load_eval_lm

    return load_eval_lm(tiny_ckpt, batch_size=4)


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


ARC = [{"query": "Question: What color is the sky?", "choices": ["blue", "green", "red", "a big yellow"], "gold": 0},
       {"query": "Question: What do cows drink?", "choices": ["water", "milk", "oil", "juice"], "gold": 0},
       {"query": "Question: Two plus two?", "choices": ["three", "four", "five", "six"], "gold": 1}]
WINO = [{"context_options": ["Sarah was better than Maria so Sarah", "Sarah was better than Maria so Maria"],
         "continuation": "got the harder cases.", "gold": 1},
        {"context_options": ["The fox jumped over the dog because the fox", "The fox jumped over the dog because the dog"],
         "continuation": "was lazy.", "gold": 1}]
LAMBADA = [{"context": "The quick brown fox jumps over the lazy", "continuation": "dog"},
           {"context": "The sky is blue and the grass is", "continuation": "green"}]
GSM = [{"question": "Janet has 16 eggs and eats 3. How many are left?", "answer": "16 - 3 = 13\n#### 13"},
       {"question": "What is 1,000 + 234?", "answer": "#### 1,234"}]
HUMANEVAL = [{"task_id": "T/0", "prompt": "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n",
              "entry_point": "add", "canonical_solution": "    return a + b\n",
              "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"}]
MMLU_HEADER = "question,choice0,choice1,choice2,choice3,answer\n"


@pytest.fixture()
def data_dir(tmp_path) -> Path:
    """A small data folder laid out like shared/data."""
    root = tmp_path / "data"
    write_jsonl(root / "arc_easy/arc_easy.jsonl", ARC)
    write_jsonl(root / "winogrande/winogrande.jsonl", WINO)
    write_jsonl(root / "lambada_openai/lambada_openai.jsonl", LAMBADA)
    write_jsonl(root / "gsm8k/test.jsonl", GSM)
    he = root / "humaneval/HumanEval.jsonl.gz"
    he.parent.mkdir(parents=True)
    with gzip.open(he, "wt", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in HUMANEVAL))
    for split in ("dev", "test"):
        for subject in ("astronomy", "virology"):
            p = root / "mmlu" / split / f"{subject}_{split}.csv"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(MMLU_HEADER + "".join(f'"{subject} q{i}, with comma?",a,b,c,d,{i % 4}\n' for i in range(3)))
    (root / "wikitext-2").mkdir()
    (root / "wikitext-2/test.txt").write_text(" ".join(CORPUS[:5]) * 3)
    return root
