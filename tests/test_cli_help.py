"""`--help` of every subcommand: every option explains itself; defaults appear only where they mean something."""

from __future__ import annotations

import argparse

import pytest

from dinokit.cli import build_parser, iter_commands

COMMANDS = {command.prog: command for command in iter_commands(build_parser())}


def options(command: argparse.ArgumentParser):
    return [a for a in command._actions if not isinstance(a, argparse._HelpAction)]


def test_every_subcommand_is_walked():
    expected = {"embed", "index", "search", "dedup", "pca", "eval knn", "eval linear", "eval logreg", "finetune",
                "classify", "train", "export onnx", "export torchscript", "convert"}
    assert {f"dinokit {name}" for name in expected} <= set(COMMANDS)


@pytest.mark.parametrize("prog", sorted(COMMANDS))
def test_help_never_shows_a_default_of_none(prog):
    text = COMMANDS[prog].format_help()
    assert "(default: None)" not in text
    assert "(default: False)" not in text


@pytest.mark.parametrize("prog", sorted(COMMANDS))
def test_every_option_and_argument_has_help_text(prog):
    missing = [a.option_strings[0] if a.option_strings else a.dest for a in options(COMMANDS[prog])
               if not (a.help or "").strip()]
    assert not missing, f"{prog}: no help for {missing}"


@pytest.mark.parametrize("prog", sorted(COMMANDS))
def test_required_options_show_no_default(prog):
    for action in options(COMMANDS[prog]):
        if action.required and action.help:
            line = COMMANDS[prog]._get_formatter()._get_help_string(action)
            assert "(default:" not in line, f"{prog} {action.option_strings}: {line}"


def test_defaults_and_choices_are_shown_where_they_mean_something():
    text = COMMANDS["dinokit embed"].format_help()
    assert "{cls,mean,cls+mean,patch}" in text
    assert "(default: cls)" in text and "(default: float32)" in text and "(default: 32)" in text
    knn = COMMANDS["dinokit eval knn"].format_help()
    assert "(default: 10 20 100 200)" in knn  # lists read as they are typed
    # a help text that states its own default is not given a second one
    assert "(default: default)" not in COMMANDS["dinokit eval knn"].format_help()
