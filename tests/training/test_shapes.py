"""The shapes data set: deterministic, balanced eval set, captions that match the pixels."""

import numpy as np
import pytest

from lcm_live.training import shapes
from lcm_live.training.checker import score_images


def test_same_seed_same_batch_and_different_seed_differs():
    a, specs_a = shapes.sample_batch(7, 32)
    b, specs_b = shapes.sample_batch(7, 32)
    c, _ = shapes.sample_batch(8, 32)
    assert a.dtype == np.uint8 and a.shape == (32, 64, 64, 3)
    assert np.array_equal(a, b) and specs_a == specs_b
    assert not np.array_equal(a, c)


def test_captions_match_pixels():
    images, specs = shapes.sample_batch(3, 300)
    assert score_images(images, specs) == {"color": 1.0, "shape": 1.0, "size": 1.0, "background": 1.0}
    for spec in specs:
        assert spec.color != spec.background
        lo, hi = shapes.SIZE_RANGE[spec.size]
        assert lo <= spec.side <= hi
        assert 0 <= spec.x0 <= 64 - spec.side and 0 <= spec.y0 <= 64 - spec.side
        assert shapes.parse_caption(spec.caption) == (spec.size, spec.color, spec.shape, spec.background)


def test_pixels_use_exactly_the_two_palette_colours():
    images, specs = shapes.sample_batch(4, 8)
    for image, spec in zip(images, specs, strict=True):
        colours = {tuple(int(v) for v in px) for px in image.reshape(-1, 3)}
        assert colours == {shapes.PALETTE[spec.color], shapes.PALETTE[spec.background]}


def test_eval_set_is_fixed_and_balanced():
    specs = shapes.eval_specs()
    assert specs == shapes.eval_specs() and len(specs) == 96
    for attr, values in (("color", shapes.COLORS), ("background", shapes.COLORS), ("shape", shapes.SHAPES),
                         ("size", shapes.SIZES)):
        counts = {v: sum(getattr(s, attr) == v for s in specs) for v in values}
        assert len(set(counts.values())) == 1, (attr, counts)
    assert len(shapes.eval_specs(n_per_cell=2)) == 192


def test_caption_template_exact():
    assert shapes.caption_for("small", "red", "circle", "green") == "a small red circle on a green background"
    with pytest.raises(ValueError):
        shapes.parse_caption("a tiny red circle on a green background")
    assert len(shapes.vocabulary()) == 16


def test_to_tensor_range():
    images, _ = shapes.sample_batch(0, 2)
    x = shapes.to_tensor(images)
    assert tuple(x.shape) == (2, 3, 64, 64) and float(x.min()) >= -1 and float(x.max()) <= 1
