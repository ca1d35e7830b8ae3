"""The "shapes" data set: one flat-coloured shape on a flat background, drawn procedurally from a seed.

Images are uint8 arrays (N, 64, 64, 3). Each sample is fully described by a :class:`ShapeSpec`, whose
caption is ``a {small|large} {color} {circle|square|triangle} on a {color} background``. Drawing is
vectorised numpy over a coordinate grid (no per-pixel Python loop), a batch of 256 takes a few ms.

The outlined variant (issue 18, the fine-tune's style): every shape gets a 2-3 px ring just outside it,
black, or white where the background or the shape is black, and the caption ends with ``, outlined``.
Where that ring would have the shape's own colour (a white shape on black) it is not drawn: it could not be
seen and would only make the shape look bigger.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
OUTLINE_WIDTHS = (2, 3)  # pixels, the outlined variant's ring width
OUTLINE_SUFFIX = ", outlined"


@dataclass(frozen=True)
class ShapeSpec:
    size: str  # small | large
    color: str  # foreground palette name
    shape: str  # circle | square | triangle
    background: str  # background palette name, never equal to color
    side: int  # bounding-box side in pixels
    x0: int  # top-left corner of the bounding box, pixels
    y0: int
    outline: int = 0  # ring width in pixels around the shape; 0: the plain data set

    @property
    def caption(self) -> str:
        plain = caption_for(self.size, self.color, self.shape, self.background)
        return plain + OUTLINE_SUFFIX if self.outline else plain


def outline_color(spec: ShapeSpec) -> str:
    """The ring's colour: black, or white on a black background or around a black shape."""
    return "white" if "black" in (spec.background, spec.color) else "black"


def outline_visible(spec: ShapeSpec) -> bool:
    """An outlined spec whose ring differs from both the shape and the background (all but white-on-black
    and black-on-white)."""
    return bool(spec.outline) and outline_color(spec) not in (spec.color, spec.background)


def with_outline(specs: list[ShapeSpec], rng: np.random.Generator) -> list[ShapeSpec]:
    """The same specs, outlined: each ring 2 or 3 px wide, drawn from ``rng``."""
    widths = rng.choice(OUTLINE_WIDTHS, size=len(specs))
    return [replace(s, outline=int(k)) for s, k in zip(specs, widths, strict=True)]


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


def dilate(masks: np.ndarray) -> np.ndarray:
    """Boolean (N, H, W) grown by one pixel in all 8 directions (a 3x3 square)."""
    n, h, w = masks.shape
    p = np.pad(masks, ((0, 0), (1, 1), (1, 1)))
    out = np.zeros_like(masks)
    for dy in range(3):
        for dx in range(3):
            out |= p[:, dy:dy + h, dx:dx + w]
    return out


def draw(specs: list[ShapeSpec], size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 images (N, size, size, 3); outlined specs get their ring (pixels at Chebyshev distance 1..width)."""
    fg = np.array([PALETTE[s.color] for s in specs], np.uint8)[:, None, None, :]
    bg = np.array([PALETTE[s.background] for s in specs], np.uint8)[:, None, None, :]
    masks = shape_masks(specs, size)
    images = np.where(masks[..., None], fg, bg)
    drawn = [i for i, s in enumerate(specs) if outline_visible(s)]
    if drawn:
        width = np.array([specs[i].outline for i in drawn])[:, None, None]
        grown, ring = masks[drawn], np.zeros_like(masks[drawn])  # (M, H, W)
        for k in range(1, max(OUTLINE_WIDTHS) + 1):
            grown = dilate(grown)
            ring |= grown & (width >= k)  # the ring covers distances 1..width
        ring &= ~masks[drawn]
        color = np.array([PALETTE[outline_color(specs[i])] for i in drawn], np.uint8)[:, None, None, :]
        images[drawn] = np.where(ring[..., None], color, images[drawn])
    return images


def sample_batch(seed: int, n: int, outline: bool = False) -> tuple[np.ndarray, list[ShapeSpec]]:
    """A reproducible batch: the same ``seed`` and ``n`` give the same images and captions; ``outline``: the
    same shapes, outlined (the ring widths are drawn after the specs, so the shapes do not change)."""
    rng = np.random.default_rng(seed)
    specs = random_specs(rng, n)
    if outline:
        specs = with_outline(specs, rng)
    return draw(specs), specs


def to_tensor(images: np.ndarray):
    """uint8 (N, H, W, 3) -> float tensor (N, 3, H, W) in [-1, 1], the range diffusers' VAEs use."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def eval_specs(n_per_cell: int = 1, outline: bool = False) -> list[ShapeSpec]:
    """The fixed, balanced eval set: 3 shapes x 2 sizes x 16 (colour, background) pairs = 96 specs.

    Each colour is the foreground twice and the background twice. Sides and positions are fixed by a
    constant seed, so the set never changes; ``n_per_cell`` repeats the grid with new positions;
    ``outline``: the same specs, outlined (ring widths from another constant seed).
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
    return with_outline(specs, np.random.default_rng(18)) if outline else specs
