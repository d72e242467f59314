"""`map50` from reconstructions (E-P4.6): one image-domain detector, whatever model is probed.

The detector reads images, never the probed model's tokens, so its scores compare across models
and targets. Capacity: frozen DINOv2-S/14 (the `dinov2_small` registry entry, real weights from
the `assets` stage) up to its 6th block gives 16x16 tokens of 384 dims (the forward pass stops
there); the probe stage's dense detection head (`vlmprobe.probes.dense`: 1x1 projection to
`width` channels, `depth` 3x3 convolutions, class / centre-ness / box heads, NMS) is trained on
the tokens of the ORIGINAL train images, its checkpoint chosen by val mAP@0.5 on originals.
It then detects on the original test images (its ceiling) and on each set of reconstructed test
images, scored by pycocotools against the test split's ground truth.

Why this backbone (measured on the 2-core dev machine, CPU, default data; docs/align-reconstruct.md
has the figures): on raw pixel patches the same head needs 2000 steps to reach test mAP@0.5 0.93
(0.26 at 200), which took 2.5x the wall time of this detector (both at two threads, back to
back); DINOv2 layer 6 reaches 0.96 in 200 steps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vlmprobe.data.dataset import Split
from vlmprobe.extract.engine import extract_points
from vlmprobe.models.registry import adapter_for, get_entry
from vlmprobe.probes.dense import DenseDetector, DenseSettings, train_dense_head
from vlmprobe.probes.detection import detection_scores
from vlmprobe.probes.training import deterministic_torch

BACKBONE = "dinov2_small"  # registry entry
BACKBONE_POINT = "layer6"  # the probe stage's best dense point on the default run (0.96)
ENCODE_BATCH = 16


@dataclass(frozen=True)
class DetectorSettings:
    train_samples: int  # original train images the head is trained on (capped at the split)
    dense: DenseSettings


def first(split: Split, n: int) -> Split:
    """The split's first `n` images with their annotations (the COCO file is the split's)."""
    return dataclasses.replace(split, image_ids=split.image_ids[:n], images=split.images[:n],
                               boxes=split.boxes[:n], labels=split.labels[:n],
                               masks=split.masks[:n])


class ImageDetector:
    """Frozen backbone tokens of images -> the dense head's detections."""

    def __init__(self, settings: DetectorSettings, project_root: Path = Path(".")):
        self.settings = settings
        self.backbone = adapter_for(get_entry(BACKBONE))
        fit = settings.dense.fit
        with deterministic_torch(fit.seed, fit.threads, fit.device):
            self.model = self.backbone.load(project_root, fit.device)
        self.head: DenseDetector | None = None

    def tokens(self, images: np.ndarray, label: str) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, 256, 384) backbone tokens, at the fixed thread count."""
        out = []
        fit = self.settings.dense.fit
        with deterministic_torch(fit.seed, fit.threads, fit.device):
            for s in tqdm(range(0, len(images), ENCODE_BATCH), desc=f"detector tokens {label}",
                          unit="batch", mininterval=5):
                batch = images[s : s + ENCODE_BATCH]
                out.append(extract_points(self.backbone, self.model, batch, [BACKBONE_POINT],
                                          fit.device)[BACKBONE_POINT].float().cpu().numpy())
        return np.concatenate(out)

    def train(self, splits: dict[str, Split], curves_dir: Path) -> dict:
        """Train the head on originals; returns what describes the detector."""
        n = min(self.settings.train_samples, len(splits["train"].image_ids))
        train = {"train": first(splits["train"], n), "val": splits["val"]}
        features = {name: self.tokens(s.images, f"{name} originals")
                    for name, s in train.items()}
        geometry = self.backbone.geometry(BACKBONE_POINT, tuple(splits["train"].images.shape[1:3]))
        self.head = train_dense_head(features, train, geometry, self.settings.dense, curves_dir)
        dense = self.settings.dense
        return {
            "backbone": BACKBONE,
            "backbone_point": BACKBONE_POINT,
            "head": "dense (vlmprobe.probes.dense)",
            "head_parameters": sum(p.numel() for p in self.head.model.parameters()),
            "width": dense.width,
            "depth": dense.depth,
            "steps": dense.fit.steps,
            "train_samples": n,
            "val_map50": self.head.val_map50,
            "selected_step": self.head.selected_step,
        }

    def score(self, images: np.ndarray, split: Split, label: str) -> dict:
        """`map50`, `map` and their bootstrap `_ci95` of detections on `images`, which show
        `split`'s test images (originals or reconstructions), against its ground truth."""
        if self.head is None:
            raise RuntimeError("ImageDetector.score before train")
        found = self.head.detect(self.tokens(images, label))
        dense = self.settings.dense
        return detection_scores(split, found, dense.bootstrap, dense.fit.seed)
