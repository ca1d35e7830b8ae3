"""The analytic checker: reads colour, shape, size and background back from a 64x64 shapes image.

- background: the nearest palette colour to the median of a ring of pixels 2 px inside the border (the
  outermost pixels are where decoders leave edge artefacts; a shape never covers a whole ring);
- every pixel is labelled with its nearest palette colour; the foreground colour is the most common
  label other than the background after a 3x3 morphological opening (which removes specks and lines
  thinner than 3 px, i.e. decoder artefacts, but keeps any shape: 20 px and up);
- foreground: the opened mask of that label;
- shape: the fill ratio of the foreground's bounding box: square ~1.0, circle ~pi/4 = 0.785,
  triangle ~0.5; the thresholds sit half-way (0.64, 0.89);
- size: the bounding box's larger side, split at 32 px (small shapes are 20-28 px, large 36-52 px).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lcm_live.training.shapes import COLORS, PALETTE, SHAPES, ShapeSpec

_PALETTE = np.array([PALETTE[c] for c in COLORS], np.float32)  # (8, 3)
SHAPE_THRESHOLDS = (0.64, 0.89)  # fill ratio: triangle < 0.64 <= circle < 0.89 <= square
SIZE_SPLIT = 32  # pixels at 64x64
RING_INSET = 2  # pixels


def _erode(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    p = np.pad(mask, 1, constant_values=True)  # the image edge does not erode a shape touching it
    out = np.ones_like(mask)
    for dy in range(3):
        for dx in range(3):
            out &= p[dy:dy + h, dx:dx + w]
    return out


def _dilate(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    p = np.pad(mask, 1, constant_values=False)
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= p[dy:dy + h, dx:dx + w]
    return out


@dataclass(frozen=True)
class Reading:
    color: str | None  # None: no foreground found
    shape: str | None
    size: str | None
    background: str
    fill_ratio: float


def nearest_color(rgb: np.ndarray) -> str:
    return COLORS[int(np.argmin(np.linalg.norm(_PALETTE - np.asarray(rgb, np.float32), axis=-1)))]


def read_image(image: np.ndarray) -> Reading:
    """``image``: uint8 or float 0-255 array (H, W, 3); any square size (thresholds scale with it)."""
    img = np.asarray(image, np.float32)
    h, w, _ = img.shape
    i = RING_INSET
    ring = np.concatenate([img[i, i:w - i], img[h - 1 - i, i:w - i], img[i:h - i, i], img[i:h - i, w - 1 - i]])
    background = nearest_color(np.median(ring, axis=0))
    labels = np.argmin(np.linalg.norm(img[:, :, None, :] - _PALETTE[None, None], axis=-1), axis=-1)  # (H, W)
    best, mask = None, None
    for k, name in enumerate(COLORS):
        if name == background:
            continue
        opened = _dilate(_erode(labels == k))  # opening with a 3x3 square
        if mask is None or opened.sum() > mask.sum():
            best, mask = name, opened
    if mask is None or mask.sum() < 4:
        return Reading(None, None, None, background, 0.0)
    color = best
    ys, xs = np.nonzero(mask)
    bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = float(mask.sum() / (bh * bw))
    shape = "triangle" if fill < SHAPE_THRESHOLDS[0] else "circle" if fill < SHAPE_THRESHOLDS[1] else "square"
    size = "large" if max(bh, bw) * 64 / w > SIZE_SPLIT else "small"
    return Reading(color, shape, size, background, fill)


@dataclass
class Scores:
    n: int = 0
    color: int = 0
    shape: int = 0
    size: int = 0
    background: int = 0

    def add(self, reading: Reading, want: ShapeSpec) -> None:
        self.n += 1
        self.color += reading.color == want.color
        self.shape += reading.shape == want.shape
        self.size += reading.size == want.size
        self.background += reading.background == want.background

    def accuracy(self) -> dict[str, float]:
        n = max(self.n, 1)
        return {k: getattr(self, k) / n for k in ("color", "shape", "size", "background")}


def score_images(images: np.ndarray, specs: list[ShapeSpec]) -> dict[str, float]:
    """Accuracy of colour, shape, size and background over a batch (N, H, W, 3) against its specs."""
    scores = Scores()
    for image, spec in zip(images, specs, strict=True):
        scores.add(read_image(image), spec)
    return scores.accuracy()


__all__ = ["Reading", "Scores", "read_image", "score_images", "nearest_color", "SHAPES"]
