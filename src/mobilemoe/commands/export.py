"""``mobilemoe export {hf,gguf,executorch,patch-gguf-routers}``: checkpoints for other runtimes."""

from __future__ import annotations

import argparse

# Measured by benchmarks/export_llamacpp.py: llama.cpp (f32 KV cache) against the exact float forward
# of the same INT4 weights, 1024 positions, random tiny-moe INT4 checkpoint in the released layout.
GGUF_TYPES_HELP = """\
--type (size vs the INT4 checkpoint; mean KL / top-1 vs the exact INT4 forward, tiny-moe, 1024 positions;
the native runtime on the same model: 1.0x, KL 1.1e-5, 99.7%):
  int4  1.7x  KL 1.2e-5, 99.4%  default for INT4 checkpoints: everything exact in Q4_0 (attention,
              shared expert, dense FFN, embedding, head) copied code for code; routed experts (INT4
              groups along `out`, GGUF blocks along `in`) as Q8_0 of their exact values (0.4-0.5% RMS)
  q4_0  1.0x  KL 2.1e-5, 99.5%  smallest; routed experts re-quantized to Q4_0 (3.8-7.7% RMS weight
              error here, 8.2-8.4% on the released mobilemoe-s layout)
  q8_0  1.9x  KL 1.8e-5, 99.7%  every matmul weight Q8_0 (none code-exact)
  f16   3.6x  KL 3.6e-7, 99.9%  default for float checkpoints
  f32   ~7x   exact weights (llama.cpp = mobilemoe to ~1e-6), for verification
Expert axis: the int4 and q4_0 rows are for checkpoints whose routed experts are grouped along
`out` (the released format; quantization.expert_group_axis absent or "out"). A checkpoint trained or
quantized with the config field expert_quant_group_axis "in" groups them along `in`: then int4 and
q4_0 write the same file, the WHOLE model exact Q4_0 (routed experts too, code for code) at 1.0x;
llama.cpp's logits differ from the INT4 forward only by its own 8-bit activation rounding (median
per-position max |logit diff| 6e-3 on tiny-moe, vs 1.8e-2 for q4_0 of the same weights grouped
along `out`).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a checkpoint to Hugging Face, GGUF (llama.cpp) or ExecuTorch",
        description="Export a mobilemoe checkpoint directory to another runtime. Checkpoints using a "
                    "feature the target cannot represent are refused with the feature named.")
    sub = p.add_subparsers(dest="target", metavar="TARGET", required=True)

    hf = sub.add_parser("hf", help="a transformers directory (trust_remote_code)",
                        description="Write a directory loadable with transformers' AutoModelForCausalLM."
                                    "from_pretrained(OUT, trust_remote_code=True). INT4 checkpoints are "
                                    "decoded exactly to float32.")
    hf.add_argument("ckpt", metavar="CKPT")
    hf.add_argument("out", metavar="OUT")
    hf.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="cast float tensors (routers stay fp32); default: keep (fp32 for INT4)")
    hf.set_defaults(func=_hf)

    gg = sub.add_parser("gguf", help="a GGUF for llama.cpp (architecture exaone-moe)",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Write a GGUF for llama.cpp's exaone-moe architecture (sigmoid router, "
                                    "selection bias, normalised top-k, routed scale, shared expert, QK-norm, "
                                    "rope factors).",
                        epilog=GGUF_TYPES_HELP)
    gg.add_argument("ckpt", metavar="CKPT")
    gg.add_argument("out", metavar="OUT.gguf")
    gg.add_argument("--type", choices=["int4", "f32", "f16", "q8_0", "q4_0"], default=None,
                    help="weight encoding (default: int4 for an INT4 checkpoint, f16 for a float one; "
                         "see below)")
    gg.set_defaults(func=_gguf)

    et = sub.add_parser("executorch", help="an ExecuTorch .pte (XNNPACK, 8da4w)",
                        description="torch.export -> XNNPACK partitioner -> .pte, built from the model's own "
                                    "modules with a static KV cache; MoE: only the chosen experts run (fp32: gathered "
                                    "per token; 8da4w: ExecuTorch's llama::quantized_moe_ffn op on INT4 experts "
                                    "re-quantized along `in`, whose x86 kernel is a slow reference one: see "
                                    "export/README.md); a `prefill` method for whole chunks and a one-token `forward`.")
    et.add_argument("ckpt", metavar="CKPT")
    et.add_argument("out", metavar="OUT.pte")
    et.add_argument("--max-seq-len", type=int, default=512, help="static KV cache length (default 512)")
    et.add_argument("--quantize", choices=["8da4w", "none"], default="8da4w")
    et.add_argument("--prefill-chunk", type=int, default=None,
                    help="tokens per prefill call (default: the exporter's PREFILL_CHUNK; 0: no prefill method)")
    et.add_argument("--experts", default=None, metavar="{gather,dense,op,op8}",
                    help="routed-expert dispatch: gather (fp32 default), op (8da4w default: INT4 experts in "
                         "quantized_moe_ffn), op8 (INT8 experts in the op), dense (every expert on every token, "
                         "XNNPACK linears: faster on x86 today, reads all experts)")
    et.set_defaults(func=_executorch)

    pr = sub.add_parser("patch-gguf-routers", help="replace the router tensors of a GGUF (ReMoE output)",
                        description="Copy IN.gguf to OUT.gguf with its router weights replaced by those in a "
                                    "router safetensors file (model.layers.N.feed_forward.router.weight). "
                                    "No other byte changes.")
    pr.add_argument("gguf_in", metavar="IN.gguf")
    pr.add_argument("routers", metavar="ROUTERS.safetensors")
    pr.add_argument("out", metavar="OUT.gguf")
    pr.set_defaults(func=_patch)

    # `mobilemoe import` lives in import_.py (a module cannot be named `import`); registered here so
    # COMMAND_MODULES keeps one entry per module whose name is its command.
    from mobilemoe.commands import import_

    import_.register(subparsers)


def _hf(args: argparse.Namespace) -> int:
    import torch

    from mobilemoe.export.hf import export_hf

    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = export_hf(args.ckpt, args.out, dtype=dtype)
    print(f"exported {args.ckpt} -> {out} (transformers, trust_remote_code)")
    return 0


def _gguf(args: argparse.Namespace) -> int:
    from mobilemoe.export.gguf import export_gguf

    r = export_gguf(args.ckpt, args.out, type=args.type)
    print(f"exported {args.ckpt} -> {r.out} (llama.cpp {r.arch}, {r.type}, {r.tensors} tensors, "
          f"tokenizer {r.tokenizer}; exact Q4_0 tensors {len(r.exact_q4_0)}, re-quantized {len(r.requantized)})")
    return 0


def _executorch(args: argparse.Namespace) -> int:
    from mobilemoe.errors import MobileMoEError
    from mobilemoe.export.executorch import PREFILL_CHUNK, export_executorch

    chunk = PREFILL_CHUNK if args.prefill_chunk is None else args.prefill_chunk
    if chunk < 0 or chunk > args.max_seq_len:
        raise MobileMoEError(f"--prefill-chunk: expected 0..--max-seq-len ({args.max_seq_len}), got {chunk}")
    out = export_executorch(args.ckpt, args.out, max_seq_len=args.max_seq_len,
                            quantize=None if args.quantize == "none" else args.quantize, prefill_chunk=chunk,
                            experts=args.experts)
    print(f"exported {args.ckpt} -> {out} (ExecuTorch XNNPACK, {args.quantize}, max_seq_len {args.max_seq_len})")
    return 0


def _patch(args: argparse.Namespace) -> int:
    from mobilemoe.export.gguf import patch_routers

    names = patch_routers(args.gguf_in, args.routers, args.out)
    print(f"patched {len(names)} router tensors: {args.gguf_in} -> {args.out}")
    return 0
