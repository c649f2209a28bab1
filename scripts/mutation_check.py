"""Mutation check: break one piece of the math at a time and show which tests catch it.

Each mutation is a small source edit (old -> new text) applied to a TEMPORARY copy of ``src/``
(the compiled ``mobilemoe/_C*.so`` travels with it); the selected test files then run against that
copy through ``PYTHONPATH``. The working tree is never written. A mutation that no test catches is
a finding (a missing test); a mutation whose ``old`` text is no longer in the source is reported as
stale, so the list cannot silently stop testing anything.

C++ mutations (``--cxx``) rebuild the extension in the temporary copy (a couple of minutes each).

    .venv/bin/python scripts/mutation_check.py              # every Python mutation
    .venv/bin/python scripts/mutation_check.py --only ties_to_higher_index --cxx
    .venv/bin/python scripts/mutation_check.py --json       # machine-readable table
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Test files per concept: each mutation runs only the files that could plausibly catch it.
ROUTING = ["tests/test_moe.py", "tests/kernels/test_native_math.py"]
ATTENTION = ["tests/test_model.py", "tests/kernels/test_native_math.py"]
INT4 = ["tests/quant/test_quant_int4.py", "tests/quant/test_quant_convert.py", "tests/kernels/test_kernels.py",
        "tests/eval/test_scoring.py"]


# One edit: alternative (old, new) spellings of the same change, so a mutation keeps finding its
# line while the source is reworked; the first old text found in exactly one file is used.
Edit = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Mutation:
    name: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]
    cxx: bool = False  # a C++ edit: needs a rebuild of mobilemoe._C


def one(name: str, old: str, new: str, tests: list[str], *alternatives: tuple[str, str],
        cxx: bool = False) -> Mutation:
    """A mutation of one edit (with optional other spellings of it)."""
    return Mutation(name, (((old, new), *alternatives),), tuple(tests), cxx)


MUTATIONS = [
    one("rope_half_split",
        "    xf = x.float().unflatten(-1, (-1, 2))\n    x0, x1 = xf[..., 0], xf[..., 1]\n"
        "    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)\n"
        "    return out.flatten(-2).to(x.dtype)",
        "    x0, x1 = x.float().chunk(2, dim=-1)\n"
        "    return torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).to(x.dtype)", ATTENTION),
    one("drop_selection_bias", "select(scores + expert_bias.float(), cfg.num_experts_per_tok)",
        "select(scores, cfg.num_experts_per_tok)", ROUTING,
        ("selection = scores + expert_bias.float()", "selection = scores")),
    one("ties_to_higher_index",
        "torch.sort(selection, dim=-1, descending=True, stable=True).indices[..., :k]",
        "(selection.shape[-1] - 1 - torch.sort(selection.flip(-1), dim=-1, descending=True,"
        " stable=True).indices)[..., :k]", ROUTING),
    one("static_topk_ties_to_higher_index", "((rival == mine) & (idx[None, :] < idx[:, None]))",
        "((rival == mine) & (idx[None, :] > idx[:, None]))", ROUTING + ["tests/export/test_export_executorch.py"]),
    one("forget_routed_scaling_factor", "weights = weights * cfg.routed_scaling_factor", "weights = weights",
        ROUTING),
    one("skip_topk_renormalisation",
        "    if cfg.norm_topk_prob:\n        weights = weights / weights.sum(dim=-1, keepdim=True)",
        "    pass", ROUTING),
    one("swiglu_gate_up_swapped", "return self.activation(F.silu(gate) * up) @ down",
        "return self.activation(F.silu(up) * gate) @ down", ["tests/test_moe.py", "tests/test_model.py"]),
    one("skip_qk_norm", "if self.cfg.use_qk_norm:", "if False:", ATTENTION),
    one("rms_norm_sum_not_mean", "xf.pow(2).mean(-1, keepdim=True) + eps", "xf.pow(2).sum(-1, keepdim=True) + eps",
        ATTENTION),
    one("causal_mask_off_by_one", "torch.arange(S, device=device)[None, :] <= pos_q",
        "torch.arange(S, device=device)[None, :] < pos_q", ["tests/test_model.py"],
        ("torch.arange(S, device=x.device)[None, :] <= pos_q", "torch.arange(S, device=x.device)[None, :] < pos_q")),
    one("llama3_scaling_inverted", "scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)",
        "scaled = torch.where(wavelen > low_freq_wavelen, inv_freq * factor, inv_freq)",
        ["tests/test_model.py", "tests/test_rope_llama3.py"]),
    # Packing and unpacking both flipped: every round trip still works; only the format's fixed
    # byte layout (hand-made bytes, the native kernels' own decoder) can tell.
    Mutation("nibble_order_flipped", (
        (("nib[..., 0::2] | (nib[..., 1::2] << 4)", "(nib[..., 0::2] << 4) | nib[..., 1::2]"),),
        (("torch.stack((packed & 0xF, packed >> 4), dim=-1)", "torch.stack((packed >> 4, packed & 0xF), dim=-1)"),
         ("torch.stack((low, high), dim=-1)", "torch.stack((high, low), dim=-1)"))), tuple(INT4)),
    one("unpack_nibble_order_flipped", "torch.stack((packed & 0xF, packed >> 4), dim=-1)",
        "torch.stack((packed >> 4, packed & 0xF), dim=-1)", INT4,
        ("torch.stack((low, high), dim=-1)", "torch.stack((high, low), dim=-1)")),
    # C++ (--cxx, each rebuilds the extension): the native routing and RoPE.
    one("cxx_ties_to_higher_index", "if (sel[e] > sel[best]) best = e;", "if (sel[e] >= sel[best]) best = e;",
        ["tests/kernels/test_native_math.py"], cxx=True),
    one("cxx_drop_selection_bias", "sel[e] = s[e] + bp[e];", "sel[e] = s[e];", ["tests/kernels/test_native_math.py"],
        cxx=True),
    one("cxx_rope_sign", "v[2 * i] = x0 * c[i] - x1 * s[i];", "v[2 * i] = x0 * c[i] + x1 * s[i];",
        ["tests/kernels/test_native_math.py"], cxx=True),
]


def _find(expr: str) -> str:
    """The one file under src/ holding ``expr`` (relative path), or '' when none or several do."""
    hits = [p for p in (ROOT / "src").rglob("*") if p.suffix in (".py", ".cpp", ".h")
            and expr in p.read_text(encoding="utf-8")]
    return str(hits[0].relative_to(ROOT)) if len(hits) == 1 else ""


def _locate(edit: Edit) -> tuple[str, str, str] | None:
    """(path, old, new) of the first spelling present in exactly one source file."""
    for old, new in edit:
        path = _find(old)
        if path:
            return path, old, new
    return None


def _files(m: Mutation) -> str:
    return ", ".join(sorted({(_locate(e) or ("?",))[0] for e in m.edits}))


def _copy_tree(dst: Path, cxx: bool) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "src", dst / "src", ignore=ignore)  # includes mobilemoe/_C*.so
    if cxx:
        for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
            if (ROOT / name).exists():
                shutil.copy(ROOT / name, dst / name)


def _apply(m: Mutation, dst: Path) -> str | None:
    """Edit the copy; returns why not (a stale mutation: its line is gone) or None."""
    for edit in m.edits:
        found = _locate(edit)
        if found is None:
            return f"stale: {edit[0][0][:60]!r} is in no single file under src/"
        path, old, new = found
        target = dst / path
        target.write_text(target.read_text(encoding="utf-8").replace(old, new), encoding="utf-8")
    return None


def _rebuild(dst: Path) -> str | None:
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=dst,
                          capture_output=True, text=True)
    return None if proc.returncode == 0 else "build failed: " + proc.stderr.strip().splitlines()[-1]


def _run_tests(m: Mutation, dst: Path) -> tuple[list[str], int, str]:
    """(failing test ids, number collected that passed, tail of the output) for the mutated copy."""
    env = {**os.environ, "PYTHONPATH": str(dst / "src")}
    env.pop("MOBILEMOE_KERNEL_ISA", None)  # every ISA path the tests choose, not a forced one
    cmd = [sys.executable, "-m", "pytest", "-rfE", "-p", "no:cacheprovider", "--no-header", *m.tests]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    failed = sorted({line.split()[1] for line in out.splitlines() if re.match(r"^(FAILED|ERROR) \S", line)})
    passed = re.search(r"(\d+) passed", out)
    return failed, int(passed.group(1)) if passed else 0, out[-2000:]


def _module_origin(dst: Path) -> str:
    """Where ``import mobilemoe`` resolves under the check's PYTHONPATH (must be the copy)."""
    code = "import mobilemoe; print(mobilemoe.__file__)"
    env = {**os.environ, "PYTHONPATH": str(dst / "src")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True).stdout.strip()


