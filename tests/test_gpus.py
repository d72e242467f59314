"""One GPU per process: concurrent processes claim different cards, a full host makes the next
one wait (or fail with a finite patience), and a killed holder's card is free again."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from vlmprobe.gpus import NoFreeGPU, claim_gpu

HOLD = ("import sys, time; from pathlib import Path; from vlmprobe.gpus import claim_gpu; "
        "print(claim_gpu(2, Path(sys.argv[1])), flush=True); time.sleep(60)")


def holder(directory) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    process.claimed = int(process.stdout.readline())
    return process


def test_processes_claim_different_cards_and_a_killed_holder_frees_its_card(tmp_path):
    first = holder(tmp_path)
    second = holder(tmp_path)
    try:
        assert {first.claimed, second.claimed} == {0, 1}
        started = time.monotonic()
        with pytest.raises(NoFreeGPU, match="all 2 GPUs are held"):
            claim_gpu(2, tmp_path, patience_s=0)
        assert time.monotonic() - started < 5
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert claim_gpu(2, tmp_path, patience_s=10) == first.claimed
    finally:
        for process in (first, second):
            process.kill()
            process.wait()
