"""The stochastic similarity filter (studio/similarity.py, serve --similarity-filter): off, every changed canvas
makes a frame; on, a canvas that barely changed is skipped with a probability rising past the threshold, a real
change always goes through, and no more than max_skips in a row are dropped."""

from __future__ import annotations

import argparse
import io
import random

import pytest
from PIL import Image, ImageDraw

from lcm_live.cli.serve import add_parser, build_settings
from lcm_live.studio.fake_engine import FakeEngine
from lcm_live.studio.similarity import SimilarityFilter, canvas_vector, cosine

from .conftest import next_final, next_of, params, receive, running_studio

pytestmark = pytest.mark.timeout(60)


def picture(shift: int = 0, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (200, 220, 240))
    ImageDraw.Draw(image).ellipse((10 + shift, 10, 40 + shift, 40), fill=(30, 60, 90))
    return image


def png(image: Image.Image, note: str = "") -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("note", note)  # other bytes, the same pixels
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_skip_probability_ramps_from_the_threshold_to_one():
    f = SimilarityFilter(0.9)
    assert f.skip_probability(0.89) == 0.0
    assert f.skip_probability(0.9) == 0.0
    assert f.skip_probability(0.95) == pytest.approx(0.5)
    assert f.skip_probability(1.0) == 1.0
    with pytest.raises(ValueError, match="threshold 1.0"):
        SimilarityFilter(1.0)


def test_identical_frames_are_skipped_a_change_is_not_and_skips_are_bounded():
    f = SimilarityFilter(0.98, max_skips=3, rng=random.Random(0))
    still = picture()
    assert f.skip(still) is False  # the first frame: nothing to compare with
    assert [f.skip(still) for _ in range(4)] == [True, True, True, False]  # the 4th: max_skips reached
    moved = picture(shift=20)
    assert cosine(canvas_vector(moved), canvas_vector(still)) < 0.98
    assert f.skip(moved) is False
    assert (f.processed, f.skipped) == (3, 3)


def test_near_threshold_frames_are_skipped_at_about_their_probability():
    base = picture()
    near = picture(shift=1)
    s = cosine(canvas_vector(base), canvas_vector(near))
    threshold = s - (1 - s)  # puts s half-way between the threshold and 1: skip probability 0.5
    rng = random.Random(1)
    skipped = 0
    for _ in range(400):  # a fresh filter each time: base processed, then near compared with it
        f = SimilarityFilter(threshold, rng=rng)
        f.skip(base)
        skipped += f.skip(near)
    assert 150 < skipped < 250  # binomial(400, 0.5): 200 +- 10, so this fails about once in 10^6 seeds


def test_a_session_with_the_filter_makes_no_frame_for_a_still_canvas():
    engine = FakeEngine()
    with running_studio(engine, similarity_filter=0.98) as (client, _, studio), client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(params(mode="img2img", prompt="p", strength=0.5, num_inference_steps=2))
        ws.send_bytes(png(picture(), "a"))
        assert next_final(ws)["type"] == "frame"
        calls = engine.generate_count
        ws.send_bytes(png(picture(), "b"))  # the same picture again (a still camera): skipped
        status = next_of(ws, "status")
        while status["inputs"] < 3:  # the first frame's own idle first
            status = next_of(ws, "status")
        assert status["state"] == "idle" and status["inputs"] == 3  # read, and no job for it
        assert engine.generate_count == calls
        ws.send_bytes(png(picture(shift=20), "c"))  # a real change: a frame
        assert next_final(ws)["type"] == "frame"
        assert engine.generate_count == calls + 1


def test_without_the_filter_every_changed_canvas_makes_a_frame():
    engine = FakeEngine()
    with running_studio(engine) as (client, _, studio), client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(params(mode="img2img", prompt="p", strength=0.5, num_inference_steps=2))
        ws.send_bytes(png(picture(), "a"))
        next_final(ws)
        ws.send_bytes(png(picture(), "b"))  # other bytes, the same pixels: without the filter, a new frame
        assert next_final(ws)["type"] == "frame"


def test_serve_flag_reaches_the_studio_settings():
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    assert build_settings(parser.parse_args(["serve", "--similarity-filter", "0.97"])).studio.similarity_filter == 0.97
    assert build_settings(parser.parse_args(["serve"])).studio.similarity_filter is None
