"""`openalign train --config FILE [--recipe NAME] [--section.key VALUE ...] [--set section.key=VALUE ...]
[--resume latest|CHECKPOINT] [--trust-run-config] [--overwrite] [--force] [--print-config]`. Under torchrun
each process runs this and joins the process group itself."""

from __future__ import annotations

import argparse
import logging

from openalign.cli._help import HelpFormatter, add_command

EXAMPLES = (
    "openalign data synth --out data --n 2000 && "
    "openalign tokenizer train data/train/manifest.jsonl --vocab-size 400 --out tokenizer",
    "openalign train --recipe cpu-small --data.train data/train/manifest.jsonl --data.val "
    "data/heldout/manifest.jsonl --data.tokenizer tokenizer --run.out_dir runs/first --run.max_minutes 5",
    "openalign train --config run.yaml --optim.lr 5e-4 --print-config",
    "openalign train --config run.yaml --device cuda --out runs/gpu   # shorthands for --run.device, --run.out_dir",
    "openalign train --config run.yaml --resume latest",
    "torchrun --standalone --nproc_per_node 8 -m openalign train --config run.yaml",
)


# The names other commands give these settings, accepted here as the config keys they stand for (the last
# given wins when a shorthand and its key are both on the line).
SHORTHANDS = {
    ("--out", "-o"): "run.out_dir",
    ("--device",): "run.device",
    ("--model", "-m"): "model.init_from",
    ("--preset",): "model.preset",
    ("--data",): "data.train",
    ("--tokenizer",): "data.tokenizer",
    ("--steps",): "optim.total_steps",
    ("--minutes",): "run.max_minutes",
    ("--batch-size",): "optim.batch_size",
    ("--seed",): "run.seed",
}


class _FieldHelpFormatter(HelpFormatter):
    """Writes each config flag's help (description, choices, default) only when help is printed: the loss
    names come from the loss registry, whose import (torch) a plain `openalign` start should not pay."""

    def _get_help_string(self, action: argparse.Action) -> str:
        key = getattr(action, "config_key", None)
        if key is None:
            return super()._get_help_string(action)
        from openalign.train.config import describe_field

        return describe_field(key).replace("%", "%%")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train` command, with one `--section.key` flag per TrainConfig field."""
    from openalign.train.config import field_names, field_type_name
    from openalign.train.recipes import RECIPES

    parser = add_command(
        subparsers, "train", help="train an ALIGN model (single process, or one per device under torchrun)",
        description="Train an ALIGN model. Configuration: the defaults below < --recipe < --config file < "
                    "--section.key flags and --set. With --run.max_minutes the step count is fitted to the "
                    "time; the run folder gets config.yaml, metrics.jsonl, checkpoints and model/ (weights, "
                    "tokenizer and image settings), which every other command takes as --model.",
        examples=EXAMPLES, formatter_class=_FieldHelpFormatter,
        usage="%(prog)s [--recipe NAME] [--config FILE] [--section.key VALUE ...] [--out DIR] [--device D]\n"
              "                       [--set SECTION.KEY=VALUE] [--resume latest|CHECKPOINT] [--print-config]\n"
              "                       [--trust-run-config] [--overwrite] [--force]")
    parser.add_argument("--config", metavar="FILE", help="a YAML or TOML file of config sections")
    parser.add_argument("--recipe", choices=sorted(RECIPES), metavar="NAME",
                        help="a named recipe to start from: cpu-small (the tiny model in minutes on a CPU), paper, "
                             "coyo-align-base")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one field (repeatable)")
    parser.add_argument("--resume", metavar="latest|CHECKPOINT",
                        help="continue the run in run.out_dir from its newest complete checkpoint, or a folder")
    parser.add_argument("--trust-run-config", action="store_true",
                        help="when resuming without --config, let the run folder's config.yaml run commands "
                             "(pipe: data sources); refused otherwise, since a run folder may come from anyone")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a run.out_dir that holds another run's checkpoints, removing them")
    parser.add_argument("--force", action="store_true",
                        help="resume although the configuration differs from the checkpoint's in settings that "
                             "change the updates (the differences are listed)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration as YAML and exit without training")
    shorthands = parser.add_argument_group("shorthands", "the names other commands use, for these config keys")
    for flags, key in SHORTHANDS.items():
        shorthands.add_argument(*flags, dest=f"field:{key}", default=None, metavar=field_type_name(key),
                                help=f"--{key}")
    for section, names in _by_section(field_names()).items():
        group = parser.add_argument_group(f"{section} fields",
                                          f"(config file section `{section}`; --set {section}.KEY=VALUE works too)")
        for name in names:
            action = group.add_argument(f"--{name}", dest=f"field:{name}", default=None,
                                        metavar=field_type_name(name), help=name)
            action.config_key = name
    parser.set_defaults(func=run_train)


def _by_section(names: list[str]) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    for name in names:
        sections.setdefault(name.split(".", 1)[0], []).append(name)
    return sections


def run_train(args: argparse.Namespace) -> int:
    """Resolve the configuration, then print it or call `openalign.train.trainer.train` and say what came of
    the run."""
    from openalign.runtime import configure_allocator, set_omp_wait_policy

    # Before torch loads (checking the config loads it): spinning OpenMP threads on a busy machine cost several
    # times the step time (openalign.runtime). Then freed activations stay in the heap for the next step.
    set_omp_wait_policy()
    configure_allocator()
    from openalign.train.config import parse_override, resolve_run_config
    from openalign.train.recipes import get_recipe

    overrides: dict[str, str] = {}
    for name, value in vars(args).items():
        if name.startswith("field:") and value is not None:
            overrides[name.split(":", 1)[1]] = value
    for text in args.set:
        key, value = parse_override(text)
        overrides[key] = value
    base = get_recipe(args.recipe) if args.recipe else None
    config = resolve_run_config(args.config, args.resume, overrides, base, trust_run_config=args.trust_run_config)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    from openalign.train.outcome import describe_run
    from openalign.train.trainer import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = train(config, resume=args.resume, overwrite=args.overwrite, force=args.force)
    if _is_main_process():
        print(describe_run(result, config))
    return 130 if result.stop_reason == "interrupted" else 0  # 130: the shell's status for Ctrl-C


def _is_main_process() -> bool:
    from openalign.distributed import rank_and_world_size

    return rank_and_world_size(from_environment=True)[0] == 0
