"""The `protobooth` command line: one module per subcommand (segment, train and generate, encode and pretrain-encoder, batch, demo), each a register_*
function that adds its parser and the run_* function that executes it."""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys

from ..errors import InputError, TrainingCancelled
from ..fileio import error_summary
from ..version import __version__
from .common import HelpFormatter, signalled
from .batch import register_batch
from .demo import register_demo
from .encoder import register_encode, register_pretrain_encoder
from .segment import register_segment
from .train import register_generate, register_train

log = logging.getLogger("protobooth")
SUBCOMMANDS = [register_segment, register_train, register_generate, register_encode, register_pretrain_encoder,
               register_batch, register_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protobooth",
        description="Teach a Stable Diffusion model your own object from one photo.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"protobooth {__version__}")
    parser.add_argument("--quiet", action="store_true", help="print only warnings and errors")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(subparsers)
    for subparser in subparsers.choices.values():  # --quiet also after the command name
        subparser.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                               help="print only warnings and errors")
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                               help="show the Python traceback of an error")
    return parser


def _interrupt(signum, frame):
    signalled.set()
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run a command. Exit status: 0 done, 2 bad input (one line naming the input and the fix), 130 cancelled with
    Ctrl-C, 1 anything else (one line; --debug shows the traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    with _signals_handled():
        return _run(args)


@contextlib.contextmanager
def _signals_handled():
    """While a command runs: a file-size limit fails the write (reported as a full disk) instead of killing the
    process, and `kill` (SIGTERM) cleans up as Ctrl-C does; both also set cancel_requested(). The previous handlers
    come back after."""
    signalled.clear()
    wanted = {signal.SIGTERM: _interrupt}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where a shell's background job ignores it
        wanted[signal.SIGINT] = _interrupt
    if hasattr(signal, "SIGXFSZ"):
        wanted[signal.SIGXFSZ] = signal.SIG_IGN
    previous = {}
    for number, handler in wanted.items():
        with contextlib.suppress(ValueError):  # only the main thread may set handlers
            previous[number] = signal.signal(number, handler)
    previous_hook = sys.unraisablehook

    def quiet_lost_interrupt(unraisable):  # the run stops at its next step anyway: no traceback for it
        if not (issubclass(unraisable.exc_type, KeyboardInterrupt) and signalled.is_set()):
            previous_hook(unraisable)

    sys.unraisablehook = quiet_lost_interrupt
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for number, handler in previous.items():
            signal.signal(number, handler)


def _run(args) -> int:
    command = f"protobooth {args.command}"
    try:
        return args.run(args)
    except InputError as error:
        if args.debug:
            raise
        print(f"{command}: error: {error}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, TrainingCancelled):
        note = getattr(args, "cancel_note", lambda: "nothing written")()
        print(f"\n{command}: cancelled; {note}.", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        print(f"{command}: error: {error_summary(error)} (this is a bug or an input ProtoBooth does not check yet; "
              "run again with --debug to see where, and please report it)", file=sys.stderr)
        return 1
