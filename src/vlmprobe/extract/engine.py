"""The extractor: one forward pass per batch captures every requested point.

`extract_to_store` is a pipeline, so the GPU does not wait on the host: the next batch is
prepared (tokenised, resized) on a thread while the current one runs; each point's tokens are
cast to the store's dtype on the device and copied, on CUDA, into reused pinned host buffers on
a side stream, overlapped with the next forward pass; a thread appends each batch to its shard
files as it arrives (no shard is held whole in memory). `vlmprobe.extract.synchronous` does
the same extraction one step after another: the reference whose bytes this pipeline stores.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vlmprobe.errors import VlmprobeError
from vlmprobe.extract.distributed import ONE_PROCESS, Ranks
from vlmprobe.extract.store import (
    STORED_DTYPE,
    ShardFile,
    remove_unfinished_shards,
    shard_path,
    write_manifest,
)
from vlmprobe.metrics.finite import describe_nonfinite
from vlmprobe.models.base import ModelAdapter

CPU_BATCH_SIZE = 16  # `auto` on CPU: host memory is not the limit there, the cores are
AUTO_BATCH_LIMIT = 64  # `auto` tries 1, 2, 4, ... up to this (and the shard size)
AUTO_MEMORY_FRACTION = 0.9  # of the card's memory a chosen batch may use, in-flight copies included
MAX_BATCHES_IN_FLIGHT = 2  # batches copied but not yet in their shards: bounds pinned memory


class NonFiniteFeatures(VlmprobeError, RuntimeError):
    """A point's features hold NaN or inf: stored, they would become plausible-looking metrics
    (one NaN makes every CKA 0.0), so the batch is refused before any shard is written."""


def finiteness(tokens: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """(non-finite values of `stored`, inf values of `tokens`), as a device tensor: computed
    beside the cast, so checking a batch needs no extra pass over it on the host."""
    return torch.stack([(~torch.isfinite(stored)).sum(), torch.isinf(tokens).sum()])


def require_finite_features(point: str, stored: torch.Tensor, counts: list[int],
                            image_ids: list[int], first_index: int) -> None:
    """Raise NonFiniteFeatures if `stored`, the (B, T, D) tokens of `point` as the store holds
    them (STORED_DTYPE), has a NaN or inf, naming the counts, the images (ids and indices in the
    extraction order) and the likely causes. `counts` is `finiteness` of the batch."""
    nonfinite, source_inf = (int(c) for c in counts)
    if not nonfinite:
        return
    n_nan = int(torch.isnan(stored).sum())
    n_inf = nonfinite - n_nan
    overflowed = n_inf - source_inf
    bad_rows = (~torch.isfinite(stored)).flatten(1).any(dim=1).nonzero().flatten().tolist()
    shown = bad_rows[:10]
    more = f" and {len(bad_rows) - len(shown)} more" if len(bad_rows) > len(shown) else ""
    overflow_note = (
        f" ({overflowed} of the inf are finite values beyond {STORED_DTYPE}'s range +-65504, "
        "which the store cannot hold)" if overflowed else ""
    )
    raise NonFiniteFeatures(
        f"point {point!r}: {describe_nonfinite(n_nan, n_inf, stored.numel())}{overflow_note} in "
        f"a batch of {len(stored)} images; non-finite in images "
        f"{[image_ids[r] for r in shown]}{more} (indices {[first_index + r for r in shown]} of "
        "the extraction order). No shard of this batch was written. Likely causes: a dtype too "
        "narrow for the activations (bf16 or fp16 overflow, or pixels not cast to the model's "
        "dtype); non-persistent buffers left uninitialised by from_pretrained (e.g. rotary "
        "inv_freq / cos_cached: they differ between two loads); diverged or corrupt weights. "
        "Fix: rerun on CPU in fp32 (`dvc exp run -S extract.device=cpu`) to tell overflow from "
        "garbage, and make the adapter's load() recompute non-persistent buffers from the config."
    )


def device_points(adapter: ModelAdapter, model: torch.nn.Module, inputs: dict[str, Any],
                  points: list[str], image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Tokens (B, T, D) of every point for prepared `inputs`, on the model's device and in its
    dtype; the forward pass stops after the deepest point."""
    with torch.inference_mode():
        tokens = adapter.capture(model, inputs, points)
    for p, t in tokens.items():
        expected = adapter.geometry(p, image_size).n_tokens
        if t.shape[1] != expected:
            raise RuntimeError(
                f"point {p!r}: the model gave {t.shape[1]} tokens per {image_size} image, its "
                f"geometry has {expected}: the adapter's token layout is wrong for this input"
            )
    return tokens


