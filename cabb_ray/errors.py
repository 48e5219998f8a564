"""One exception type for user-facing errors, and the CLI wrapper that prints them.

Every bad-input path raises ``CabbRayError`` with a message that names the file, key or
value and what was expected; command-line entry points turn it into one line on stderr
and a non-zero exit instead of a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

EXIT_USAGE = 2


class CabbRayError(Exception):
    """A problem with the user's input (files, config, arguments), reported in one line."""


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None):
    """Run ``main`` and convert ``CabbRayError`` into a one-line message and exit code 2."""
    try:
        code = main(argv)
    except CabbRayError as err:
        message = " ".join(str(err).split("\n"))
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    raise SystemExit(code or 0)
