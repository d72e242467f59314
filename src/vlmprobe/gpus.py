"""Devices: the one resolver of every stage's `device` param (cpu, cuda or auto), and one GPU
per process when several experiments share a host (`dvc queue start --jobs N`).

A stage that runs on CUDA, on a host with more than one visible card, claims the first card no
other vlmprobe process holds: an exclusive `flock` on `<lock dir>/gpu-<index>.lock`, held until
the process exits (the kernel releases it even after `kill -9`). When every card is taken it
waits. The lock folder is per host and outside the project (queued experiments run in separate
temporary copies): `$VLMPROBE_GPU_LOCKS`, default `~/.cache/vlmprobe/gpu-locks`.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import IO

import torch

from vlmprobe.errors import VlmprobeError
from vlmprobe.params import ParamsError, require_choice

DEVICES = ("cpu", "cuda", "auto")


def require_device(params: dict, key: str) -> torch.device:
    """The device the param `key` asks for (cpu, cuda or auto: cuda when one is visible), or
    a refusal naming the fix when it asks for cuda on a machine without one."""
    name = require_choice(params, key, DEVICES)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError(f"params.yaml: {key} = 'cuda' but no CUDA device is visible. "
                          f"Fix: `dvc exp run -S {key}=cpu` (or auto).")
    return torch.device(name)

WAIT_S = 5.0
_held: list[IO] = []  # open lock files: closing one would release its card


class NoFreeGPU(VlmprobeError, RuntimeError):
    """Every card is held by another vlmprobe process (only with a finite `patience_s`)."""


def lock_dir() -> Path:
    return Path(os.environ.get("VLMPROBE_GPU_LOCKS",
                               Path.home() / ".cache" / "vlmprobe" / "gpu-locks"))


def claim_gpu(count: int, directory: Path, patience_s: float | None = None) -> int:
    """Index of the first of `count` cards no other process has claimed, claimed for this
    process's lifetime; waits for one (forever, or `patience_s`) when all are taken."""
    directory.mkdir(parents=True, exist_ok=True)
    started, told = time.monotonic(), False
    while True:
        for index in range(count):
            handle = open(directory / f"gpu-{index}.lock", "a+")  # noqa: SIM115 (held open)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            _held.append(handle)
            return index
        if patience_s is not None and time.monotonic() - started >= patience_s:
            raise NoFreeGPU(f"all {count} GPUs are held by other vlmprobe processes "
                            f"(locks in {directory})")
        if not told:
            print(f"all {count} GPUs are in use by other vlmprobe processes; waiting for one "
                  f"(locks in {directory})", flush=True)
            told = True
        time.sleep(WAIT_S)


def claim_device(device: torch.device) -> torch.device:
    """`device`, or on a host with several visible cards, the card this process claimed."""
    if device.type != "cuda" or device.index is not None or torch.cuda.device_count() < 2:
        return device
    index = claim_gpu(torch.cuda.device_count(), lock_dir())
    print(f"using GPU {index} of {torch.cuda.device_count()} (claimed in {lock_dir()})")
    return torch.device("cuda", index)
