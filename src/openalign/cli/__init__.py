"""The `openalign` command. Each module in this package adds one sub-command through `register(subparsers)`;
commands only parse arguments and call library functions.

Errors are reported in one place, `main`: an OpenAlignError (whose message names the file, key, line or value)
or an operating-system error on a user's file becomes one line on stderr and exit status 1, never a
traceback. `--debug` (anywhere on the line) or OPENALIGN_DEBUG=1 lets the exception through with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

DEBUG_ENVIRONMENT = "OPENALIGN_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    """The `openalign` parser with every sub-command; each (sub-)command knows its own name for messages."""
    from openalign.cli._help import HelpFormatter, version_line

    parser = argparse.ArgumentParser(
        prog="openalign", description="ALIGN image-text models: train, embed, search.", formatter_class=HelpFormatter,
        epilog="examples:\n  openalign demo\n"
               "  openalign zero-shot -m kakaobrain/align-base photo.jpg --labels cat dog\n"
               "  openalign COMMAND --help   # every option's default, and examples")
    parser.add_argument("--version", action="version", version=version_line())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        module.register(subparsers)
    _add_debug_flag(parser, top_level=True)
    return parser


def _add_debug_flag(parser: argparse.ArgumentParser, top_level: bool = False) -> None:
    """--debug on the parser and every sub-command under it; each sub-command records its prog (e.g.
    "openalign eval retrieval") so the one error handler can name it."""
    # SUPPRESS on sub-commands: their parse would otherwise reset a --debug given before the command.
    parser.add_argument("--debug", action="store_true", default=False if top_level else argparse.SUPPRESS,
                        help=f"show the traceback of an error (also: {DEBUG_ENVIRONMENT}=1)")
    if not top_level:
        parser.set_defaults(command_name=parser.prog)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _add_debug_flag(subparser)


def debug_requested(args: argparse.Namespace | None = None) -> bool:
    """Whether errors should keep their traceback: --debug, or OPENALIGN_DEBUG set to anything but 0/empty."""
    from_environment = os.environ.get(DEBUG_ENVIRONMENT, "").strip() not in ("", "0", "false", "no")
    return from_environment or bool(getattr(args, "debug", False))


def describe_error(error: BaseException) -> str | None:
    """The one line a user sees for an error caused by their input or environment; None for a bug (whose
    traceback is worth showing)."""
    from openalign.errors import OpenAlignError

    if isinstance(error, OpenAlignError):
        return str(error)
    if isinstance(error, OSError):
        # A file the user named or the disk it sits on: the errno text and the path say it all.
        if not error.strerror:
            return str(error)
        path = f": {error.filename}" if error.filename is not None else ""
        return f"{error.strerror.lower()}{path}"
    if isinstance(error, MemoryError):
        return "out of memory"
    return None


def _refuse_unknown(parser: argparse.ArgumentParser, args: argparse.Namespace, unknown: list[str]) -> None:
    """Exit with the command's usage and what it did not recognise, each unknown option with the nearest
    options the command has (train's --optim.learning_rate: did you mean --optim.lr?)."""
    from openalign.errors import did_you_mean

    command = _find_parser(parser, getattr(args, "command_name", parser.prog)) or parser
    options = [option for action in command._actions for option in action.option_strings]
    described = [f"{word}{did_you_mean(word.split('=')[0], options)}" if word.startswith("-") else word
                 for word in unknown]
    command.error(f"unrecognized arguments: {' '.join(described)}")


def _find_parser(parser: argparse.ArgumentParser, prog: str) -> argparse.ArgumentParser | None:
    """The (sub-)command parser named `prog` ("openalign eval retrieval") under `parser`."""
    if parser.prog == prog:
        return parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                found = _find_parser(subparser, prog)
                if found is not None:
                    return found
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one command; every openalign error is one line on stderr and a non-zero exit status."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _refuse_unknown(parser, args, unknown)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        if debug_requested(args):
            raise
        print(f"{getattr(args, 'command_name', 'openalign')}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        message = describe_error(error)
        if message is None or debug_requested(args):
            raise
        print(f"{getattr(args, 'command_name', 'openalign')}: {message}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
