"""The `protobooth` command line. Each subcommand is a `register_*` function below plus its `run_*`."""
from __future__ import annotations

import argparse
import sys

from .version import __version__


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show every option's default, keep hand-written line breaks in descriptions."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protobooth",
        description="Teach a Stable Diffusion model your own object from one photo.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"protobooth {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in _SUBCOMMANDS:
        register(subparsers)
    return parser


# Subcommands: each register_* adds its parser and sets `run` to the function that executes it.
_SUBCOMMANDS: list = []


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
