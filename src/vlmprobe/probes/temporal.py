"""The temporal direction probe (moving shapes): a linear probe predicting a clip's motion
direction (8 classes) from the features of its frames.

The probe is linear in the tokens, in three linear steps:
- Readout: a per-token ridge map from features to the moving object's ground-truth box
  coverage of each token, fit on a sample of train frames: where the object is.
- Pooling: each frame's readout is summarised by its zeroth and first spatial moments (mass, and
  mass times token x and y, centred on the image), and the clip by each moment's least-squares
  slope over its frames: a velocity; whatever does not move cancels.
- Classifier: multinomial logistic regression on the standardised velocities.
The ridge penalty and the logistic penalty are chosen together on val. A classifier on the
velocities of all D feature dimensions would overfit 140 training clips; the readout keeps the
few that locate objects. With positions shuffled the moments no longer follow the object.

Clips without boxes (Something-Something v2, vlmprobe.data.ssv2: the videos of a few
directional templates, labelled E, N, W or S) have no position ground truth for the readout to
fit. There the readout is unsupervised: the top principal components of the train frames'
tokens (PCA_COMPONENTS, the count chosen on val with the logistic penalty). The oracle
controls are built from the boxes, so on such clips they are not run and the probe's validity
is unknown; `shuffled` and `pixels` run as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.extract.store import FeatureStore
from vlmprobe.io import read_json
from vlmprobe.metrics.boxes import bootstrap_ci
from vlmprobe.probes.controls import oracle_tokens, pixel_tokens, shuffled_tokens
from vlmprobe.probes.ridge import LinearMap, fit_ridge_path
from vlmprobe.probes.training import token_centres

N_DIRECTIONS = 8
PCA_COMPONENTS = (8, 32)  # unsupervised readouts tried on clips without boxes
BOX_CONTROLS = ("oracle", "oracle_shuffled")  # need the clips' boxes


@dataclass(frozen=True)
class TemporalSettings:
    ridge_alphas: list[float]  # readout penalties (relative, as the bbox probe's) tried on val
    penalties: list[float]  # inverse regularisation strengths (sklearn's C) tried on val
    readout_frames: int  # frames per train clip, evenly spaced, that fit the readout
    bootstrap: int
    seed: int


def moment_pooling(frames: np.ndarray, geometry: TokenGeometry) -> np.ndarray:
    """(N, F, T, D) clip tokens -> (N, 3, D): the rate of change over the clip (least-squares
    slope over frames) of each frame's spatial moments (mass, x, y) of the tokens."""
    xy = token_centres(geometry) - 0.5  # (T, 2)
    weights = np.concatenate([np.ones((len(xy), 1)), xy], axis=1).astype(np.float32)  # (T, 3)
    moments = np.einsum("nftd,tk->nfkd", frames, weights) / len(xy)
    t = np.arange(frames.shape[1], dtype=np.float32)
    t = (t - t.mean()) / max(float(((t - t.mean()) ** 2).sum()), 1e-12)
    return np.einsum("nfkd,f->nkd", moments, t)


def pooled_clips(
    load_frames: Callable[[np.ndarray], np.ndarray], clip_ids: np.ndarray, geometry: TokenGeometry,
    batch: int = 20,
) -> np.ndarray:
    """Moment velocities (N, 3, D) of `clip_ids`, loading (n, F, T, D) frames a batch of clips at a
    time (a whole split of frame tokens would not fit in memory)."""
    return np.concatenate([
        moment_pooling(load_frames(clip_ids[s : s + batch]), geometry)
        for s in range(0, len(clip_ids), batch)
    ])


def box_coverage(boxes: np.ndarray, token_boxes: np.ndarray) -> np.ndarray:
    """(..., 4) xywh pixel boxes -> (..., T) fraction of each token's region inside the box."""
    x0, y0 = boxes[..., 0:1], boxes[..., 1:2]
    x1, y1 = x0 + boxes[..., 2:3], y0 + boxes[..., 3:4]
    tx0, ty0, tx1, ty1 = token_boxes.T
    w = np.clip(np.minimum(x1, tx1) - np.maximum(x0, tx0), 0, None)
    h = np.clip(np.minimum(y1, ty1) - np.maximum(y0, ty0), 0, None)
    return w * h / ((tx1 - tx0) * (ty1 - ty0))


