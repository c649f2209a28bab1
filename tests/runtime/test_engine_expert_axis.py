"""INT4 checkpoints whose routed experts are grouped along `in`: the native runtime (which reads only
`out`) is never handed one; `auto` runs them on the reference backend and says so once."""

import json

import pytest
import torch

from mobilemoe.checkpoint import load_model
from mobilemoe.cli import main
from mobilemoe.errors import MobileMoEError
from mobilemoe.runtime import Engine
from mobilemoe.runtime.engine import ReferenceBackend
from mobilemoe.runtime.offload import ExpertOffload, write_expert_store


@pytest.fixture(scope="module")
def in_ckpt(make_int4_checkpoint):
    return make_int4_checkpoint("tiny-moe", seed=2, expert_quant_group_axis="in")


def test_auto_runs_the_reference_backend_and_says_so_once(in_ckpt, capsys):
    engine = Engine.load(in_ckpt)
    assert isinstance(engine.backend, ReferenceBackend)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "quantization.expert_group_axis" in err and "reference" in err
    Engine.load(in_ckpt)  # said once per checkpoint
    assert capsys.readouterr().err == ""
    ids = [1, 5, 9, 100]
    got = engine.generate(ids, max_new_tokens=6)
    with torch.no_grad():  # greedy decode of the exact INT4 forward
        model, seq = load_model(in_ckpt).eval(), list(ids)
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert got.ids == seq[len(ids):]


def test_generate_cli_works_on_an_in_axis_checkpoint(in_ckpt, capsys):
    assert main(["generate", "--model", str(in_ckpt), "--prompt-ids", "1,2,3", "--max-new-tokens", "4",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["ids"]) == 4


@pytest.mark.parametrize("kwargs, what", [(dict(backend="native"), "--backend native"),
                                          (dict(offload=ExpertOffload(capacity=2)), "offloading")])
def test_native_and_offloading_refuse_with_one_line(in_ckpt, kwargs, what):
    with pytest.raises(MobileMoEError) as info:
        Engine.load(in_ckpt, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and str(in_ckpt / "config.json") in msg and what in msg
    assert "'quantization.expert_group_axis'" in msg and "--backend reference" in msg


def test_expert_store_refuses_in_axis(in_ckpt, tmp_path):
    with pytest.raises(MobileMoEError, match="expert_group_axis"):
        write_expert_store(in_ckpt, tmp_path / "store")
    assert not (tmp_path / "store").exists()
