"""How every command's --help reads: a description, each option's default where it has one, and examples.

Commands are added with `add_command`, which gives them `HelpFormatter` and an "examples:" epilog, so a new
command gets the same help as the others by passing its examples.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence


class HelpFormatter(argparse.HelpFormatter):
    """Paragraphs of a description are wrapped to the terminal, indented lines (examples, command lines) kept
    as written; every option whose default says something (not None, False or empty) ends its help with it,
    unless the help states its default in its own words."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in textwrap.dedent(text).strip("\n").split("\n\n"):
            lines = paragraph.splitlines()
            if any(line.startswith((" ", "\t")) for line in lines[1:]) or paragraph.startswith("examples:"):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(super()._fill_text(paragraph, width, indent))
        return "\n\n".join(paragraphs)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if "default" in help_text or default in (None, False, [], "", argparse.SUPPRESS):
            return help_text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{help_text} (default: %(default)s)"
        return help_text


def add_command(subparsers: argparse._SubParsersAction, name: str, *, help: str, examples: Sequence[str],
                description: str | None = None, **settings) -> argparse.ArgumentParser:
    """A (sub-)command parser with `HelpFormatter`, its one-line `help` (shown in the parent's list; also the
    description unless one is given) and an epilog of example command lines; `settings` go to add_parser
    (usage=, formatter_class=, ...)."""
    epilog = "examples:\n" + "\n".join(f"  {example}" for example in examples)
    settings.setdefault("formatter_class", HelpFormatter)
    return subparsers.add_parser(name, help=help, description=description or _sentence(help), epilog=epilog,
                                 **settings)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def version_line() -> str:
    """What `openalign --version` prints: openalign's version, and Python's and torch's (read from the installed
    package's metadata: importing torch would cost a second)."""
    import platform
    from importlib import metadata

    from openalign import __version__

    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    return f"openalign {__version__} (Python {platform.python_version()}, torch {torch_version})"