def clip_coverage(
    boxes: list[list[list[int]]], category_ids: list[int], distractor_boxes: list,
    categories: list[int], geometry: TokenGeometry,
) -> np.ndarray:
    """Ground truth of clips as per-token box coverage (N, F, T, C): the moving object's box in
    its class's channel; the static distractor (its class is not recorded) is left out."""
    token_boxes = geometry.token_boxes()
    mover = box_coverage(np.asarray(boxes, dtype=np.float64), token_boxes)  # (N, F, T)
    n, f, t = mover.shape
    out = np.zeros((n, f, t, len(categories)), np.float32)
    out[np.arange(n), :, :, [categories.index(c) for c in category_ids]] = mover
    return out


def fit_readouts(
    load_frames: Callable[[np.ndarray], np.ndarray], coverage: np.ndarray, train_ids: np.ndarray,
    settings: TemporalSettings,
) -> dict[float, LinearMap]:
    """Ridge maps tokens -> the moving object's coverage whatever its class (one channel: the
    direction classifier then learns one mapping from all clips, not one per class), one map per
    penalty, from `readout_frames` frames of every train clip. coverage: (n_clips, F, T, C)."""
    xs, ys = [], []
    for s in range(0, len(train_ids), 20):
        ids = train_ids[s : s + 20]
        frames = load_frames(ids)
        pick = np.linspace(0, frames.shape[1] - 1, settings.readout_frames).round().astype(int)
        xs.append(frames[:, pick].reshape(-1, frames.shape[-1]))
        ys.append(coverage[ids][:, pick].sum(axis=-1).reshape(-1, 1))
    return fit_ridge_path(np.concatenate(xs), np.concatenate(ys), settings.ridge_alphas)


def fit_pca_readouts(
    load_frames: Callable[[np.ndarray], np.ndarray], train_ids: np.ndarray,
    settings: TemporalSettings,
) -> dict[int, LinearMap]:
    """Readouts that need no labels: projections on the top principal components of the
    tokens of `readout_frames` frames of every train clip, one map per component count."""
    xs = []
    for s in range(0, len(train_ids), 20):
        frames = load_frames(train_ids[s : s + 20])
        pick = np.linspace(0, frames.shape[1] - 1, settings.readout_frames).round().astype(int)
        xs.append(frames[:, pick].reshape(-1, frames.shape[-1]).astype(np.float64))
    x = np.concatenate(xs)
    x -= x.mean(axis=0)
    _, _, components = np.linalg.svd(x, full_matrices=False)
    return {k: LinearMap(components[:k].T, np.zeros(min(k, len(components))))
            for k in PCA_COMPONENTS}


def run_temporal_probe(
    pooled: dict[str, np.ndarray], directions: dict[str, np.ndarray],
    readouts: dict[float, LinearMap], settings: TemporalSettings,
    readout_name: str = "ridge_alpha",
) -> dict:
    """Fit on train, choose the penalties on val, report test `direction_acc` with its
    interval. pooled[split]: (N, 3, D) moment velocities from `moment_pooling`."""
    best = None  # (val accuracy, alpha, C, scaler, model)
    for alpha, readout in readouts.items():
        # The readout's bias does not move, so its velocity is 0: only the weight applies.
        x = {name: (v @ readout.weight).reshape(len(v), -1) for name, v in pooled.items()}
        scaler = StandardScaler().fit(x["train"])
        for c in settings.penalties:
            model = LogisticRegression(C=c, max_iter=2000, tol=1e-6)
            model.fit(scaler.transform(x["train"]), directions["train"])
            val = float((model.predict(scaler.transform(x["val"])) == directions["val"]).mean())
            if best is None or val > best[0]:
                best = (val, alpha, c, scaler, model)
    val, alpha, c, scaler, model = best
    test = (pooled["test"] @ readouts[alpha].weight).reshape(len(pooled["test"]), -1)
    correct = (model.predict(scaler.transform(test)) == directions["test"]).astype(np.float64)
    ones = np.ones_like(correct)
    return {
        "direction_acc": float(correct.mean()),
        "direction_acc_ci95": list(bootstrap_ci(correct, ones, settings.bootstrap, settings.seed)),
        "val_direction_acc": val,
        "selected": {readout_name: alpha, "penalty": c},
    }


