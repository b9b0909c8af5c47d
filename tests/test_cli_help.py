"""Every command's --help: a description, the default of every option that has one, and examples that parse."""

from __future__ import annotations

import argparse
import shlex

import pytest

from openalign.cli import build_parser


def _commands(parser: argparse.ArgumentParser, path=()):
    """(words, parser) of every command and sub-command under `parser`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield (*path, name), subparser
                yield from _commands(subparser, (*path, name))


COMMANDS = dict(_commands(build_parser()))


@pytest.mark.parametrize("words", sorted(COMMANDS), ids=" ".join)
def test_help_shows_defaults_and_examples(words):
    parser = COMMANDS[words]
    help_text = parser.format_help()
    assert parser.description and "examples:\n" in help_text, words
    examples = help_text.split("examples:\n", 1)[1].splitlines()
    assert any(line.strip().startswith(("openalign ", "torchrun ", "python ")) for line in examples), words
    for action in parser._actions:
        if action.default in (None, False, [], "", argparse.SUPPRESS) or not action.option_strings:
            continue
        rendered = parser._get_formatter()._expand_help(action) if action.help else ""
        assert "default" in rendered, (words, action.option_strings)


@pytest.mark.parametrize("words", sorted(COMMANDS), ids=" ".join)
def test_examples_name_options_the_command_has(words):
    """Each example of a leaf command parses (up to a shell operator), so the examples cannot drift from the
    flags."""
    parser = COMMANDS[words]
    if any(isinstance(action, argparse._SubParsersAction) for action in parser._actions):
        return
    examples = parser.epilog.split("examples:\n", 1)[1].splitlines()
    own = [shlex.split(line.split("&&")[0].split("   #")[0]) for line in examples]
    own = [tokens for tokens in own if tokens[:1 + len(words)] == ["openalign", *words]]
    assert own, words
    for tokens in own:
        build_parser().parse_args(tokens[1:])


def test_version_names_openalign_python_and_torch(capsys):
    import platform
    from importlib import metadata

    import openalign
    from openalign.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == (f"openalign {openalign.__version__} (Python "
                                               f"{platform.python_version()}, torch {metadata.version('torch')})")
