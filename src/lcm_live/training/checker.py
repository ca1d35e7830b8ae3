"""The analytic checker: reads colour, shape, size and background back from a 64x64 shapes image.

- background: the nearest palette colour to the median of a ring of pixels 2 px inside the border (the
  outermost pixels are where decoders leave edge artefacts; a shape never covers a whole ring);
- every pixel is labelled with its nearest palette colour; the foreground colour is the most common
  label other than the background after a 3x3 morphological opening (which removes specks and lines
  thinner than 3 px, i.e. decoder artefacts, but keeps any shape: 20 px and up);
- foreground: the opened mask of that label;
- shape: the fill ratio of the foreground's bounding box: square ~1.0, circle ~pi/4 = 0.785,
  triangle ~0.5; the thresholds sit half-way (0.64, 0.89);
- size: the bounding box's larger side, split at 32 px (small shapes are 20-28 px, large 36-52 px);
- outline (``outlined=True``, issue 18): the foreground colour is chosen by a 5x5 opening instead, which
  erases rings up to 4 px wide (so a 3 px black outline never outvotes a small shape), then the ring of
  pixels 1-2 px outside the foreground is read: its most common label other than the foreground's is the
  outline when it is not the background and covers at least half the ring.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lcm_live.training.shapes import COLORS, PALETTE, SHAPES, ShapeSpec, outline_color, outline_visible

_PALETTE = np.array([PALETTE[c] for c in COLORS], np.float32)  # (8, 3)
SHAPE_THRESHOLDS = (0.64, 0.89)  # fill ratio: triangle < 0.64 <= circle < 0.89 <= square
SIZE_SPLIT = 32  # pixels at 64x64
RING_INSET = 2  # pixels
OUTLINE_COVER = 0.5  # least fraction of the 1-2 px ring around the shape in one colour to call it an outline


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
    outline: str | None = None  # the ring's colour (``outlined=True`` only); None: no outline found


def nearest_color(rgb: np.ndarray) -> str:
    return COLORS[int(np.argmin(np.linalg.norm(_PALETTE - np.asarray(rgb, np.float32), axis=-1)))]


def _open(mask: np.ndarray, times: int = 1) -> np.ndarray:
    """Morphological opening with a (2 * times + 1)-pixel square."""
    for _ in range(times):
        mask = _erode(mask)
    for _ in range(times):
        mask = _dilate(mask)
    return mask


def read_outline(labels: np.ndarray, mask: np.ndarray, color: str, background: str) -> str | None:
    """The colour of a ring 1-2 px outside ``mask`` (the shape), or None when no single colour other than
    the shape's and the background's covers at least ``OUTLINE_COVER`` of it. ``labels``: palette indices."""
    ring = _dilate(_dilate(mask)) & ~mask
    if not ring.any():
        return None
    counts = np.bincount(labels[ring], minlength=len(COLORS))
    counts[COLORS.index(color)] = 0
    best = int(np.argmax(counts))
    if COLORS[best] == background or counts[best] < OUTLINE_COVER * ring.sum():
        return None
    return COLORS[best]


def read_image(image: np.ndarray, outlined: bool = False) -> Reading:
    """``image``: uint8 or float 0-255 array (H, W, 3); any square size (thresholds scale with it).
    ``outlined``: also read an outline (and choose the foreground so that a thick one cannot win)."""
    img = np.asarray(image, np.float32)
    h, w, _ = img.shape
    i = RING_INSET
    ring = np.concatenate([img[i, i:w - i], img[h - 1 - i, i:w - i], img[i:h - i, i], img[i:h - i, w - 1 - i]])
    background = nearest_color(np.median(ring, axis=0))
    labels = np.argmin(np.linalg.norm(img[:, :, None, :] - _PALETTE[None, None], axis=-1), axis=-1)  # (H, W)
    best, mask, votes = None, None, -1
    for k, name in enumerate(COLORS):
        if name == background:
            continue
        opened = _open(labels == k)  # 3x3
        vote = int(_open(labels == k, 2).sum()) if outlined else int(opened.sum())
        if vote > votes:
            best, mask, votes = name, opened, vote
    if mask is None or mask.sum() < 4:
        return Reading(None, None, None, background, 0.0)
    color = best
    ys, xs = np.nonzero(mask)
    bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = float(mask.sum() / (bh * bw))
    shape = "triangle" if fill < SHAPE_THRESHOLDS[0] else "circle" if fill < SHAPE_THRESHOLDS[1] else "square"
    size = "large" if max(bh, bw) * 64 / w > SIZE_SPLIT else "small"
    outline = read_outline(labels, mask, color, background) if outlined else None
    return Reading(color, shape, size, background, fill, outline)


@dataclass
class Scores:
    n: int = 0
    color: int = 0
    shape: int = 0
    size: int = 0
    background: int = 0
    outline: int = 0
    outline_n: int = 0  # images the outline is scored on

    def add(self, reading: Reading, want: ShapeSpec, outlined: bool = False) -> None:
        self.n += 1
        self.color += reading.color == want.color
        self.shape += reading.shape == want.shape
        self.size += reading.size == want.size
        self.background += reading.background == want.background
        if outlined and (outline_visible(want) or not want.outline):
            # an outlined spec: its ring, in its colour; a plain one: no ring at all. Outlines that cannot
            # be seen (white on black, black on white) are not scored.
            self.outline_n += 1
            self.outline += reading.outline == (outline_color(want) if want.outline else None)

    def accuracy(self) -> dict[str, float]:
        n = max(self.n, 1)
        acc = {k: getattr(self, k) / n for k in ("color", "shape", "size", "background")}
        if self.outline_n:
            acc["outline"] = self.outline / self.outline_n
        return acc


def score_images(images: np.ndarray, specs: list[ShapeSpec], outlined: bool = False) -> dict[str, float]:
    """Accuracy of colour, shape, size and background over a batch (N, H, W, 3) against its specs;
    ``outlined``: also of the outline (an outlined spec wants its ring, a plain one none)."""
    scores = Scores()
    for image, spec in zip(images, specs, strict=True):
        scores.add(read_image(image, outlined=outlined), spec, outlined=outlined)
    return scores.accuracy()


__all__ = ["Reading", "Scores", "read_image", "score_images", "nearest_color", "SHAPES"]
