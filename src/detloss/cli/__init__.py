"""The ``detloss`` command line: ``detloss demo | inspect | anchors``.

Every command reports a user error (missing or malformed file, bad box, unknown preset or
category) as one line on stderr with exit code 2, never a traceback: :func:`main` is the
boundary that turns :class:`CLIError` and the library's ``ValueError`` / ``TypeError`` and
file errors into that line. Set ``DETLOSS_DEBUG=1`` to see the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn, Optional, Sequence

from .. import __version__
from .errors import USER_ERRORS, CLIError

__all__ = ["CLIError", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``detloss COMMAND: error: ...``), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level argument parser with one sub-parser per command."""
    from . import anchors, demo, inspect

    parser = _Parser(
        prog="detloss",
        description="Object-detection training losses: demo training, matcher inspection, anchor fitting.",
    )
    parser.add_argument("--version", action="version", version=f"detloss {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    demo.add_parser(sub)
    inspect.add_parser(sub)
    anchors.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``detloss`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.handler(args) or 0)
    except USER_ERRORS as exc:
        if os.environ.get("DETLOSS_DEBUG"):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in message:
            message = f"{message}: {exc.filename}"
        print(f"detloss {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
