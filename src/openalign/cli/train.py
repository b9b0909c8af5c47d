"""`openalign train --config FILE [--recipe NAME] [--section.key VALUE ...] [--set section.key=VALUE ...]
[--resume latest|CHECKPOINT]`. Under torchrun each process runs this and joins the process group itself."""

from __future__ import annotations

import argparse
import logging


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
    parser.add_argument("--trust-run-config", action="store_true",
                        help="when resuming without --config, let the run folder's config.yaml run commands "
                             "(pipe: data sources); refused otherwise, since a run folder may come from anyone")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a run.out_dir that holds another run's checkpoints, removing them")
    parser.add_argument("--force", action="store_true",
                        help="resume although the configuration differs from the checkpoint's in settings that "
                             "change the updates (the differences are listed)")
    overrides = parser.add_argument_group("fields", "every config field, e.g. --optim.lr 1e-3")
    for name in field_names():
        overrides.add_argument(f"--{name}", dest=f"field:{name}", default=None, metavar="VALUE")
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Resolve the configuration and call `openalign.train.trainer.train`."""
    from openalign.train.config import parse_override, resolve_run_config
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
    config = resolve_run_config(args.config, args.resume, overrides, get_recipe(args.recipe) if args.recipe else None,
                                trust_run_config=args.trust_run_config)
    result = train(config, resume=args.resume, overwrite=args.overwrite, force=args.force)
    print(f"stopped at step {result.step} ({result.stop_reason}); run folder {result.run_dir}")
    return 0
