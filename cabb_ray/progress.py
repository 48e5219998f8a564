"""One-line progress for long command-line work (a carriage-return counter on stderr)."""

from __future__ import annotations

import sys
from collections.abc import Callable


def progress_printer(label: str, steps: int = 20) -> Callable[[int, int], None]:
    """``report(done, total)`` printing ``label: done/total`` about ``steps`` times per run."""

    def report(done: int, total: int) -> None:
        if done == total or done % max(1, total // steps) == 0:
            end = "\n" if done == total else ""
            print(f"\r{label}: {done}/{total}", end=end, file=sys.stderr, flush=True)

    return report