def extract_points(
    adapter: ModelAdapter,
    model: torch.nn.Module,
    images: np.ndarray,
    points: list[str],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Tokens (B, T, D) of every point for one batch of (B, H, W, 3) uint8 images, as float32
    on the host."""
    tokens = device_points(adapter, model, adapter.prepare(images, device), points,
                           tuple(images.shape[1:3]))
    return {p: t.float().cpu() for p, t in tokens.items()}


def choose_batch_size(adapter: ModelAdapter, model: torch.nn.Module, images: np.ndarray,
                      points: list[str], device: torch.device, limit: int) -> tuple[int, str]:
    """The batch size for `extract.batch_size: auto`, and how it was chosen.

    On CUDA: the largest of 1, 2, 4, ... (up to `limit` and AUTO_BATCH_LIMIT) whose forward
    pass, with two batches of stored tokens in flight, peaks below AUTO_MEMORY_FRACTION of the
    card's memory, tried on the first images. On CPU: CPU_BATCH_SIZE.
    """
    if device.type != "cuda":
        return min(CPU_BATCH_SIZE, limit), f"auto on CPU: {CPU_BATCH_SIZE} (at most {limit})"
    limit = max(1, min(limit, AUTO_BATCH_LIMIT))
    cards = range(torch.cuda.device_count())  # a model split over cards: each must fit
    budget = AUTO_MEMORY_FRACTION * torch.cuda.get_device_properties(device).total_memory
    chosen, size, peaks = 1, 1, []
    while size <= limit:
        sample = images[np.arange(size) % len(images)]
        torch.cuda.empty_cache()
        for card in cards:
            torch.cuda.reset_peak_memory_stats(card)
        try:
            tokens = device_points(adapter, model, adapter.prepare(sample, device), points,
                                   tuple(images.shape[1:3]))
            in_flight = 2 * sum(t.numel() for t in tokens.values()) * STORED_DTYPE.itemsize
            del tokens
            peak = max(torch.cuda.max_memory_allocated(card) for card in cards) + in_flight
        except torch.OutOfMemoryError:
            peak = math.inf
        torch.cuda.empty_cache()
        peaks.append(f"{size}: {peak / 2**30:.1f} GiB")
        if peak > budget:
            break
        chosen, size = size, size * 2
    return chosen, (f"auto: largest of 1, 2, 4, ... <= {limit} within "
                    f"{AUTO_MEMORY_FRACTION:.0%} of {budget / AUTO_MEMORY_FRACTION / 2**30:.0f} "
                    f"GiB (peaks {', '.join(peaks)})")


class Busy:
    """Seconds each step of the pipeline spent working (threads add to their own key), so a
    run says where its time went: `prepare`, `forward` (host time launching the pass and the
    copies), `store` (checking and writing shards), `waiting` (the loop blocked on `store`)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(("prepare", "forward", "store", "waiting"), 0.0)

    def timed(self, step: str, work: Any, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return work(*args)
        finally:
            self.seconds[step] += time.perf_counter() - started


@dataclass(frozen=True)
class Batch:
    shard: int
    start: int  # image indices [start, stop) of the extraction order
    stop: int


@dataclass
class Transfer:
    """One batch's stored-dtype tokens on their way to the host."""

    host: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]  # `finiteness` of each point
    done: list[torch.cuda.Event] = field(default_factory=list)
    pinned: list[torch.Tensor] = field(default_factory=list)  # buffers to give back
    device_tensors: list[torch.Tensor] = field(default_factory=list)  # live until `done`


class HostCopies:
    """Device -> host copies. From a CUDA device: into pinned buffers reused batch after batch,
    on a side stream of that device, so the copy overlaps the next batch's forward pass (a
    model split over devices has tokens on several); from the CPU: nothing to copy. Buffers
    are taken on the extraction thread and given back on the shard thread."""

    def __init__(self) -> None:
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.lock = threading.Lock()

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        with self.lock:
            spare = self.free.get((tuple(like.shape), like.dtype))
            if spare:
                return spare.pop()
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)

    def start(self, tokens: dict[str, torch.Tensor]) -> Transfer:
        with torch.inference_mode():
            stored = {p: t.to(STORED_DTYPE, memory_format=torch.contiguous_format)
                      for p, t in tokens.items()}
            counts = {p: finiteness(tokens[p], stored[p]) for p in tokens}
        transfer = Transfer(host={}, counts={})
        for p, tensor in stored.items():
            if tensor.device.type != "cuda":
                transfer.host[p], transfer.counts[p] = tensor, counts[p]
                continue
            if tensor.device not in self.streams:
                self.streams[tensor.device] = torch.cuda.Stream(tensor.device)
            stream = self.streams[tensor.device]
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(stream):
                transfer.host[p] = self._buffer(tensor).copy_(tensor, non_blocking=True)
                transfer.counts[p] = self._buffer(counts[p]).copy_(counts[p], non_blocking=True)
                transfer.done.append(stream.record_event())
            transfer.pinned += [transfer.host[p], transfer.counts[p]]
            transfer.device_tensors += [tensor, counts[p]]
        return transfer

    def wait(self, transfer: Transfer) -> None:
        for event in transfer.done:
            event.synchronize()
        transfer.device_tensors.clear()

    def release(self, transfer: Transfer) -> None:
        """Give the transfer's pinned buffers back for the next batches."""
        with self.lock:
            for buffer in transfer.pinned:
                self.free.setdefault((tuple(buffer.shape), buffer.dtype), []).append(buffer)


