"""The ``detloss`` command line: ``detloss demo | inspect | anchors``."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .. import __version__


def build_parser() -> argparse.ArgumentParser:
    """The top-level argument parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="detloss",
        description="Object-detection training losses: demo training, matcher inspection, anchor fitting.",
    )
    parser.add_argument("--version", action="version", version=f"detloss {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``detloss`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.handler(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
