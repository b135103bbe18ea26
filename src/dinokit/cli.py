"""`dinokit` command line: each area registers its subcommands from its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define `register(subparsers)`; each adds its subcommands with `set_defaults(func=...)`.
COMMAND_MODULES = [
    "dinokit.loading",
    "dinokit.apps.cli",
    "dinokit.ssl.trainer",
    "dinokit.eval.cli",
    "dinokit.export.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinokit", description="DINOv2 models, training, evaluation and tools")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"dinokit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
