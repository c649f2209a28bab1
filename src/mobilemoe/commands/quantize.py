"""``mobilemoe quantize CKPT OUT``: a float (BF16/FP32) checkpoint -> the released INT4 format."""

from __future__ import annotations

import argparse


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


def run(args: argparse.Namespace) -> int:
    from mobilemoe.commands.common import print_json
    from mobilemoe.quant.convert import quantize_checkpoint

    report = quantize_checkpoint(args.ckpt, args.out, overwrite=args.force)
    if args.json:
        print_json(report.to_dict())
        return 0
    print(f"quantized {report.src} -> {report.out} ({report.format})")
    print(f"  tensors: {report.tensors_before} -> {report.tensors_after} "
          f"({report.quantized_tensors} quantized, {report.params:,} params)")
    print(f"  bytes:   {report.bytes_before:,} ({_mb(report.bytes_before)}) -> "
          f"{report.bytes_after:,} ({_mb(report.bytes_after)}), {report.ratio:.2f}x smaller")
    return 0
