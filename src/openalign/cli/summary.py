"""`openalign summary PRESET|CONFIG.json|MODEL`: the architecture summary of a named preset, a config file, a
model folder or a hub id."""

from __future__ import annotations

import json

from openalign.cli._help import add_command


def register(subparsers) -> None:
    """Add the `summary` command."""
    parser = add_command(
        subparsers, "summary", help="print a model's architecture summary (parameters, sizes, GFLOPs)",
        examples=("openalign summary tiny", "openalign summary efficientnet-b0+bert-mini --json",
                  "openalign summary runs/first/model", "openalign summary kakaobrain/align-base"))
    parser.add_argument("model", nargs="?", default="align-base",
                        help="preset name (align-base, tiny, efficientnet-b0+bert-mini, ...), a config.json, a model "
                             "folder or a hub id")
    parser.add_argument("--text-length", type=int, default=64, help="tokens per text for the FLOP count")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Print the summary of a preset, config.json, model folder or hub id."""
    from openalign.summary import format_summary, model_summary, read_model_config

    config = read_model_config(args.model)
    summary = model_summary(config, text_length=args.text_length)
    print(json.dumps(summary, indent=2) if args.json else format_summary(args.model, summary))
    return 0
