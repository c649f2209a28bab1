"""`generate --chat` / `chat` on a checkpoint with a Llama 3 chat_template: the prompt is transformers'
rendering (reported as `prompt_ids`), and generation stops at `<|eot_id|>` or any id of the eos lists."""

import io
import json

import pytest
import torch
# tests/ is on sys.path (pyproject pythonpath)
from data.test_chat_format import BOT, EOT, EOT_TEXT, LLAMA3_TEMPLATE, transformers_ids, write_llama3_tokenizer

from mobilemoe.checkpoint import save_checkpoint
from mobilemoe.cli import main
from mobilemoe.config import preset
from mobilemoe.data.tokenizer import Tokenizer
from mobilemoe.model import MobileMoEForCausalLM
from mobilemoe.runtime import engine as engine_mod

SYSTEM, QUESTION = "You are a helpful assistant.", "What is two plus two?"
CONFIG_EOS, GENERATION_EOS = 7, 9  # extra ids in config.json's and generation_config.json's eos lists


@pytest.fixture(scope="module")
def llama3_ckpt(tmp_path_factory):
    """A tiny float checkpoint (eos_token_id a list, as released) with the Llama 3 tokenizer and template."""
    d = tmp_path_factory.mktemp("llama3-chat") / "ckpt"
    model = MobileMoEForCausalLM(preset("tiny-moe", max_position_embeddings=128, eos_token_id=[EOT_TEXT, CONFIG_EOS]))
    model.reset_parameters(seed=3)
    save_checkpoint(model, d)
    write_llama3_tokenizer(d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOT_TEXT, GENERATION_EOS]}))
    return d


@pytest.fixture
def scripted(monkeypatch):
    """``scripted(tokens)``: the reference backend's forward returns logits whose argmax is the next
    scripted token, one per forward call (the prefill gives the first)."""

    def install(tokens):
        calls = []

        def forward(self, ids, start_pos):
            calls.append(list(ids))
            logits = torch.zeros(self.config.vocab_size)
            logits[tokens[min(len(calls), len(tokens)) - 1]] = 1.0
            return logits

        monkeypatch.setattr(engine_mod.ReferenceBackend, "forward", forward)
        return calls

    return install


def _generate(capsys, ckpt, *flags) -> dict:
    args = ["generate", "--model", str(ckpt), "--backend", "reference", "--max-new-tokens", "6", "--json", *flags]
    assert main(args) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_chat_prompt_ids_are_transformers(llama3_ckpt, capsys):
    """A real forward pass over the rendered prompt; --json reports exactly the ids fed to the model."""
    rec = _generate(capsys, llama3_ckpt, "--chat", "--system", SYSTEM, "--prompt", QUESTION)
    expected = transformers_ids(llama3_ckpt, [{"role": "system", "content": SYSTEM},
                                              {"role": "user", "content": QUESTION}])
    assert rec["prompt_ids"] == expected and rec["prompt_tokens"] == len(expected)
    assert rec["chat_template"] == "checkpoint chat_template"
    no_system = _generate(capsys, llama3_ckpt, "--chat", "--prompt", QUESTION)["prompt_ids"]
    assert no_system == transformers_ids(llama3_ckpt, [{"role": "user", "content": QUESTION}])


@pytest.mark.parametrize("stop", [EOT, EOT_TEXT, CONFIG_EOS, GENERATION_EOS])
def test_chat_stops_at_eot_and_every_eos(llama3_ckpt, capsys, scripted, stop):
    calls = scripted([20, 21, stop, 22, 23])
    rec = _generate(capsys, llama3_ckpt, "--chat", "--prompt", QUESTION)
    assert rec["stopped_by"] == "stop" and rec["ids"] == [20, 21]
    assert calls[0] == rec["prompt_ids"] and calls[1:] == [[20], [21]]


def test_plain_prompt_bos_and_no_turn_end_stop(llama3_ckpt, capsys, scripted):
    """A plain prompt gets the BOS the tokenizer adds; <|eot_id|> ends chat turns only."""
    scripted([20, EOT, 21, GENERATION_EOS])
    rec = _generate(capsys, llama3_ckpt, "--prompt", QUESTION)
    assert rec["prompt_ids"] == [BOT] + Tokenizer.load(llama3_ckpt).encode(QUESTION) and "chat_template" not in rec
    assert rec["ids"] == [20, EOT, 21] and rec["stopped_by"] == "stop"


def test_chat_command_renders_every_turn(llama3_ckpt, capsys, scripted, monkeypatch):
    calls = scripted([20, EOT])
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi there\nAnd again\n\n"))
    assert main(["chat", "--model", str(llama3_ckpt), "--backend", "reference", "--system", SYSTEM,
                 "--max-new-tokens", "4"]) == 0
    prompts = [c for c in calls if len(c) > 1]  # prefills; decode steps feed one token
    answer = Tokenizer.load(llama3_ckpt).decode([20])  # the first reply, fed back as the assistant turn
    turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi there"}]
    assert prompts[0] == transformers_ids(llama3_ckpt, turns)
    turns += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And again"}]
    assert prompts[1] == transformers_ids(llama3_ckpt, turns)


def test_chat_flag_errors(llama3_ckpt, tmp_path, capsys):
    for args, message in [(["--system", "x", "--prompt", "hi"], "--system needs --chat"),
                          (["--chat", "--prompt", "hi"], "no tokenizer.json")]:
        model = llama3_ckpt if "--system" in args else tmp_path
        assert main(["generate", "--model", str(model), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_import_and_quantize_carry_the_chat_files(llama3_ckpt, tmp_path):
    """The tokenizer, chat_template.jinja and generation config travel through import hf and quantize,
    so the imported and INT4 checkpoints render and stop exactly like the source."""
    from mobilemoe.data.chat_format import load_chat_format
    from mobilemoe.export.hf import export_hf, import_hf
    from mobilemoe.quant import quantize_checkpoint

    hf = export_hf(llama3_ckpt, tmp_path / "hf")  # then laid out as transformers saves a chat model:
    (hf / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>"}))
    (hf / "chat_template.jinja").write_text(LLAMA3_TEMPLATE)
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOT_TEXT, GENERATION_EOS]}))
    imported = import_hf(hf, tmp_path / "imported")
    quantize_checkpoint(imported, tmp_path / "int4")
    src, turn = load_chat_format(llama3_ckpt), [{"role": "user", "content": QUESTION}]
    for d in (imported, tmp_path / "int4"):
        fmt = load_chat_format(d)
        assert (d / "chat_template.jinja").is_file() and (d / "generation_config.json").is_file()
        assert fmt.source == src.source and fmt.stop_ids == src.stop_ids, d
        assert fmt.prompt_ids(turn) == src.prompt_ids(turn)
