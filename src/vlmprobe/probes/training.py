"""What every trained (gradient-descent) component shares: the one fit loop (seeded AdamW,
warm-up cosine, periodic evaluation, the best checkpoint kept, curves logged with dvclive, on
any device), deterministic torch, token inputs laid out on their grids, and batches."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from dvclive import Live
from torch import nn
from tqdm import tqdm

from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.extract.tokens import Tokens, as_tokens, chunks

CPU = torch.device("cpu")


@contextmanager
def deterministic_torch(seed: int, threads: int,
                        device: torch.device = CPU) -> Iterator[torch.Generator]:
    """Seeded, deterministic, fixed-thread-count torch for one training run.

    Matrix products on CPU sum in an order that depends on the thread count, so the count is
    fixed (a params value) for results to repeat exactly; the previous settings are restored.
    On CUDA the same seeds give the same initial weights and batches (both drawn on the CPU),
    but deterministic kernels are not forced: several backward passes (bilinear resize,
    index_put) have none, so GPU results repeat only to within float noise.
    """
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(device.type == "cpu")
    torch.manual_seed(seed)
    try:
        yield torch.Generator().manual_seed(seed)
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic)


def batches(
    n: int, batch_size: int, steps: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """`steps` batches of indices into range(n), epoch by epoch in seeded random order."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


def warmup_cosine(step: int, steps: int, warmup: int, floor: float = 0.05) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


STATS_ELEMENTS = 1 << 22  # token values per chunk when a split is read through for statistics


class Standardizer:
    """Per-dimension standardisation with train-split statistics (so a token keeps its relative
    scale; per-token normalisation would blow background noise up to the size of a signal).
    The statistics are accumulated in float64 over chunks of images (two passes: the mean,
    then the squared deviations from it), so the split is never held whole."""

    def __init__(self, train: Tokens | np.ndarray):
        tokens = as_tokens(train)
        _, t, d = tokens.shape
        per_chunk = max(1, STATS_ELEMENTS // (t * d))
        total, rows = np.zeros(d), 0
        for _, x in chunks(tokens, per_chunk):
            total += x.reshape(-1, d).sum(axis=0, dtype=np.float64)
            rows += len(x) * t
        mean = total / rows
        squares = np.zeros(d)
        for _, x in chunks(tokens, per_chunk):
            squares += ((x.reshape(-1, d) - mean) ** 2).sum(axis=0)
        self.mean = mean.astype(np.float32)
        self.std = np.maximum(np.sqrt(squares / rows), 1e-6).astype(np.float32)

    def __call__(self, tokens: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((tokens - self.mean) / self.std)


def token_centres(geometry: TokenGeometry) -> np.ndarray:
    """(T, 2) token centres (x, y) as fractions of the image width and height."""
    h, w = geometry.image_size
    boxes = geometry.token_boxes()
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2 / w, (boxes[:, 1] + boxes[:, 3]) / 2 / h], 1)


def mirror_permutation(geometry: TokenGeometry) -> np.ndarray | None:
    """Token order of the horizontally mirrored image (token i goes where token perm[i] was),
    or None when some token has no mirror-image partner (flip augmentation is then off)."""
    w = geometry.image_size[1]
    boxes = geometry.token_boxes()
    mirrored = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
    distance = np.abs(mirrored[:, None, :] - boxes[None, :, :]).sum(axis=-1)
    partner = distance.argmin(axis=1)
    if distance[np.arange(len(boxes)), partner].max() > 1e-3:
        return None
    return partner


def mirrored(batch: torch.Tensor, generator: torch.Generator, mirror: torch.Tensor | None
             ) -> tuple[torch.Tensor, list[bool]]:
    """`batch` (B, T, D) with each image's grid mirrored with probability 1/2 (drawn from
    `generator`) when `mirror` (see `mirror_permutation`, on the batch's device) is given;
    returns the batch and which images were mirrored."""
    if mirror is None:
        return batch, [False] * len(batch)
    flip = torch.rand(len(batch), generator=generator) < 0.5
    return (torch.where(flip[:, None, None].to(batch.device), batch[:, mirror], batch),
            flip.tolist())


