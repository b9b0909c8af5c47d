"""`openalign export onnx --model MODEL --out DIR [--opset N]`: both towers to ONNX, checked with onnxruntime,
with the tokenizer, the image settings and a runnable example beside them."""

from __future__ import annotations

import argparse

from openalign.cli._help import add_command


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `export` command and its `onnx` sub-command."""
    examples = ("openalign export onnx -m runs/first/model --out model-onnx && "
                "python model-onnx/example.py photo.jpg 'a cat' 'a dog'",
                "openalign export onnx -m kakaobrain/align-base --out align-base-onnx --opset 18")
    parser = add_command(subparsers, "export", help="export a model to another runtime's format", examples=examples)
    formats = parser.add_subparsers(dest="export_format", metavar="FORMAT")
    onnx = add_command(
        formats, "onnx", help="vision.onnx and text.onnx with dynamic batch (and sequence length)",
        description="Export both towers to ONNX (dynamic batch, and sequence length for text), check them "
                    "against PyTorch with onnxruntime, and bundle the tokenizer, the image settings and "
                    "example.py (embedding with onnxruntime alone) beside them.",
        examples=examples)
    onnx.add_argument("--model", "-m", required=True,
                      help="model folder (a run's model/, any save_pretrained folder) or hub id")
    onnx.add_argument("--out", "-o", required=True, help="folder to write the graphs and their files to")
    onnx.add_argument("--opset", type=int, default=17, help="ONNX opset")
    onnx.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison with PyTorch")
    onnx.set_defaults(func=run_onnx)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_onnx(args: argparse.Namespace) -> int:
    """Load the model and its processor, export, print the check's differences."""
    from openalign.inference.export import export_onnx, load_for_export

    model, processor = load_for_export(args.model)
    manifest = export_onnx(model, args.out, opset=args.opset, check=not args.no_check, processor=processor)
    print(f"wrote vision.onnx and text.onnx (opset {manifest['opset']}) to {args.out}")
    for tower, result in manifest.get("check", {}).items():
        print(f"  {tower}: onnxruntime vs PyTorch max abs {result['max_abs']:.2e}, "
              f"relative {result['max_relative']:.2e}")
    if processor is None:
        print(f"  {args.model} holds no tokenizer: the folder has the graphs only (no tokenizer, image settings "
              "or example.py)")
    else:
        print(f"  with the tokenizer, the image settings and example.py: python {args.out}/example.py photo.jpg "
              "'a cat' 'a dog'")
    return 0
