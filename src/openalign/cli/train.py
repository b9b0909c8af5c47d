"""`openalign train --config FILE [--recipe NAME] [--section.key VALUE ...] [--set section.key=VALUE ...]
[--resume latest|CHECKPOINT]`. Under torchrun each process runs this and joins the process group itself."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train` command, with one `--section.key` flag per TrainConfig field."""
    from openalign.train.config import field_names

    parser = subparsers.add_parser(
        "train", help="train an ALIGN model (single process, or one per device under torchrun)",
        description="Configuration: defaults < --recipe < --config file < --section.key flags and --set.",
    )
    parser.add_argument("--config", default=None, help="a YAML or TOML file of config sections")
    parser.add_argument("--recipe", default=None, help="a named recipe to start from (paper, coyo-align-base, "
                        "cpu-small)")
    parser.add_argument("--preset", default=None, help="shorthand for --model.preset")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one field (repeatable)")
    parser.add_argument("--resume", default=None, metavar="latest|CHECKPOINT",
                        help="continue the run in run.out_dir from its newest complete checkpoint, or a folder")
    overrides = parser.add_argument_group("fields", "every config field, e.g. --optim.lr 1e-3")
    for name in field_names():
        overrides.add_argument(f"--{name}", dest=f"field:{name}", default=None, metavar="VALUE")
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Resolve the configuration and call `openalign.train.trainer.train`."""
    from openalign.train.config import load_config, parse_override
    from openalign.train.recipes import get_recipe
    from openalign.train.trainer import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides: dict[str, str] = {}
    if args.preset:
        overrides["model.preset"] = args.preset
    for name, value in vars(args).items():
        if name.startswith("field:") and value is not None:
            overrides[name.split(":", 1)[1]] = value
    for text in args.set:
        key, value = parse_override(text)
        overrides[key] = value
    config_path = args.config
    base = get_recipe(args.recipe) if args.recipe else None
    if config_path is None and args.resume:
        # Resuming without --config: the run folder's own config.yaml (written at the start of the run). For
        # "latest" that folder is run.out_dir as the command line (or recipe, or default) gives it, never the
        # current folder.
        run_dir = (Path(args.resume).parent if args.resume != "latest"
                   else Path(load_config(None, overrides, base=base).run.out_dir))
        if (run_dir / "config.yaml").is_file():
            config_path = run_dir / "config.yaml"
    config = load_config(config_path, overrides, base=base)
    result = train(config, resume=args.resume)
    print(f"stopped at step {result.step} ({result.stop_reason}); run folder {result.run_dir}")
    return 0
