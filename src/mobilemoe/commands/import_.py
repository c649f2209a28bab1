"""``mobilemoe import hf DIR OUT``: a Hugging Face MobileMoE directory -> a mobilemoe checkpoint."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("import", help="import a Hugging Face MobileMoE directory as a checkpoint",
                              description="Read a Hugging Face MobileMoE directory (from `mobilemoe export hf`, "
                                          "or the released facebook/MobileMoE-* layout with INT4 qweight/"
                                          "weight_scale tensors) into a mobilemoe checkpoint directory.")
    sub = p.add_subparsers(dest="source", metavar="SOURCE", required=True)
    hf = sub.add_parser("hf", help="a transformers directory (config.json model_type mobilemoe + safetensors)")
    hf.add_argument("src", metavar="DIR")
    hf.add_argument("out", metavar="OUT")
    hf.set_defaults(func=_hf)


def _hf(args: argparse.Namespace) -> int:
    from mobilemoe.export.hf import import_hf

    out = import_hf(args.src, args.out)
    print(f"imported {args.src} -> {out}")
    return 0
