"""Token geometry: which image region each stored token covers.

Every extraction point stores its spatial tokens as one or more regular grids laid over the
image (one grid for a plain ViT; a base grid plus tiles for anyres-style models). Tokens are
stored grid after grid, row-major inside each grid. Probes use this to map a token to pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Grid:
    rows: int
    cols: int
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) in image pixels

    @property
    def n_tokens(self) -> int:
        return self.rows * self.cols

    def token_boxes(self) -> np.ndarray:
        x0, y0, x1, y1 = self.box
        xs = np.linspace(x0, x1, self.cols + 1)
        ys = np.linspace(y0, y1, self.rows + 1)
        gx0, gy0 = np.meshgrid(xs[:-1], ys[:-1])
        gx1, gy1 = np.meshgrid(xs[1:], ys[1:])
        return np.stack([gx0, gy0, gx1, gy1], axis=-1).reshape(-1, 4)


@dataclass(frozen=True)
class TokenGeometry:
    image_size: tuple[int, int]  # (height, width) of the original image
    grids: tuple[Grid, ...]

    @classmethod
    def single_grid(cls, image_size: tuple[int, int], rows: int, cols: int) -> TokenGeometry:
        h, w = image_size
        return cls(image_size=(h, w), grids=(Grid(rows, cols, (0.0, 0.0, float(w), float(h))),))

    @property
    def n_tokens(self) -> int:
        return sum(g.n_tokens for g in self.grids)

    def token_boxes(self) -> np.ndarray:
        """(T, 4) pixel box of every token, in storage order."""
        return np.concatenate([g.token_boxes() for g in self.grids], axis=0)

    def to_dict(self) -> dict:
        return {"image_size": list(self.image_size), "grids": [asdict(g) for g in self.grids]}

    @classmethod
    def from_dict(cls, d: dict) -> TokenGeometry:
        grids = tuple(Grid(g["rows"], g["cols"], tuple(g["box"])) for g in d["grids"])
        return cls(image_size=tuple(d["image_size"]), grids=grids)

    def render(self, values: np.ndarray) -> np.ndarray:
        """Bilinearly upsample per-token values (T, C) to an (H, W, C) pixel map.

        Where grids overlap their renderings are averaged; pixels no grid covers are 0.
        """
        h, w = self.image_size
        values = np.asarray(values, dtype=np.float32)
        total = np.zeros((h, w, values.shape[1]), dtype=np.float32)
        weight = np.zeros((h, w, 1), dtype=np.float32)
        start = 0
        for g in self.grids:
            block = values[start : start + g.n_tokens].reshape(g.rows, g.cols, -1)
            start += g.n_tokens
            x0, y0, x1, y1 = (int(round(v)) for v in g.box)
            x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
            if x1 <= x0 or y1 <= y0:
                continue
            up = F.interpolate(
                torch.from_numpy(block).permute(2, 0, 1)[None],
                size=(y1 - y0, x1 - x0),
                mode="bilinear",
                align_corners=False,
            )[0].permute(1, 2, 0)
            total[y0:y1, x0:x1] += up.numpy()
            weight[y0:y1, x0:x1] += 1.0
        return np.divide(total, weight, out=np.zeros_like(total), where=weight > 0)


def area_weights(source: TokenGeometry, target: TokenGeometry) -> np.ndarray:
    """(T_target, T_source) overlap areas of every source token with every target cell, each
    row normalised to sum 1 (rows no source token covers stay 0)."""
    s, t = source.token_boxes(), target.token_boxes()
    width = np.minimum(t[:, None, 2], s[None, :, 2]) - np.maximum(t[:, None, 0], s[None, :, 0])
    height = np.minimum(t[:, None, 3], s[None, :, 3]) - np.maximum(t[:, None, 1], s[None, :, 1])
    overlap = np.clip(width, 0, None) * np.clip(height, 0, None)
    total = overlap.sum(axis=1, keepdims=True)
    return np.divide(overlap, total, out=np.zeros_like(overlap), where=total > 0).astype(
        np.float32)


def region_coverage(masks: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Fraction of each box covered by each mask.

    masks: (C, H, W) bool; boxes: (T, 4) pixel boxes. Returns (T, C) in [0, 1], computed
    exactly for integer boxes through summed-area tables (boxes are rounded to pixels).
    """
    c, h, w = masks.shape
    sat = np.zeros((c, h + 1, w + 1), dtype=np.float64)
    sat[:, 1:, 1:] = masks.astype(np.float64).cumsum(1).cumsum(2)
    b = np.rint(boxes).astype(np.int64)
    x0, x1 = np.clip(b[:, 0], 0, w), np.clip(b[:, 2], 0, w)
    y0, y1 = np.clip(b[:, 1], 0, h), np.clip(b[:, 3], 0, h)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = sat[:, y1, x1] - sat[:, y0, x1] - sat[:, y1, x0] + sat[:, y0, x0]
    return (inside / area).T


def patchify(images: np.ndarray, geometry: TokenGeometry, patch_px: int) -> np.ndarray:
    """Raw pixel tokens on `geometry`: each token's region resized to patch_px x patch_px.

    images: (B, H, W, 3) uint8. Returns (B, T, 3 * patch_px**2) float32 in [0, 1].
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    tokens = []
    for g in geometry.grids:
        x0, y0, x1, y1 = (int(round(v)) for v in g.box)
        region = x[:, :, y0:y1, x0:x1]
        size = (g.rows * patch_px, g.cols * patch_px)
        if tuple(region.shape[-2:]) != size:
            region = F.interpolate(region, size=size, mode="bilinear", antialias=True)
        cols = F.unfold(region, kernel_size=patch_px, stride=patch_px)  # (B, 3*p*p, T)
        tokens.append(cols.transpose(1, 2))
    return torch.cat(tokens, dim=1).numpy()
