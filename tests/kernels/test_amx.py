"""The AMX-BF16 gemm (isa_amx.cpp) against the AVX-512 VNNI and portable gemms, without torch.

tests/kernels/amx_driver.cpp is compiled with g++ together with the three kernel units (each with
its setup.py flags) and run; it compares on odd shapes (m = 1..300 with AMX-sized tails and VNNI
tails, 1..5 tiles, 1..70 K blocks, n_valid tails, linear and expert scaling), against a double
reference of the exact terms q * d * code * w_scale, with S = the sum of their |values|:
  * AMX within (2^-7 + 2^-15 + (K + 1) * 2^-24 * (1 + 2^-6)) * S: its operands are rounded to bf16
    (A = bf16(q * d), B = bf16(code * w_scale), 8 significant bits: 2^-8 relative each), the
    products are exact and the K of them accumulate in fp32 (derivation: amx_bound in the driver),
  * the bf16 expert entry (expert_gemm_bf16: bf16 rows, B = bf16(code * sn * smax)) within
    (2^-8 + 2^-22 + (K + 1) * 2^-24 * (1 + 2^-7)) * S (expert_bound),
  * AVX-512 VNNI and portable within (nkb + 2) * 1.2e-7 * S (exact integer block sums),
  * AMX vs AVX-512 within the sum of both bounds (no longer bit for bit),
  * no column outside [16*t0, min(16*t1, n_valid)) written, and a fresh thread (no tile
    configuration of its own yet) getting the identical result.
Skips, saying why, off x86-64, without g++, or where the CPU/OS lacks AMX-BF16 or the kernel
refuses arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA).
"""

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "src" / "mobilemoe" / "kernels" / "csrc"
DRIVER = Path(__file__).with_name("amx_driver.cpp")
BASE = ["-O2", "-std=c++17", "-fno-math-errno", "-Wall", "-Wno-unused-function", f"-I{CSRC}"]
AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-mf16c"]
UNITS = {  # the flags setup.py's ISA_UNITS gives each unit
    "isa_portable.cpp": [],
    "isa_avx512.cpp": AVX512,
    "isa_amx.cpp": AVX512 + ["-mavx512bf16", "-mamx-tile", "-mamx-bf16"],
}
SKIP = 77  # the driver's "AMX not usable here" status

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("g++") is None,
    reason="the AMX kernels need x86-64 and g++",
)


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    """The compiled driver binary (units compiled separately, as setup.py does)."""
    out = tmp_path_factory.mktemp("amx")
    objects = []
    for unit, flags in UNITS.items():
        obj = out / (Path(unit).stem + ".o")
        subprocess.run(["g++", *BASE, *flags, "-c", str(CSRC / unit), "-o", str(obj)], check=True)
        objects.append(str(obj))
    exe = out / "amx_driver"
    subprocess.run(["g++", *BASE, str(DRIVER), *objects, "-o", str(exe), "-lpthread"], check=True)
    return exe


def _run(driver: Path, mode: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(driver), mode], capture_output=True, text=True, timeout=120)
    if proc.returncode == SKIP:
        pytest.skip(proc.stdout.strip())
    return proc


def test_amx_gemm_matches_vnni_and_portable(driver):
    proc = _run(driver, "check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(ln.startswith("OK: ") and " 0 mismatches" in ln for ln in lines), proc.stdout


def test_driver_rejects_unknown_mode(driver):
    """The driver's own argument check (so a typo in a mode cannot pass silently)."""
    proc = _run(driver, "nonsense")
    assert proc.returncode == 2 and "usage" in proc.stdout
