"""A stochastic similarity filter for camera and screen input (``serve --similarity-filter T``): a canvas that
barely changed since the last one sent to the engine is skipped, with a probability that rises as their cosine
similarity passes the threshold. StreamDiffusion's idea (Kodaira et al. 2023, "StreamDiffusion: A Pipeline-level
Solution for Real-time Interactive Generation", stochastic similarity filter): a still camera stops costing the
CPU a UNet evaluation per frame, while a real change still gets through at once.

1. The canvas is reduced to :data:`SIDE` x :data:`SIDE` RGB and scaled to [-1, 1] (as the VAE sees pixels), a vector.
2. Its cosine similarity ``s`` with the last *processed* canvas's vector (not the last skipped one: a slow drift
   adds up until it passes).
3. Below ``threshold`` it is processed; above it, skipped with probability ``(s - threshold) / (1 - threshold)``:
   0 at the threshold, 1 for an identical frame.
4. At most ``max_skips`` skips in a row: then the next one is processed whatever its similarity, so that a scene
   that creeps just under the noise still refreshes.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

SIDE = 64  # compared at 64x64: enough to see a hand move, ~50 us a frame
MAX_SKIPS = 10


def canvas_vector(image: Any) -> np.ndarray:
    """A PIL image as a float32 vector of its SIDE x SIDE RGB pixels in [-1, 1]."""
    small = image.convert("RGB").resize((SIDE, SIDE))
    return (np.asarray(small, dtype=np.float32).reshape(-1) / 127.5) - 1.0


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b)) / denominator if denominator > 0 else float(np.array_equal(a, b))


class SimilarityFilter:
    """``skip(image)`` -> whether to drop this canvas; remembers the last one processed. One per session."""

    def __init__(self, threshold: float, *, max_skips: int = MAX_SKIPS, rng: random.Random | None = None):
        if not 0 < threshold < 1:
            raise ValueError(f"similarity threshold {threshold}: give a cosine similarity in (0, 1), e.g. 0.98")
        self.threshold, self.max_skips = threshold, max_skips
        self.rng = rng or random.Random()
        self._last: np.ndarray | None = None
        self._skips_in_a_row = 0
        self.skipped = 0
        self.processed = 0
        self.last_similarity: float | None = None

    def skip_probability(self, similarity: float) -> float:
        if similarity < self.threshold:
            return 0.0
        return min(1.0, (similarity - self.threshold) / (1 - self.threshold))

    def skip(self, image: Any) -> bool:
        vector = canvas_vector(image)
        if self._last is not None and self._skips_in_a_row < self.max_skips:
            self.last_similarity = cosine(vector, self._last)
            if self.rng.random() < self.skip_probability(self.last_similarity):
                self._skips_in_a_row += 1
                self.skipped += 1
                return True
        self._last, self._skips_in_a_row = vector, 0
        self.processed += 1
        return False

    def reset(self) -> None:
        """Forget the last processed canvas (e.g. the canvas layer was cleared): the next one is processed."""
        self._last, self._skips_in_a_row = None, 0
