"""The HF remote code is mobilemoe's own model: copies of the package sources plus thin wrappers."""

import ast
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mobilemoe
from mobilemoe.checkpoint import load_model
from mobilemoe.config import MobileMoEConfig
from mobilemoe.export import hf as hf_export
from mobilemoe.export.hf import REMOTE_FILES, export_hf, remote_code, ship_source

transformers = pytest.importorskip("transformers")
from transformers.dynamic_module_utils import get_class_from_dynamic_module, get_imports  # noqa: E402

PACKAGE = Path(mobilemoe.__file__).parent
# what an HF user needs besides the standard library (yaml: a lazy import of utils.py; transformers needs it)
ALLOWED_IMPORTS = {"torch", "transformers", "yaml"}


@pytest.fixture(scope="module")
def exported(ckpts, tmp_path_factory):
    return export_hf(ckpts["float"], tmp_path_factory.mktemp("remote") / "hf")


def _shipped_sources(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.py") if p.name not in REMOTE_FILES)


def test_shipped_sources_are_the_package_sources(exported):
    shipped = _shipped_sources(exported)
    assert {"model.py", "moe.py", "config.py"} <= set(shipped)
    assert set(shipped) | set(REMOTE_FILES) == set(remote_code())
    for name in shipped:
        source = (PACKAGE / name).read_text(encoding="utf-8")
        copy = (exported / name).read_text(encoding="utf-8")
        assert copy == ship_source(source), name
        # the documented rewrite is the only change: `from mobilemoe.X import` -> `from .X import`
        before, after = source.splitlines(), copy.splitlines()
        assert len(before) == len(after)
        for a, b in zip(before, after):
            assert a == b or (a.lstrip().startswith("from mobilemoe.")
                              and b == a.replace("from mobilemoe.", "from .", 1)), (name, a, b)


def test_shipped_code_needs_only_torch_and_transformers(exported):
    for path in exported.glob("*.py"):
        third_party = set(get_imports(path)) - set(sys.stdlib_module_names)
        assert third_party <= ALLOWED_IMPORTS, (path.name, third_party)


def test_wrappers_restate_no_model(exported):
    """No math and no literal config defaults in the wrappers: those live in the shipped copies."""
    math_names = {"sigmoid", "softmax", "rsqrt", "sort", "topk", "silu", "cos", "sin", "linear",
                  "scaled_dot_product_attention", "Linear", "Embedding", "Parameter"}
    for name in REMOTE_FILES:
        tree = ast.parse((exported / name).read_text())
        numbers = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
                   and isinstance(n.value, (int, float)) and not isinstance(n.value, bool)]
        used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert not numbers, (name, numbers)
        assert not used & math_names, (name, used & math_names)


def test_config_defaults_come_from_the_dataclass(exported):
    hf_config = get_class_from_dynamic_module("configuration_mobilemoe.MobileMoEConfig", exported)()
    default = MobileMoEConfig()
    for f in dataclasses.fields(MobileMoEConfig):
        if f.name in ("extra", "torch_dtype", "rope_scaling"):
            continue
        assert getattr(hf_config, f.name) == getattr(default, f.name), f.name
    assert hf_config.to_model_config().to_dict() == default.to_dict()


def test_config_is_validated_by_the_dataclass(exported):
    config_class = get_class_from_dynamic_module("configuration_mobilemoe.MobileMoEConfig", exported)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        config_class(num_attention_heads=12, num_key_value_heads=5)


_CHILD = """
import sys
sys.modules["mobilemoe"] = None  # an HF user without the package: any import of it fails
import torch, transformers
hf = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    torch.save(hf(torch.tensor([[int(t) for t in sys.argv[3].split(",")]])).logits, sys.argv[2])
"""


def test_loads_without_mobilemoe_installed(exported, ckpts, prompt, tmp_path):
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", _CHILD, str(exported), str(tmp_path / "logits.pt"),
                    ",".join(map(str, prompt))], check=True, env=env, cwd=tmp_path, timeout=120)
    with torch.no_grad():
        ref = load_model(ckpts["float"]).eval()(torch.tensor([prompt])).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), ref)


def test_unshippable_import_is_one_error(tmp_path, monkeypatch):
    (tmp_path / "model.py").write_text("import mobilemoe.kernels\n")
    monkeypatch.setattr(hf_export, "PACKAGE_DIR", tmp_path)
    with pytest.raises(hf_export.ExportError, match="cannot ship 'import mobilemoe"):
        remote_code()
