"""The ESRGAN choice of POST /api/upscale (serve --upscaler): loaded at start, named in /api/info, run alone or
before the tiled LCM pass (on a tiny RRDBNet and a FakeEngine), refused clearly when the server has none."""

from __future__ import annotations

import base64
import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

from lcm_live.errors import UserError

from .conftest import TOKEN, running_studio, studio_settings
from .tiny_esrgan import import_spandrel, needs_spandrel, save_tiny_esrgan

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _png(size, color=(40, 90, 200), parameters=None) -> str:
    from lcm_live.engine.metadata import png_info

    rng = np.random.default_rng(0)  # some texture, so that the model's output is not flat
    pixels = np.clip(np.array(color) + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", pnginfo=png_info(parameters) if parameters else None)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _read_png(content: bytes):
    image = Image.open(io.BytesIO(content))
    image.load()
    return image, json.loads(image.text["parameters"])


@pytest.fixture(scope="module")
def esrgan_path(tmp_path_factory):
    import_spandrel()
    return save_tiny_esrgan(tmp_path_factory.mktemp("esrgan"))


def test_esrgan_choices_are_refused_without_an_upscaler():
    with running_studio(token=TOKEN) as (client, engine, _studio):
        assert "upscaler" not in client.get("/api/info", headers=AUTH).json()
        for choice in ("esrgan", "esrgan+lcm"):
            r = client.post("/api/upscale", headers=AUTH, json={"image": _png((32, 32)), "scale": 2,
                                                                "upscaler": choice})
            body = r.json()
            assert r.status_code == 422 and body["field"] == "upscaler", r.text
            assert f"upscaler='{choice}'" in body["message"] and "serve --upscaler PATH.safetensors" in body["message"]
            assert '"upscaler": "lcm"' in body["message"]
        r = client.post("/api/upscale", headers=AUTH, json={"image": _png((32, 32)), "upscaler": "bicubic"})
        assert r.status_code == 422 and r.json()["field"] == "upscaler"
        assert engine.calls == []  # nothing ran
        # "lcm" is today's default, given or not
        r = client.post("/api/upscale", headers=AUTH, json={"image": _png((32, 32)), "upscaler": "lcm",
                                                            "prompt": "x", "seed": 1})
        assert r.status_code == 200 and _read_png(r.content)[1]["upscale"]["method"] == "lanczos+lcm-tiled"


@needs_spandrel
def test_esrgan_alone_runs_the_servers_model_and_no_tile(esrgan_path):
    from lcm_live.engine.esrgan import load_upscaler, run_upscaler

    source = _png((40, 24), parameters={"prompt": "a red fox", "seed": 7})
    with running_studio(token=TOKEN, upscaler=str(esrgan_path)) as (client, engine, studio):
        info = client.get("/api/info", headers=AUTH).json()
        assert info["upscaler"] == {"name": esrgan_path.name, "architecture": "ESRGAN", "scale": 4}
        assert str(esrgan_path.parent) not in json.dumps(info)  # its name, never its folder
        r = client.post("/api/upscale", headers=AUTH, json={"image": source, "scale": 4, "upscaler": "esrgan"})
        assert r.status_code == 200, r.text
        image, params = _read_png(r.content)
        assert image.size == (160, 96) and engine.calls == []  # no LCM tile ran
        assert params["upscale"] == {"scale": 4, "method": "esrgan", "source_width": 40, "source_height": 24,
                                     "upscaler": esrgan_path.name}
        assert (params["prompt"], params["seed"]) == ("a red fox", 7)  # the frame's own, carried over
        # The very model on the file: the pixels of running it directly.
        direct = run_upscaler(load_upscaler(esrgan_path), Image.open(io.BytesIO(base64.b64decode(source))))
        assert np.abs(np.asarray(image).astype(int) - np.asarray(direct).astype(int)).max() <= 1
        # x2 with a 4x model: resized to the scale asked for, and said so
        r = client.post("/api/upscale", headers=AUTH, json={"image": source, "scale": 2, "upscaler": "esrgan"})
        image, params = _read_png(r.content)
        assert image.size == (80, 48) and "is 4x" in params["warnings"][0]


@needs_spandrel
def test_esrgan_then_lcm_streams_each_stages_tiles(esrgan_path):
    from lcm_live.engine.esrgan import tile_count

    with running_studio(token=TOKEN, upscaler=str(esrgan_path)) as (client, engine, studio):
        headers = {**AUTH, "Accept": "application/x-ndjson"}
        # 300 px wide: two ESRGAN tiles of 256; then the LCM pass over the 1200x160 result
        with client.stream("POST", "/api/upscale", headers=headers,
                           json={"image": _png((300, 40)), "scale": 4, "prompt": "x", "seed": 3,
                                 "upscaler": "esrgan+lcm"}) as r:
            assert r.status_code == 200
            lines = [json.loads(line) for line in r.iter_lines() if line]
        last = lines[-1]
        assert last["type"] == "upscaled", last
        u = last["parameters"]["upscale"]
        assert u["method"] == "esrgan+lcm-tiled" and u["upscaler"] == esrgan_path.name
        esrgan_tiles = tile_count(300, 40)
        assert esrgan_tiles == 2
        assert lines[:-1] == [{"type": "upscale", "stage": "esrgan", "tile": k, "tiles": esrgan_tiles}
                              for k in range(1, esrgan_tiles + 1)] + \
            [{"type": "upscale", "tile": k, "tiles": u["tiles"]} for k in range(1, u["tiles"] + 1)]
        assert (last["width"], last["height"]) == (1200, 160)
        assert len(engine.calls) == u["tiles"] and {c.prompt for c in engine.calls} == {"x"}


@needs_spandrel
def test_a_bad_upscaler_fails_the_start(tmp_path, esrgan_path):
    from lcm_live.studio.app import create_app

    pickle = tmp_path / "RealESRGAN_x4plus.pth"
    pickle.write_bytes(b"never read")
    with pytest.raises(UserError, match="only .safetensors") as exc:
        create_app(studio_settings(upscaler=str(pickle)), lambda: None)
    assert exc.value.field == "upscaler"
    with pytest.raises(UserError, match="no such file"):
        create_app(studio_settings(upscaler=str(tmp_path / "missing.safetensors")), lambda: None)


@needs_spandrel
def test_serve_loads_the_upscaler_at_start(fake_uvicorn, esrgan_path, tmp_path, capsys):
    from lcm_live.cli import main

    assert main(["serve", "--fake-engine", "{}", "--upscaler", str(esrgan_path)]) == 0
    app = fake_uvicorn["config"].app
    assert app.state.studio.upscaler.architecture == "ESRGAN"
    assert f"upscaler: {esrgan_path.name} (ESRGAN, 4x)" in capsys.readouterr().err
    fake_uvicorn.clear()
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"x")
    assert main(["serve", "--fake-engine", "{}", "--upscaler", str(bad)]) == 2
    assert "only .safetensors" in capsys.readouterr().err and "ran" not in fake_uvicorn
    assert main(["serve", "--fake-engine", "{}", "--ray", "--upscaler", str(esrgan_path)]) == 2
    assert "--upscaler works without --ray" in capsys.readouterr().err


@needs_spandrel
def test_serve_without_torchvision_loads_the_esrgan_from_a_fresh_spandrel_import(fake_uvicorn, esrgan_path,
                                                                               monkeypatch, capsys):
    """What a machine without torchvision (this one) gets: spandrel imported anew by serve (its LaMa and
    RestoreFormer import torchvision), the ESRGAN loaded, and no torchvision module left for other libraries."""
    from lcm_live.cli import main

    for name in [m for m in sys.modules if m == "spandrel" or m.startswith("spandrel.")]:
        monkeypatch.delitem(sys.modules, name)  # imported again (and restored after)
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
        monkeypatch.setitem(sys.modules, name, None)  # "import torchvision" raises ImportError
    assert main(["serve", "--fake-engine", "{}", "--upscaler", str(esrgan_path)]) == 0, capsys.readouterr().err
    assert fake_uvicorn["config"].app.state.studio.upscaler.architecture == "ESRGAN"
    assert sys.modules["torchvision"] is None  # the stand-ins are gone again; the blocker is the test's own
