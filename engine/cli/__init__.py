"""The `protobooth` command line: one module per subcommand (segment, train and generate, demo), each a register_*
function that adds its parser and the run_* function that executes it."""
from __future__ import annotations

import argparse
import logging
import sys

from ..errors import InputError
from ..version import __version__
from .common import HelpFormatter
from .demo import register_demo
from .segment import register_segment
from .train import register_generate, register_train

log = logging.getLogger("protobooth")
SUBCOMMANDS = [register_segment, register_train, register_generate, register_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protobooth",
        description="Teach a Stable Diffusion model your own object from one photo.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"protobooth {__version__}")
    parser.add_argument("--quiet", action="store_true", help="print only warnings and errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(subparsers)
    for subparser in subparsers.choices.values():  # --quiet also after the command name
        subparser.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                               help="print only warnings and errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except InputError as error:
        print(f"protobooth {args.command}: error: {error}", file=sys.stderr)
        return 2
