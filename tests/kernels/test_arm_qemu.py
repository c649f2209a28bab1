"""The aarch64 kernel tables (neon, dotprod, i8mm), tested without ARM hardware.

``scripts/test_arm.sh`` cross-compiles the torch-free kernel units with ``tests/arm/driver.cpp`` and runs
the driver under ``qemu-aarch64`` on three CPU models (``max``: all variants, ``cortex-a76``: dotprod,
``cortex-a53``: baseline NEON), comparing every table entry with the portable kernels and checking the
runtime feature detection. Skipped when the tool-chain is missing (Debian ``g++-aarch64-linux-gnu`` and
``qemu-user``); with ``MOBILEMOE_REQUIRE_ALL=1`` (CI) a missing tool-chain fails instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "test_arm.sh"
TOOLS = ("aarch64-linux-gnu-g++", "qemu-aarch64")


def _require_toolchain() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not missing:
        return
    msg = f"no aarch64 tool-chain ({', '.join(missing)} not found; apt-get install g++-aarch64-linux-gnu qemu-user)"
    if os.environ.get("MOBILEMOE_REQUIRE_ALL", "") not in ("", "0"):
        pytest.fail(f"{msg}; $MOBILEMOE_REQUIRE_ALL is set", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def arm_run(tmp_path_factory) -> subprocess.CompletedProcess:
    """One build and qemu run of the driver, shared by the tests below."""
    _require_toolchain()
    build = tmp_path_factory.mktemp("arm")
    env = dict(os.environ, ARM_BUILD_DIR=str(build))
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=300)


def test_every_variant_matches_portable_under_qemu(arm_run):
    out = arm_run.stdout + arm_run.stderr
    assert arm_run.returncode == 0, out[-4000:]
    total = re.search(r"^test_arm: (\d+) passed, (\d+) failed$", arm_run.stdout, re.M)
    assert total and int(total.group(1)) > 1000 and total.group(2) == "0", out[-4000:]
    for variant in ("neon", "dotprod", "i8mm"):  # each was actually run (on -cpu max at least)
        assert re.search(rf"^variant {variant}: ok", arm_run.stdout, re.M), out[-4000:]


def test_runtime_detection_picks_the_cpu_best(arm_run):
    picks = re.findall(r"^cpu features: dotprod=(\d) i8mm=(\d) -> best (\w+)$", arm_run.stdout, re.M)
    assert picks == [("1", "1", "i8mm"), ("1", "0", "dotprod"), ("0", "0", "neon")], arm_run.stdout[-4000:]


def test_script_skips_cleanly_without_toolchain(tmp_path):
    """A missing cross compiler is a one-line skip with exit 0, not a failure (make test on any box)."""
    env = dict(os.environ, CXX_AARCH64=str(tmp_path / "no-such-g++"))
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("skipped: no aarch64 tool-chain"), res.stdout + res.stderr


def _layer_units() -> list[str]:
    """setup.py's LAYER_UNITS: the torch-side translation units (every one but the ISA units)."""
    import ast
    import re

    text = (ROOT / "setup.py").read_text()
    return list(ast.literal_eval(re.search(r"^LAYER_UNITS = (\(.*?\))$", text, re.M | re.S).group(1)))


@pytest.mark.parametrize("unit", _layer_units())
def test_extension_sources_compile_for_aarch64(unit):
    """The torch-side units (bindings, model, ops, pool, dispatch) hold no x86-only code outside their guards: they
    pass aarch64-linux-gnu-g++'s front end against this torch's headers (a syntax check; the
    extension itself is not linked for aarch64 here)."""
    if shutil.which("aarch64-linux-gnu-g++") is None:
        _require_toolchain()
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    csrc = ROOT / "src" / "mobilemoe" / "kernels" / "csrc"
    cmd = ["aarch64-linux-gnu-g++", "-std=c++17", "-fsyntax-only", "-fopenmp", "-w", f"-I{csrc}",
           *(f"-I{p}" for p in include_paths()), f"-I{sysconfig.get_paths()['include']}",
           "-DTORCH_EXTENSION_NAME=_C", str(csrc / unit)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
