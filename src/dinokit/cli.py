"""`dinokit` command line: each area registers its subcommands from its own module.

Every parser is a `CommandParser`, so every subcommand's --help has the same shape: each option says what it
is, and its default is shown only where it means something (not for required options, flags, or "None").

How a command ends (`main`):
- a problem the user can fix -- a missing file or permission (OSError), a bad value or state that dinokit
  checks (ValueError, RuntimeError), a missing optional package (MissingExtraError) -- prints one line,
  `dinokit CMD: error: ...`, and exits 2. When such an error was raised inside a library (torch, numpy, ...)
  rather than by dinokit's own checks, the line names its type and says how to see the traceback.
- Ctrl-C prints `dinokit CMD: interrupted` (with how to resume, for commands that can) and exits 130.
- anything else is a bug and keeps its traceback. DINOKIT_DEBUG=1 (or --debug where a command has it) shows
  the traceback of every error.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from dinokit.extras import MissingExtraError

# Modules that define `register(subparsers)`; each adds its subcommands with `set_defaults(func=...)` and, where
# an interrupted run can be continued, `on_interrupt=` (a hint, or a function of the parsed arguments giving one).
COMMAND_MODULES = [
    "dinokit.loading",
    "dinokit.apps.cli",
    "dinokit.ssl.trainer",
    "dinokit.eval.cli",
    "dinokit.export.cli",
    "dinokit.dense.cli",
    "dinokit.curate.cli",
    "dinokit.zeroshot.cli_track_match",
    "dinokit.zeroshot.cli_discover_anomaly",
    "dinokit.zeroshot.cli_eval",  # after dinokit.eval.cli: it adds `dinokit eval davis|correspondence`
]

# The hint for commands whose output folder keeps finished work (embed shards, cached features).
RERUN_TO_RESUME = "rerun the same command to resume"

USER_ERRORS = (OSError, ValueError, RuntimeError, MissingExtraError)
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help where the default is a real value the help does not state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if shows_default(action) and "default" not in text.lower():
            text += f" (default: {format_default(action.default)})".replace("%", "%%")  # help is %-formatted
        return text


def shows_default(action: argparse.Action) -> bool:
    if action.required or action.nargs == 0 or action.default in (None, argparse.SUPPRESS):  # nargs 0: a flag
        return False
    return bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)


def format_default(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


class CommandParser(argparse.ArgumentParser):
    """ArgumentParser with dinokit's help formatter; subparsers are made of the same class."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def iter_commands(parser: argparse.ArgumentParser):
    """Every runnable (sub)command parser under `parser`, e.g. those of `dinokit embed` and `dinokit eval knn`."""
    children = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not children:
        yield parser
    for action in children:
        for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
            yield from iter_commands(child)


def subcommands_of(subparsers, name: str) -> argparse._SubParsersAction:
    """The sub-commands of the registered command `name` (e.g. "eval"), so that an area can add `dinokit eval X`
    without importing the area that owns `dinokit eval` (which may sit below it)."""
    parser = subparsers.choices[name]
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="dinokit", description="DINOv2 and DINOv3 models, training, evaluation and tools")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    for command in iter_commands(parser):
        command.set_defaults(command_name=command.prog)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if _debug(args):
            raise
        hint = _interrupt_hint(args)
        print(f"{_name(args)}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as exc:
        if _debug(args):
            raise
        print(f"{_name(args)}: error: {describe_error(exc)}", file=sys.stderr)
        return EXIT_ERROR


def describe_error(exc: BaseException) -> str:
    """The message of a user-facing error; for one raised inside a library, its type and where to look next."""
    text = str(exc).strip() or type(exc).__name__
    origin = _raised_in(exc)
    if isinstance(exc, (OSError, MissingExtraError)) or origin == "dinokit":
        return text
    first_line = text.splitlines()[0]
    return (f"{type(exc).__name__} from {origin or 'a library'}: {first_line} "
            f"(set DINOKIT_DEBUG=1 for the traceback)")


def _raised_in(exc: BaseException) -> str | None:
    """Top-level package of the code that raised `exc` (the innermost frame of its traceback)."""
    tb = exc.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return (tb.tb_frame.f_globals.get("__name__") or "").split(".")[0] or None


def _name(args) -> str:
    return getattr(args, "command_name", None) or "dinokit"


def _interrupt_hint(args) -> str | None:
    hint = getattr(args, "on_interrupt", None)
    return hint(args) if callable(hint) else hint


def _debug(args) -> bool:
    return os.environ.get("DINOKIT_DEBUG", "") not in ("", "0") or bool(getattr(args, "debug", False))


if __name__ == "__main__":
    sys.exit(main())
