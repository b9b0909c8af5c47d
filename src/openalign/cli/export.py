"""`openalign export onnx CKPT OUT_DIR [--opset N]`: both towers to ONNX, checked with onnxruntime."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `export` command and its `onnx` sub-command."""
    parser = subparsers.add_parser("export", help="export a checkpoint to another runtime's format")
    formats = parser.add_subparsers(dest="export_format", metavar="FORMAT")
    onnx = formats.add_parser("onnx", help="vision.onnx and text.onnx with dynamic batch (and sequence length)")
    onnx.add_argument("checkpoint", help="checkpoint folder or hub id (config.json + weights)")
    onnx.add_argument("out_dir", help="folder to write vision.onnx, text.onnx and export.json to")
    onnx.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    onnx.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison with PyTorch")
    onnx.set_defaults(func=run_onnx)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_onnx(args: argparse.Namespace) -> int:
    """Load the checkpoint, export, print the check's differences."""
    from openalign.inference.export import export_onnx
    from openalign.models.align import AlignModel

    model = AlignModel.from_pretrained(args.checkpoint)
    manifest = export_onnx(model, args.out_dir, opset=args.opset, check=not args.no_check)
    print(f"wrote vision.onnx and text.onnx (opset {manifest['opset']}) to {args.out_dir}")
    for tower, result in manifest.get("check", {}).items():
        print(f"  {tower}: onnxruntime vs PyTorch max abs {result['max_abs']:.2e}, "
              f"relative {result['max_relative']:.2e}")
    return 0
