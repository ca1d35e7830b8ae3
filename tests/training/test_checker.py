"""The analytic checker reads colour, shape, size and background back from pixels."""

import numpy as np

from lcm_live.training.checker import nearest_color, read_image
from lcm_live.training.shapes import PALETTE, ShapeSpec, draw


def _one(shape, size="large", color="blue", bg="yellow", side=44, x0=10, y0=5):
    spec = ShapeSpec(size, color, shape, bg, side, x0, y0)
    return draw([spec])[0], spec


def test_reads_each_shape():
    for shape in ("circle", "square", "triangle"):
        image, spec = _one(shape)
        r = read_image(image)
        assert (r.color, r.shape, r.size, r.background) == ("blue", shape, "large", "yellow")


def test_fill_ratios_near_geometry():
    assert abs(read_image(_one("square")[0]).fill_ratio - 1.0) < 0.02
    assert abs(read_image(_one("circle")[0]).fill_ratio - np.pi / 4) < 0.04
    assert abs(read_image(_one("triangle")[0]).fill_ratio - 0.5) < 0.06


def test_small_shape_and_close_colours():
    image, _ = _one("triangle", size="small", color="orange", bg="red", side=20, x0=40, y0=40)
    r = read_image(image)
    assert (r.color, r.shape, r.size, r.background) == ("orange", "triangle", "small", "red")


def test_robust_to_noise_and_specks():
    image, _ = _one("circle", color="white", bg="black")
    rng = np.random.default_rng(0)
    noisy = np.clip(image.astype(np.float32) + rng.normal(0, 12, image.shape), 0, 255)
    noisy[2, 60] = PALETTE["red"]  # an isolated speck must not stretch the bounding box
    r = read_image(noisy)
    assert (r.color, r.shape, r.background) == ("white", "circle", "black")


def test_blank_image_has_no_shape():
    blank = np.zeros((64, 64, 3), np.uint8) + np.array(PALETTE["green"], np.uint8)
    r = read_image(blank)
    assert r.color is None and r.shape is None and r.background == "green"


def test_wrong_colour_is_read_as_wrong():
    image, spec = _one("square", color="purple")
    assert read_image(image).color == "purple" != "blue"
    assert nearest_color((250, 140, 30)) == "orange"
