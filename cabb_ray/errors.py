"""One exception type for user-facing errors, and the CLI wrapper that prints them.

Every bad-input path raises ``CabbRayError`` with a message that names the file, key or
value and what was expected; command-line entry points turn it into one line on stderr
and a non-zero exit instead of a traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

EXIT_USAGE = 2
# A run's last report carries, under this key, an error that a restart would repeat
# (divergence, bad data): Ray Train and Tune end the run instead of retrying it.
ERROR_REPORT_KEY = "trial_error"

# Run and search names become folder names and MLflow filter values: no separators, no quotes
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CabbRayError(Exception):
    """A problem with the user's input (files, config, arguments), reported in one line."""


def check_name(flag: str, name: str) -> str:
    """``name`` if it is a safe run or search name, else a one-line error naming ``flag``."""
    if not SAFE_NAME.fullmatch(name) or len(name) > 200:
        raise CabbRayError(
            f"{flag} {name!r}: expected letters, digits, '.', '_' or '-' (starting with a letter "
            "or digit, at most 200 characters)"
        )
    return name


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None):
    """Run ``main`` and convert ``CabbRayError`` into a one-line message and exit code 2."""
    try:
        code = main(argv)
    except CabbRayError as err:
        message = " ".join(str(err).split("\n"))
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    raise SystemExit(code or 0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors in one line like every other bad input ('prog: error: ...
    (see --help)' instead of the usage lines first); subcommand parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")