def check(m: Mutation) -> dict:
    """Apply one mutation to a temp copy, run its tests, return the row of the report."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mut-{m.name}-") as tmp:
        dst = Path(tmp)
        _copy_tree(dst, m.cxx)
        origin = _module_origin(dst)
        if not origin.startswith(str(dst)):
            raise SystemExit(f"mutation_check: mobilemoe imports from {origin}, not the temp copy")
        problem = _apply(m, dst) or (_rebuild(dst) if m.cxx else None)
        if problem:
            return {"mutation": m.name, "file": _files(m), "status": problem, "failing": [], "seconds": 0.0}
        failed, passed, tail = _run_tests(m, dst)
    status = "caught" if failed else "NOT CAUGHT"
    row = {"mutation": m.name, "file": _files(m), "status": status, "failing": failed, "passed": passed,
           "seconds": round(time.perf_counter() - start, 1)}
    if not failed and passed == 0:
        row["status"], row["output"] = "no tests ran", tail
    return row


def collapse(test_ids: list[str]) -> list[str]:
    """file::test (n cases) per test function: parametrized ids folded into one entry."""
    counts: dict[str, int] = {}
    for tid in test_ids:
        base = tid.split("[", 1)[0]
        counts[base] = counts.get(base, 0) + 1
    return [f"{base} ({n})" if n > 1 else base for base, n in counts.items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=None, help="mutation names to run (default: all Python ones)")
    p.add_argument("--cxx", action="store_true", help="also run the C++ mutations (each rebuilds mobilemoe._C)")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    args = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if (args.only is None or m.name in args.only) and (args.cxx or not m.cxx)]
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:32s} {'(C++) ' if m.cxx else ''}{_files(m)}")
        return 0
    unknown = set(args.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        p.error(f"unknown mutation(s): {', '.join(sorted(unknown))} (see --list)")
    rows = []
    for m in chosen:
        row = check(m)
        rows.append(row)
        if not args.json:
            print(f"{row['mutation']:32s} {row['status']:10s} {row['seconds']:6.1f}s  "
                  + ", ".join(collapse(row["failing"])), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0 if all(r["status"] == "caught" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
