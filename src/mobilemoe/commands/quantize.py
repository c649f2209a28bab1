"""``mobilemoe quantize CKPT OUT``: a float (BF16/FP32) checkpoint -> the released INT4 format."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize", help="convert a float checkpoint to the INT4 mobilemoe-int4-g32 format",
        description="Convert a float (BF16/FP32) checkpoint directory into the packed INT4 "
                    "mobilemoe-int4-g32 format of the released MobileMoE QAT checkpoints "
                    "(group 32, fp16 scales, router fp32, norms bf16). Streams one tensor at a time.")
    p.add_argument("ckpt", metavar="CKPT", help="float checkpoint directory (config.json + safetensors)")
    p.add_argument("out", metavar="OUT", help="output directory for the INT4 checkpoint")
    p.add_argument("--force", action="store_true", help="overwrite a checkpoint already in OUT")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def remove_stale_store(out: Path) -> Path | None:
    """Remove the default expert store of a checkpoint just (re)written in ``out``: it holds the old
    weights' experts. Only the store's own files go (index first, so a reader sees no store rather
    than a half one); returns the directory if there was a store."""
    from mobilemoe.runtime.offload import STORE_FILE, STORE_INDEX

    store = out / "expert-store"
    if not (store / STORE_INDEX).exists() and not (store / STORE_FILE).exists():
        return None
    try:
        for name in (STORE_INDEX, STORE_FILE):
            (store / name).unlink(missing_ok=True)
    except OSError as exc:
        from mobilemoe.errors import MobileMoEError

        raise MobileMoEError(f"{store}: cannot remove the stale expert store of the old checkpoint: "
                             f"{exc.strerror or exc}; remove it by hand") from None
    return store


def run(args: argparse.Namespace) -> int:
    from mobilemoe.commands.common import print_json
    from mobilemoe.errors import MobileMoEError
    from mobilemoe.quant.convert import quantize_checkpoint
    from mobilemoe.utils import output_lock

    out, src = Path(args.out), Path(args.ckpt)
    # Checked before the lock, which creates OUT: a refused run must leave no empty OUT or lock file behind.
    if not (src / "config.json").is_file():
        raise MobileMoEError(f"{src}: not a checkpoint directory (no config.json)")
    if out.exists() and out.resolve() == src.resolve():
        raise MobileMoEError(f"{out}: OUT is the source checkpoint; choose another output directory")
    with output_lock(out, "quantize"):  # a second writer of OUT is refused, naming this pid
        report = quantize_checkpoint(args.ckpt, out, overwrite=args.force)
        removed = remove_stale_store(out)
    if args.json:
        print_json({**report.to_dict(), **({"removed_stale_expert_store": str(removed)} if removed else {})})
        return 0
    print(f"quantized {report.src} -> {report.out} ({report.format})")
    print(f"  tensors: {report.tensors_before} -> {report.tensors_after} "
          f"({report.quantized_tensors} quantized, {report.params:,} params)")
    print(f"  bytes:   {report.bytes_before:,} ({_mb(report.bytes_before)}) -> "
          f"{report.bytes_after:,} ({_mb(report.bytes_after)}), {report.ratio:.2f}x smaller")
    if removed:
        print(f"  removed the old checkpoint's expert store {removed} (rewritten on the next offloaded run)")
    return 0