@dataclass(frozen=True)
class ClipData:
    """Moving-shapes labels and the clip feature store (image id = clip_id * n_frames + t)."""

    root: Path
    store: FeatureStore
    n_frames: int
    splits: dict[str, np.ndarray]  # split -> clip ids
    directions: np.ndarray  # (n_clips,) by clip id
    labels: dict

    @classmethod
    def load(cls, root: Path, store: FeatureStore) -> ClipData:
        labels = read_json(root / "clips.json")
        with np.load(root / "clips.npz") as z:
            directions = z["direction"]
        n_frames = int(store.manifest["n_frames"])
        return cls(root, store, n_frames,
                   {k: np.asarray(v) for k, v in labels["splits"].items()}, directions, labels)

    def frames(self) -> np.ndarray:
        """(n_clips, F, H, W, 3) uint8: every clip's frames (for the pixels control)."""
        with np.load(self.root / "clips.npz") as z:
            return z["frames"]

    def image_ids(self, clip_ids: np.ndarray) -> list[int]:
        return [int(c) * self.n_frames + t for c in clip_ids for t in range(self.n_frames)]

    def tokens(self, point: str) -> Callable[[np.ndarray], np.ndarray]:
        """A loader of (n, F, T, D) frame tokens of `point` by clip id, read from the store
        when called (the probe holds the clips it asks for, not the point)."""
        ids = self.store.image_ids
        stored = self.store.tokens(point, ids)
        row = {i: r for r, i in enumerate(ids)}

        def load(clip_ids: np.ndarray) -> np.ndarray:
            rows = np.array([row[i] for i in self.image_ids(clip_ids)], dtype=np.int64)
            return stored.rows(rows).reshape(len(clip_ids), self.n_frames, *stored.shape[1:])

        return load


def run_temporal(
    clips: ClipData, settings: TemporalSettings, control_names: list[str], oracle_dim: int,
    oracle_noise: float,
) -> tuple[dict[str, dict], dict[str, dict]]:
    """The direction probe at every point of the clip store and on `control_names`: its
    records by point and by control."""
    directions = {s: clips.directions[ids] for s, ids in clips.splits.items()}
    reference = clips.store.points[-1]
    geometry = clips.store.geometry(reference)

    has_boxes = "boxes" in clips.labels
    if not has_boxes:
        unavailable = [name for name in control_names if name in BOX_CONTROLS]
        if unavailable:
            print(f"probe: temporal: no boxes in {clips.root / 'clips.json'}: controls "
                  f"{', '.join(unavailable)} not run, validity unknown", flush=True)
        control_names = [name for name in control_names if name not in BOX_CONTROLS]

    def coverage_on(g: TokenGeometry) -> np.ndarray:
        categories = [c["id"] for c in clips.labels["categories"]]
        return clip_coverage(clips.labels["boxes"], clips.labels["category_id"],
                             clips.labels["distractor_boxes"], categories, g)

    coverage = coverage_on(geometry) if has_boxes else None

    def probe(load: Callable[[np.ndarray], np.ndarray], g: TokenGeometry) -> dict:
        pooled = {s: pooled_clips(load, ids, g) for s, ids in clips.splits.items()}
        if not has_boxes:
            readouts = fit_pca_readouts(load, clips.splits["train"], settings)
            return run_temporal_probe(pooled, directions, readouts, settings,
                                      readout_name="pca_components")
        target = coverage if g == geometry else coverage_on(g)
        readouts = fit_readouts(load, target, clips.splits["train"], settings)
        return run_temporal_probe(pooled, directions, readouts, settings)

    points = {point: probe(clips.tokens(point), clips.store.geometry(point))
              for point in tqdm(clips.store.points, desc="temporal", unit="point")}

    def oracle(ids: np.ndarray) -> np.ndarray:
        c = coverage[ids]
        tokens = oracle_tokens(c.reshape(-1, *c.shape[2:]), oracle_dim, oracle_noise,
                               settings.seed, int(ids[0]))
        return tokens.reshape(*c.shape[:3], -1)

    def shuffled(load: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
        def load_shuffled(ids: np.ndarray) -> np.ndarray:
            x = load(ids)
            flat = shuffled_tokens(x.reshape(-1, *x.shape[2:]), settings.seed, int(ids[0]))
            return flat.reshape(x.shape)
        return load_shuffled

    def pixels(ids: np.ndarray) -> np.ndarray:
        f = frames[ids]
        flat = pixel_tokens(f.reshape(-1, *f.shape[2:]), geometry)
        return flat.reshape(*f.shape[:2], *flat.shape[1:])

    loaders = {"oracle": lambda: oracle, "oracle_shuffled": lambda: shuffled(oracle),
               "shuffled": lambda: shuffled(clips.tokens(reference)), "pixels": lambda: pixels}
    frames = clips.frames() if "pixels" in control_names else None
    return points, {name: probe(loaders[name](), geometry) for name in control_names}
