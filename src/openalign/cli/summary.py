"""`openalign summary PRESET|CONFIG.json`: the architecture summary of a named preset or a config file."""

from __future__ import annotations

import json
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("summary", help="print a model's architecture summary (parameters, sizes, GFLOPs)")
    parser.add_argument("model", nargs="?", default="align-base",
                        help="preset name (align-base, tiny, efficientnet-b0+bert-mini, ...) or a config.json / folder")
    parser.add_argument("--text-length", type=int, default=64, help="tokens per text for the FLOP count")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=run)


def run(args) -> int:
    from openalign.model_config import AlignConfig, get_preset
    from openalign.summary import format_summary, model_summary

    path = Path(args.model)
    if path.is_dir():
        path = path / "config.json"
    config = AlignConfig.from_json_file(path) if path.suffix == ".json" else get_preset(args.model)
    summary = model_summary(config, text_length=args.text_length)
    print(json.dumps(summary, indent=2) if args.json else format_summary(args.model, summary))
    return 0