def to_grids(tokens: torch.Tensor, geometry: TokenGeometry) -> list[torch.Tensor]:
    """(B, T, C) tokens in storage order -> one (B, C, rows, cols) map per grid."""
    maps, start = [], 0
    for g in geometry.grids:
        block = tokens[:, start : start + g.n_tokens]
        start += g.n_tokens
        maps.append(block.reshape(len(tokens), g.rows, g.cols, -1).permute(0, 3, 1, 2))
    return maps


def from_grids(maps: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `to_grids`: per-grid (B, C, rows, cols) maps -> (B, T, C)."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)


DEVICE_SHARE = 0.25  # of the card's free memory that a component's training inputs may take


def fits_on(device: torch.device, nbytes: int) -> bool:
    """Whether `nbytes` of inputs may be held on `device` (a CUDA card: within DEVICE_SHARE of
    its free memory), so batches are gathered and augmented there, not by the probe's one
    fixed CPU thread."""
    return device.type == "cuda" and nbytes < DEVICE_SHARE * torch.cuda.mem_get_info(device)[0]


def on_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`x` on `device` when it `fits_on` it, else left on the host (each batch is then copied
    over)."""
    return x.to(device) if fits_on(device, x.element_size() * x.nelement()) else x


class DeviceBatches:
    """A split's rows (tokens, images), transformed for a model (standardised, scaled), in
    batches on `device`: held there whole, transformed, when they `fits_on` it, else read and
    transformed a batch at a time (so host memory holds one batch, whatever the split's size).

    `read(index)` gives the host rows of images `index`; `transform` makes them a tensor."""

    def __init__(self, n: int, read: Callable[[np.ndarray], np.ndarray],
                 transform: Callable[[np.ndarray], torch.Tensor], device: torch.device,
                 chunk: int):
        self.read, self.transform, self.device = read, transform, device
        first = transform(read(np.arange(min(n, 1))))
        self.shape = (n, *first.shape[1:])
        self.resident: torch.Tensor | None = None
        if fits_on(device, first.element_size() * first[0].nelement() * n if n else 0):
            self.resident = torch.empty(self.shape, dtype=first.dtype, device=device)
            for start in range(0, n, chunk):
                index = np.arange(start, min(start + chunk, n))
                self.resident[start : index[-1] + 1] = transform(read(index)).to(device)

    def __len__(self) -> int:
        return self.shape[0]

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` (a CPU index tensor), on the device."""
        if self.resident is not None:
            return self.resident[index.to(self.device)]
        return self.transform(self.read(index.numpy())).to(self.device)

    def in_order(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Every row in order, `batch_size` at a time, on the device."""
        for start in range(0, len(self), batch_size):
            yield self.batch(torch.arange(start, min(start + batch_size, len(self))))


def device_tokens(tokens: Tokens | np.ndarray, standardize: Standardizer,
                  device: torch.device) -> DeviceBatches:
    """A split's tokens, standardised, in batches on `device`."""
    tokens = as_tokens(tokens)
    _, t, d = tokens.shape
    return DeviceBatches(tokens.shape[0], tokens.rows, standardize, device,
                         max(1, STATS_ELEMENTS // (t * d)))


def device_images(images: np.ndarray, device: torch.device) -> DeviceBatches:
    """(N, H, W, 3) uint8 images (or a split's, decoded when read) as (B, 3, H, W) floats in
    [0, 1], in batches on `device`."""
    h, w = images.shape[1:3]
    return DeviceBatches(len(images), images.__getitem__, to_unit, device,
                         max(1, STATS_ELEMENTS // (3 * h * w)))


def to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 (an array, a list of images, a tensor) -> (N, 3, H, W) float in
    [0, 1] (on the tensor's device)."""
    if not isinstance(images, torch.Tensor):
        images = torch.from_numpy(np.ascontiguousarray(np.asarray(images)))
    return images.permute(0, 3, 1, 2).float() / 255.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float on any device -> (B, H, W, 3) uint8 on the host."""
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


class Curves:
    """Training curves for one probe run, logged with dvclive (no dvc.yaml or experiment of its
    own: the stage's dvc.yaml declares the directory as plots)."""

    def __init__(self, directory: Path):
        self.live = Live(str(directory), dvcyaml=None, save_dvc_exp=False, report=None)

    def log(self, step: int, **values: float) -> None:
        self.live.step = step
        for name, value in values.items():
            self.live.log_metric(name, round(float(value), 6), plot=True)
        self.live.next_step()

    def close(self) -> None:
        self.live.end()


class Diverged(ValueError):
    """Raised by a training step whose outputs are not finite: training stops there and the
    best earlier checkpoint stands."""


@dataclass(frozen=True)
class FitSettings:
    """How a component is trained: the loop's knobs, the same for every trained component."""

    steps: int
    batch_size: int
    lr: float
    eval_every: int
    seed: int
    threads: int
    device: torch.device = CPU
    weight_decay: float = 1e-4
    clip_norm: float | None = 1.0  # None: no gradient clipping
    schedule: str = "warmup_cosine"  # one of SCHEDULES
    keep: str = "best"  # one of KEEP: the best checkpoint on val, or the last
    higher_is_better: bool = True

    def __post_init__(self):
        # Set in code, not params: a misspelt choice would silently train another way.
        for name, value, valid in (("schedule", self.schedule, SCHEDULES),
                                   ("keep", self.keep, KEEP)):
            if value not in valid:
                raise ValueError(f"FitSettings.{name} = {value!r}; expected one of "
                                 f"{', '.join(valid)}")


SCHEDULES = ("warmup_cosine", "constant")
KEEP = ("best", "last")


@dataclass(frozen=True)
class Evaluation:
    """One periodic evaluation: the validation score that selects checkpoints (None: this
    checkpoint cannot be scored, `why` says why) and the values logged as curves."""

    score: float | None
    curves: dict[str, float | None]
    why: str = ""


@dataclass
class Fitted:
    model: nn.Module  # on the training device, holding the kept checkpoint's weights
    score: float | None  # the kept checkpoint's validation score (None: no checkpoint scored)
    step: int  # the kept checkpoint's step
    stopped: str  # why training stopped before `steps` ("" if it did not)
    unscored: str  # why the last checkpoint that could not be scored was not


def fit(
    build: Callable[[], nn.Module],
    n: int,
    step_loss: Callable[[nn.Module, torch.Tensor, torch.Generator, int], torch.Tensor],
    evaluate: Callable[[nn.Module, int, float], Evaluation],
    settings: FitSettings,
    curves_dir: Path,
    desc: str,
) -> Fitted:
    """Train `build()` on batches of indices into range(n), every trained component's loop.

    `step_loss(model, index, generator, step)` is one batch's loss (it may draw augmentations
    from `generator`, and raise Diverged to stop); `evaluate(model, step, train_loss)` runs
    every `eval_every` steps and at the end, with the mean training loss since the last one.
    AdamW, gradient clipping and a warm-up cosine schedule (as `settings` say); the model is
    built under the seed (so initial weights do not depend on the device), then moved.
    """
    s = settings
    with deterministic_torch(s.seed, s.threads, s.device) as generator:
        model = build().to(s.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        schedule = (torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, s.steps, s.steps // 20))
            if s.schedule == "warmup_cosine" else None)
        curves = Curves(curves_dir)
        sign = 1.0 if s.higher_is_better else -1.0
        kept: tuple[float | None, int] = (None, 0)  # (validation score, step)
        best_state: dict | None = None
        running = 0.0
        stopped = unscored = ""
        progress = tqdm(enumerate(batches(n, s.batch_size, s.steps, generator)),
                        total=s.steps, desc=desc, unit="step", mininterval=5)
        for step, index in progress:
            try:
                loss = step_loss(model, index, generator, step)
            except Diverged as e:
                stopped = unscored = f"step {step + 1}: {e}"
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip_norm)
            optimizer.step()
            if schedule is not None:
                schedule.step()
            running += loss.item()
            if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
                with torch.no_grad():
                    model.eval()
                    found = evaluate(model, step + 1, running / s.eval_every)
                    model.train()
                curves.log(step + 1, **found.curves)
                running = 0.0
                if found.score is None:
                    unscored = f"step {step + 1}: {found.why}"
                elif s.keep == "last":
                    kept = (found.score, step + 1)
                elif kept[0] is None or sign * found.score > sign * kept[0]:
                    kept = (found.score, step + 1)
                    best_state = copy.deepcopy(model.state_dict())
        curves.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return Fitted(model, kept[0], kept[1], stopped, unscored)
