"""Letterboxing: fit an image into a square keeping its aspect ratio, and move its labels along.

The image is scaled so its longer side fills the square, then centred on a padded canvas. No
pixel is cropped, so no object is cut, and no object is stretched. Boxes and polygons move by
the same affine map as the image's pixel grid (x' = x * scale_x + offset_x, per axis, where
scale_x = new_width / width exactly), so polygons are rasterised at the output resolution
rather than resampled; RLE masks (COCO's crowd regions) have no polygon and are resampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

PAD_RGB = (114, 114, 114)  # mid grey: no object class is drawn in it


@dataclass(frozen=True)
class Letterbox:
    width: int  # of the source image
    height: int
    size: int  # side of the square output

    @property
    def new_size(self) -> tuple[int, int]:
        """(width, height) of the scaled image inside the square, at least 1 px each."""
        longer = max(self.width, self.height)
        return (max(1, round(self.width * self.size / longer)),
                max(1, round(self.height * self.size / longer)))

    @property
    def scale(self) -> tuple[float, float]:
        new_w, new_h = self.new_size
        return new_w / self.width, new_h / self.height

    @property
    def offset(self) -> tuple[int, int]:
        new_w, new_h = self.new_size
        return (self.size - new_w) // 2, (self.size - new_h) // 2

    def to_dict(self) -> dict[str, float]:
        (sx, sy), (ox, oy) = self.scale, self.offset
        return {"scale_x": sx, "scale_y": sy, "offset_x": ox, "offset_y": oy}

    def image(self, image: Image.Image) -> np.ndarray:
        """(size, size, 3) uint8: the RGB image scaled (bilinear, antialiased) and padded."""
        canvas = Image.new("RGB", (self.size, self.size), PAD_RGB)
        canvas.paste(image.convert("RGB").resize(self.new_size, Image.Resampling.BILINEAR),
                     self.offset)
        return np.asarray(canvas)

    def points(self, xy: np.ndarray) -> np.ndarray:
        """(..., 2) x, y in source pixel coordinates to output coordinates."""
        return np.asarray(xy, float) * self.scale + self.offset

    def box(self, xywh: list[float]) -> list[float]:
        """A COCO [x, y, w, h] box in output coordinates."""
        x, y, w, h = xywh
        (sx, sy), (ox, oy) = self.scale, self.offset
        return [x * sx + ox, y * sy + oy, w * sx, h * sy]

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """A (height, width) bool mask resampled to (size, size): a pixel is in it if at least
        half of its area was (bilinear, antialiased resampling of the 0/1 mask)."""
        scaled = Image.fromarray(mask.astype(np.uint8) * 255).resize(
            self.new_size, Image.Resampling.BILINEAR)
        out = np.zeros((self.size, self.size), dtype=bool)
        (ox, oy), (new_w, new_h) = self.offset, self.new_size
        out[oy : oy + new_h, ox : ox + new_w] = np.asarray(scaled) >= 128
        return out
