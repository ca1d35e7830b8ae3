"""The outlined shapes variant (issue 18): captions match pixels, and the checker finds the outline."""

import numpy as np
import pytest

from lcm_live.training import shapes
from lcm_live.training.checker import read_image, score_images
from lcm_live.training.shapes import PALETTE, ShapeSpec, draw

ALL_ONE = {"color": 1.0, "shape": 1.0, "size": 1.0, "background": 1.0, "outline": 1.0}


def test_outlined_batch_is_the_plain_batch_with_rings():
    plain, plain_specs = shapes.sample_batch(5, 200)
    outlined, specs = shapes.sample_batch(5, 200, outline=True)
    assert [s.caption + ", outlined" for s in plain_specs] == [s.caption for s in specs]
    assert {s.outline for s in specs} == {2, 3} and {s.outline for s in plain_specs} == {0}
    masks = shapes.shape_masks(specs)
    assert np.array_equal(plain[masks], outlined[masks])  # the shapes themselves are untouched


def test_outlined_captions_match_pixels():
    images, specs = shapes.sample_batch(3, 300, outline=True)
    assert score_images(images, specs, outlined=True) == ALL_ONE
    for image, spec in zip(images, specs, strict=True):
        colours = {tuple(int(v) for v in px) for px in image.reshape(-1, 3)}
        want = {PALETTE[spec.color], PALETTE[spec.background]}
        if shapes.outline_visible(spec):
            want.add(PALETTE[shapes.outline_color(spec)])
        assert colours == want, spec


@pytest.mark.parametrize("width", [2, 3])
def test_ring_width_and_colour(width):
    spec = ShapeSpec("large", "red", "square", "blue", 40, 12, 12, outline=width)
    image = draw([spec])[0]
    row = image[32]  # through the square: background, ring, shape, ring, background
    black = np.all(row == PALETTE["black"], axis=-1)
    assert black.sum() == 2 * width
    assert np.all(black[12 - width:12]) and np.all(black[52:52 + width])
    white_ring = draw([ShapeSpec("large", "red", "circle", "black", 40, 12, 12, outline=width)])[0]
    assert read_image(white_ring, outlined=True).outline == "white"  # on black, the ring is white
    black_shape = draw([ShapeSpec("large", "black", "circle", "green", 40, 12, 12, outline=width)])[0]
    assert read_image(black_shape, outlined=True).outline == "white"  # around black, too


def test_invisible_rings_are_not_drawn_nor_scored():
    spec = ShapeSpec("small", "white", "square", "black", 28, 5, 5, outline=3)
    assert not shapes.outline_visible(spec)
    assert np.array_equal(draw([spec]), draw([ShapeSpec("small", "white", "square", "black", 28, 5, 5)]))
    assert "outline" not in score_images(draw([spec]), [spec], outlined=True)  # nothing to score on
    specs = shapes.eval_specs(outline=True)
    assert specs == shapes.eval_specs(outline=True) and sum(map(shapes.outline_visible, specs)) == 90


def test_checker_fails_a_plain_image_against_an_outlined_caption():
    plain, specs = shapes.sample_batch(11, 100)
    outlined_specs = shapes.with_outline(specs, np.random.default_rng(0))
    acc = score_images(plain, outlined_specs, outlined=True)
    assert acc["outline"] == 0.0 and acc["color"] == 1.0
    # and an outlined image fails a plain caption
    outlined, _ = shapes.sample_batch(11, 100, outline=True)
    assert score_images(outlined, specs, outlined=True)["outline"] < 0.1


def test_a_ring_in_another_colour_is_not_the_outline():
    spec = ShapeSpec("large", "blue", "circle", "yellow", 40, 10, 10, outline=3)
    image = draw([spec])[0].copy()
    image[np.all(image == PALETTE["black"], axis=-1)] = PALETTE["red"]
    reading = read_image(image, outlined=True)
    assert reading.outline == "red" and score_images(image[None], [spec], outlined=True)["outline"] == 0.0


def test_a_thick_ring_does_not_outvote_a_small_shape():
    spec = ShapeSpec("small", "orange", "triangle", "green", 20, 20, 20, outline=3)
    image = draw([spec])[0]
    r = read_image(image, outlined=True)
    assert (r.color, r.shape, r.size, r.background, r.outline) == ("orange", "triangle", "small", "green", "black")
    assert read_image(image).color == "black"  # why the outlined reading chooses by a 5x5 opening


def test_outline_reading_is_robust_to_noise():
    spec = ShapeSpec("large", "purple", "square", "white", 44, 8, 8, outline=2)
    rng = np.random.default_rng(0)
    noisy = np.clip(draw([spec])[0].astype(np.float32) + rng.normal(0, 12, (64, 64, 3)), 0, 255)
    assert read_image(noisy, outlined=True).outline == "black"


def test_the_mixed_pool_is_half_plain_half_outlined():
    from lcm_live.training.data import make_pool
    from lcm_live.training.vae import build_vae

    pool = make_pool(build_vae().eval(), "shapes-mixed", n_shapes=6, resolution=64, seed=1)
    assert len(pool) == 6 and pool.mean.shape[0] == 6
    assert [c.endswith(", outlined") for c in pool.captions] == [False] * 3 + [True] * 3