class ShardStream:
    """Checks each batch's copied tokens and appends them to their shard files, on a thread,
    in order; a shard is renamed into place when its last batch is in. Its memory is the
    batches in flight: no shard is held whole."""

    def __init__(self, root: Path, points: list[str], image_ids: list[int], shard_size: int,
                 copies: HostCopies, busy: Busy):
        self.root, self.points, self.image_ids, self.shard_size, self.copies, self.busy = (
            root, points, image_ids, shard_size, copies, busy)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="vlmprobe-shards")
        self.open: dict[str, ShardFile] = {}  # point -> the shard being written
        self.failed = False  # after an error, no later batch is stored

    def bounds(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min((shard + 1) * self.shard_size, len(self.image_ids))

    def submit(self, batch: Batch, transfer: Transfer) -> Future:
        return self.pool.submit(self._append, batch, transfer)

    def _append(self, batch: Batch, transfer: Transfer) -> None:
        if self.failed:
            return
        try:
            self.busy.timed("store", self._store, batch, transfer)
        except BaseException:
            self.failed = True
            raise

    def _store(self, batch: Batch, transfer: Transfer) -> None:
        self.copies.wait(transfer)
        ids = self.image_ids[batch.start:batch.stop]
        for p in self.points:
            require_finite_features(p, transfer.host[p], transfer.counts[p].tolist(), ids,
                                    batch.start)
        lo, hi = self.bounds(batch.shard)
        for p, tokens in transfer.host.items():
            if p not in self.open:
                self.open[p] = ShardFile(self.root, p, batch.shard, self.image_ids[lo:hi],
                                         tuple(tokens.shape[1:]))
            self.open[p].write(tokens)
        self.copies.release(transfer)
        if batch.stop == hi:
            for shard in self.open.values():
                shard.close()
            self.open.clear()

    def close(self) -> None:
        """Wait for the batches handed over; drop a shard left unfinished by an error."""
        self.pool.shutdown()
        for shard in self.open.values():
            shard.abort()
        self.open.clear()


def prepared(adapter: ModelAdapter, images: np.ndarray, batches: list[Batch],
             device: torch.device, busy: Busy) -> Iterator[tuple[Batch, dict[str, Any]]]:
    """Each batch with its model inputs; the next batch is prepared on a thread meanwhile."""
    with ThreadPoolExecutor(1, thread_name_prefix="vlmprobe-prepare") as pool:
        def submit(batch: Batch) -> Future:
            return pool.submit(busy.timed, "prepare", adapter.prepare,
                               images[batch.start:batch.stop], device)

        future = submit(batches[0]) if batches else None
        for i, batch in enumerate(batches):
            inputs = future.result()
            future = submit(batches[i + 1]) if i + 1 < len(batches) else None
            yield batch, inputs


def extract_shards(
    adapter: ModelAdapter,
    model: torch.nn.Module,
    images: np.ndarray,
    image_ids: list[int],
    points: list[str],
    root: Path,
    *,
    batch_size: int,
    shard_size: int,
    device: torch.device,
    ranks: Ranks = ONE_PROCESS,
) -> dict[str, Any]:
    """Extract the shards of `root` that `ranks` owns and that are not complete yet.

    Batches start at shard boundaries, so a resumed run computes exactly the batches an
    uninterrupted one would. Returns `images` (extracted here), `seconds` and `busy_seconds`
    (`Busy`).
    """
    image_size = tuple(images.shape[1:3])
    copies, busy = HostCopies(), Busy()
    shards = ShardStream(root, points, image_ids, shard_size, copies, busy)
    batches = [
        Batch(shard, start, min(start + batch_size, shards.bounds(shard)[1]))
        for shard in range(math.ceil(len(image_ids) / shard_size))
        if ranks.owns(shard) and not all(shard_path(root, p, shard).exists() for p in points)
        for start in range(*shards.bounds(shard), batch_size)
    ]
    todo = sum(b.stop - b.start for b in batches)
    started = time.perf_counter()
    handed: deque[tuple[Batch, Future]] = deque()
    rank = f" (rank {ranks.rank} of {ranks.world})" if ranks.world > 1 else ""
    with tqdm(total=todo, desc=f"extract{rank}", unit="img") as bar:
        def collect(keep: int) -> None:
            """Surface the shard thread's results, oldest first (an error stops the run), until
            at most `keep` batches are still in its hands; count the finished images."""
            while handed and (len(handed) > keep or handed[0][1].done()):
                batch, future = handed.popleft()
                busy.timed("waiting", future.result)
                bar.update(batch.stop - batch.start)

        def forward(inputs: dict[str, Any]) -> Transfer:
            return copies.start(device_points(adapter, model, inputs, points, image_size))

        try:
            for batch, inputs in prepared(adapter, images, batches, device, busy):
                transfer = busy.timed("forward", forward, inputs)
                del inputs
                handed.append((batch, shards.submit(batch, transfer)))
                collect(keep=MAX_BATCHES_IN_FLIGHT)
            collect(keep=0)
        finally:
            for _, future in handed:
                future.cancel()  # after an error: no batch past it is stored
            shards.close()
    elapsed = time.perf_counter() - started
    if todo:
        print(f"extracted {todo} images{rank} in {elapsed:.1f} s "
              f"({todo / elapsed:.1f} img/s on {device}, batch {batch_size})")
    return {"images": todo, "seconds": elapsed,
            "busy_seconds": {k: round(v, 3) for k, v in busy.seconds.items()}}


def extract_to_store(
    adapter: ModelAdapter,
    model: torch.nn.Module,
    images: np.ndarray,
    image_ids: list[int],
    points: list[str],
    root: Path,
    *,
    batch_size: int,
    shard_size: int,
    device: torch.device,
    manifest_extra: dict[str, Any],
    timing: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Extract every point for every image into a sharded store at `root`, in this process;
    resumable. Shards already complete under `root` (from an interrupted run with the same
    settings) are kept and skipped. Returns the manifest; `timing`, if given, receives
    `extract_shards`' figures."""
    remove_unfinished_shards(root)
    figures = extract_shards(adapter, model, images, image_ids, points, root,
                             batch_size=batch_size, shard_size=shard_size, device=device)
    if timing is not None:
        timing.update(figures)
    return write_store_manifest(adapter, root, points, image_ids,
                                math.ceil(len(image_ids) / shard_size),
                                tuple(images.shape[1:3]), manifest_extra)


def write_store_manifest(adapter: ModelAdapter, root: Path, points: list[str],
                         image_ids: list[int], n_shards: int, image_size: tuple[int, int],
                         manifest_extra: dict[str, Any]) -> dict[str, Any]:
    """The store's manifest, from its complete shards; written last, so a store with a
    manifest is complete."""
    from safetensors import safe_open

    dims = {}
    for p in points:
        with safe_open(str(shard_path(root, p, 0)), framework="pt") as f:
            shape = f.get_slice("features").get_shape()
        dims[p] = {"n_tokens": int(shape[1]), "dim": int(shape[2])}
    manifest = {
        **manifest_extra,
        "image_ids": list(image_ids),
        "dtype": "float16",
        "points": {
            p: {
                **dims[p],
                "geometry": adapter.geometry(p, image_size).to_dict(),
                "shards": [shard_path(root, p, i).name for i in range(n_shards)],
            }
            for p in points
        },
    }
    write_manifest(root, manifest)
    return manifest
