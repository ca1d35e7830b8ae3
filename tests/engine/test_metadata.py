"""PNG text chunks, JSON sidecars, unique names and all-or-nothing saving."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from lcm_live.engine.metadata import (
    read_png_parameters,
    read_sidecar,
    save_image,
    save_images,
    save_unique,
    sidecar_path,
)
from lcm_live.errors import UserError

PARAMS = {"prompt": "a café, neon ✨", "negative_prompt": None, "seed": 42, "num_inference_steps": 4,
          "guidance_scale": 8.0, "width": 16, "height": 16, "loras": [{"source": "style.safetensors", "scale": 0.8}],
          "model": "builtin:shapes", "lcm_live_version": "0.1.0"}


def _image(colour=(200, 10, 10)):
    return Image.new("RGB", (16, 16), colour)


def test_png_chunks_round_trip(tmp_path):
    path = save_image(_image(), tmp_path / "a.png", PARAMS)
    assert read_png_parameters(path) == PARAMS
    with Image.open(path) as img:
        assert img.text["prompt"] == "a café, neon ✨"  # one chunk per key, strings as they are
        assert img.text["seed"] == "42" and json.loads(img.text["loras"]) == PARAMS["loras"]
        assert img.text["negative_prompt"] == "null"
        assert img.getpixel((0, 0)) == (200, 10, 10)
    assert not sidecar_path(path).exists()


def test_json_sidecar(tmp_path):
    path = save_image(_image(), tmp_path / "b.png", PARAMS, metadata="json")
    assert sidecar_path(path) == tmp_path / "b.json" and read_sidecar(path) == PARAMS


def test_unique_names_never_overwrite(tmp_path):
    paths = [save_unique(_image((i, 0, 0)), PARAMS, directory=tmp_path / "outputs", stem="same") for i in range(3)]
    assert [p.name for p in paths] == ["same.png", "same-2.png", "same-3.png"]
    with Image.open(paths[0]) as img:
        assert img.getpixel((0, 0)) == (0, 0, 0)  # the first file was not replaced
    default = save_unique(_image(), PARAMS, directory=tmp_path / "outputs")
    assert default.name.startswith("lcm-") and default.name.endswith("-42.png")


def test_save_images_batch_and_explicit_output(tmp_path):
    out = save_images([_image(), _image((0, 0, 255))], PARAMS, output=tmp_path / "x" / "out.png", metadata="json")
    assert [p.name for p in out] == ["out-1.png", "out-2.png"]
    assert [read_png_parameters(p)["image_index"] for p in out] == [0, 1]
    assert read_sidecar(out[1])["image_index"] == 1
    one = save_images([_image()], PARAMS, output=tmp_path / "single.png")
    assert [p.name for p in one] == ["single.png"] and "image_index" not in read_png_parameters(one[0])


@pytest.mark.parametrize("output", ["out.jpg", "noext"])
def test_output_must_be_png(tmp_path, output):
    with pytest.raises(UserError) as err:
        save_images([_image()], PARAMS, output=tmp_path / output)
    assert err.value.field == "output" and ".png" in err.value.message
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_partial_file(tmp_path):
    class Broken:
        def save(self, fp, **kwargs):
            with open(fp, "wb") as f:
                f.write(b"\x89PNG half")
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_image(Broken(), tmp_path / "c.png", PARAMS)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary file


def test_failed_sidecar_removes_the_image(tmp_path):
    (tmp_path / "d.json").mkdir()  # the sidecar's name is taken by a folder: its write fails
    with pytest.raises(OSError):
        save_image(_image(), tmp_path / "d.png", PARAMS, metadata="json")
    assert [p.name for p in tmp_path.iterdir()] == ["d.json"]  # no image, no temporary files


def test_unserialisable_parameters_leave_nothing(tmp_path):
    with pytest.raises(TypeError):
        save_image(_image(), tmp_path / "f.png", dict(PARAMS, seed=object()))
    assert list(tmp_path.iterdir()) == []


def test_metadata_mode_is_checked(tmp_path):
    with pytest.raises(UserError):
        save_images([_image()], PARAMS, output=tmp_path / "e.png", metadata="xml")
