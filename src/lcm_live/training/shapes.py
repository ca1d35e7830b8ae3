"""The "shapes" data set: one flat-coloured shape on a flat background, drawn procedurally from a seed.

Images are uint8 arrays (N, 64, 64, 3). Each sample is fully described by a :class:`ShapeSpec`, whose
caption is ``a {small|large} {color} {circle|square|triangle} on a {color} background``. Drawing is
vectorised numpy over a coordinate grid (no per-pixel Python loop), a batch of 256 takes a few ms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64  # pixels, square

# The palette, RGB 0-255 (issue 4). Order matters: indices are stored in specs and eval sets.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 180, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLORS = list(PALETTE)
SHAPES = ["circle", "square", "triangle"]
SIZES = ["small", "large"]
# Shape side (bounding-box width = height) in pixels at 64x64, inclusive ranges (issue 4).
SIZE_RANGE = {"small": (20, 28), "large": (36, 52)}


@dataclass(frozen=True)
class ShapeSpec:
    size: str  # small | large
    color: str  # foreground palette name
    shape: str  # circle | square | triangle
    background: str  # background palette name, never equal to color
    side: int  # bounding-box side in pixels
    x0: int  # top-left corner of the bounding box, pixels
    y0: int

    @property
    def caption(self) -> str:
        return caption_for(self.size, self.color, self.shape, self.background)


def caption_for(size: str, color: str, shape: str, background: str) -> str:
    return f"a {size} {color} {shape} on a {background} background"


def parse_caption(caption: str) -> tuple[str, str, str, str]:
    """(size, color, shape, background) from a caption in the data set's template; ValueError otherwise."""
    words = caption.strip().split()
    if (len(words) != 8 or words[0] != "a" or words[4:6] != ["on", "a"] or words[7] != "background"
            or words[1] not in SIZES or words[2] not in PALETTE or words[3] not in SHAPES
            or words[6] not in PALETTE):
        raise ValueError(f"not a shapes caption: {caption!r}")
    return words[1], words[2], words[3], words[6]


def vocabulary() -> list[str]:
    """Every word a caption can hold (16 words)."""
    return ["a", "on", "background", *SIZES, *COLORS, *SHAPES]


def random_specs(rng: np.random.Generator, n: int) -> list[ShapeSpec]:
    """``n`` specs, uniform over size, colour, shape, background (!= colour) and position."""
    specs = []
    for _ in range(n):
        size = SIZES[rng.integers(2)]
        color_i = int(rng.integers(len(COLORS)))
        bg_i = int((color_i + 1 + rng.integers(len(COLORS) - 1)) % len(COLORS))  # any other colour
        lo, hi = SIZE_RANGE[size]
        side = int(rng.integers(lo, hi + 1))
        x0 = int(rng.integers(0, IMAGE_SIZE - side + 1))
        y0 = int(rng.integers(0, IMAGE_SIZE - side + 1))
        specs.append(ShapeSpec(size, COLORS[color_i], SHAPES[rng.integers(3)], COLORS[bg_i], side, x0, y0))
    return specs


def shape_masks(specs: list[ShapeSpec], size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean masks (N, size, size), True on the shape. Pixel centres at +0.5; no anti-aliasing."""
    n = len(specs)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # (H, W) pixel centres
    x0 = np.array([s.x0 for s in specs], np.float32)[:, None, None]
    y0 = np.array([s.y0 for s in specs], np.float32)[:, None, None]
    side = np.array([s.side for s in specs], np.float32)[:, None, None]
    kind = np.array([SHAPES.index(s.shape) for s in specs])[:, None, None]
    u = (xx[None] - x0) / side  # position inside the bounding box, 0..1 on the shape
    v = (yy[None] - y0) / side
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    circle = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    # triangle pointing up: apex at the top centre, base on the bottom edge; half-width grows with v
    triangle = np.abs(u - 0.5) <= 0.5 * v
    masks = np.where(kind == 0, circle, np.where(kind == 1, True, triangle)) & inside
    assert masks.shape == (n, size, size)
    return masks


def draw(specs: list[ShapeSpec], size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 images (N, size, size, 3)."""
    fg = np.array([PALETTE[s.color] for s in specs], np.uint8)[:, None, None, :]
    bg = np.array([PALETTE[s.background] for s in specs], np.uint8)[:, None, None, :]
    return np.where(shape_masks(specs, size)[..., None], fg, bg)


def sample_batch(seed: int, n: int) -> tuple[np.ndarray, list[ShapeSpec]]:
    """A reproducible batch: the same ``seed`` and ``n`` give the same images and captions."""
    specs = random_specs(np.random.default_rng(seed), n)
    return draw(specs), specs


def to_tensor(images: np.ndarray):
    """uint8 (N, H, W, 3) -> float tensor (N, 3, H, W) in [-1, 1], the range diffusers' VAEs use."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def eval_specs(n_per_cell: int = 1) -> list[ShapeSpec]:
    """The fixed, balanced eval set: 3 shapes x 2 sizes x 16 (colour, background) pairs = 96 specs.

    Each colour is the foreground twice and the background twice. Sides and positions are fixed by a
    constant seed, so the set never changes; ``n_per_cell`` repeats the grid with new positions.
    """
    rng = np.random.default_rng(20231104)
    pairs = [(c, (c + off) % len(COLORS)) for c in range(len(COLORS)) for off in (1, 4)]
    specs = []
    for _ in range(n_per_cell):
        for shape in SHAPES:
            for size in SIZES:
                for c, b in pairs:
                    lo, hi = SIZE_RANGE[size]
                    side = int(rng.integers(lo, hi + 1))
                    x0, y0 = (int(v) for v in rng.integers(0, IMAGE_SIZE - side + 1, size=2))
                    specs.append(ShapeSpec(size, COLORS[c], shape, COLORS[b], side, x0, y0))
    return specs
