"""The errors a user acts on, and the one place a stage turns them into a one-line message.

Every error vlmprobe raises for a bad value, a missing input or an unusable model derives from
`VlmprobeError`; its message names the bad value, the valid choices and the fix. A stage's
entry point runs through `stage_main`, which prints such an error as `error: <message>` and
exits 1, without a traceback (a traceback means a bug, not a bad input).
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class VlmprobeError(Exception):
    """An error the user can fix; the message says how."""


class MissingInput(VlmprobeError, FileNotFoundError):
    """A stage's input is not there: the stage that writes it has not run."""


class CorruptInput(VlmprobeError):
    """A stage's input is there but damaged (a truncated or rewritten file)."""


class StaleInput(VlmprobeError):
    """Two of a stage's inputs disagree (metrics of one model beside features of another): one
    of them is out of date, and the stage that writes it must run again."""


def stage_main(main: Callable[[], int | None]) -> int:
    """Run a stage's `main`: its exit status, or 1 with `error: <message>` on stderr for a
    VlmprobeError."""
    try:
        return main() or 0
    except VlmprobeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
