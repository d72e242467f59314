"""Bad input: what is wrong with which file, and the `data.on_bad_sample` policy applied to it.

`fail` (the default) stops the data stage, before any extraction, with every problem found;
`skip` leaves the bad samples out and records their count and names in the data metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmprobe.errors import VlmprobeError

POLICIES = ("fail", "skip")
SHOWN = 20  # problems listed in an error message; the rest are counted


@dataclass(frozen=True)
class BadSample:
    file: str  # the file at fault (an image, a video, or the annotation file)
    problem: str

    def __str__(self) -> str:
        return f"{self.file}: {self.problem}"


class BadSampleError(VlmprobeError, ValueError):
    """Bad samples under `data.on_bad_sample: fail`."""


def apply_policy(bad: list[BadSample], policy: str) -> dict[str, Any]:
    """Raise on any bad sample under `fail`; under `skip`, their count and names."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
    if bad and policy == "fail":
        listed = "\n".join(f"  {b}" for b in bad[:SHOWN])
        more = f"\n  ... and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        raise BadSampleError(
            f"{len(bad)} bad sample(s):\n{listed}{more}\nFix: repair or remove those files, or "
            "leave them out with `dvc exp run -S data.on_bad_sample=skip`."
        )
    return {"count": len(bad), "samples": [str(b) for b in bad]}
