"""Run a DVC command from this interpreter's environment (so it works without the venv on PATH)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


class DvcError(RuntimeError):
    """A DVC command failed; the message has its stderr and what to check."""


def run_dvc(args: list[str], repo: Path) -> str:
    """`dvc <args>` in `repo`; its stdout."""
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise DvcError(f"`dvc {' '.join(args)}` failed in {repo}:\n{result.stderr.strip()}\n"
                       "Fix: run from the project root of a DVC repository with at least one "
                       "commit; a base revision must exist locally (`git fetch`).")
    return result.stdout
