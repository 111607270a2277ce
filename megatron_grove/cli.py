"""What the command-line tools share: bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import sys

__all__ = ["BAD_INPUT", "fail"]

BAD_INPUT = 2  # the exit code of every tool for bad input (arguments, files, configuration)


def fail(prog: str, error: object) -> int:
    """Print ``PROG: error: MESSAGE`` (the first line of ``error``) on stderr, as argparse does
    for bad arguments, and return :data:`BAD_INPUT` for the tool's ``main`` to return."""
    first_line = next(iter(str(error).splitlines()), "")
    print(f"{prog}: error: {first_line}", file=sys.stderr)
    return BAD_INPUT
