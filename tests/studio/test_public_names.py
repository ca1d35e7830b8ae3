"""Images and /api/info name models, never a server path (issue: --model /some/folder was in every PNG)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from lcm_live.studio.fake_engine import FakeEngine
from lcm_live.studio.public import public_model_name, public_parameters

from .conftest import running_studio


@pytest.mark.parametrize(("source", "shown"), [
    ("builtin:shapes", "builtin:shapes"),
    ("SimianLuo/LCM_Dreamshaper_v7", "SimianLuo/LCM_Dreamshaper_v7"),
    ("/srv/models/dreamshaper", "dreamshaper"),
    ("/srv/models/dreamshaper/", "dreamshaper"),
    ("~/models/v1-5.safetensors", "v1-5.safetensors"),
    ("./models/x", "x"),
    ("C:\\models\\sd15", "sd15"),
    ("models/lora.safetensors", "lora.safetensors"),
])
def test_public_model_name(source, shown):
    assert public_model_name(source) == shown


def test_an_existing_relative_folder_is_a_path_not_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "models" / "mine").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert public_model_name("models/mine") == "mine"


def test_public_parameters_cover_loras_and_controlnets():
    out = public_parameters({"model": "/a/b/model", "controlnet": "/c/cn.safetensors", "prompt": "/not/a/source",
                             "loras": [{"source": "/d/style.safetensors", "scale": 0.8}]})
    assert out == {"model": "model", "controlnet": "cn.safetensors", "prompt": "/not/a/source",
                   "loras": [{"source": "style.safetensors", "scale": 0.8}]}


def test_rest_png_and_api_info_carry_no_server_path(tmp_path):
    folder = tmp_path / "secret-layout" / "my-model"
    folder.mkdir(parents=True)
    engine = FakeEngine(model=str(folder), notice=f"offline: using builtin:shapes instead of {folder}")
    with running_studio(engine) as (client, _, _):
        info = client.get("/api/info").json()
        assert info["model"] == "my-model" and str(tmp_path) not in str(info)
        response = client.post("/api/generate", json={"prompt": "a red circle", "num_inference_steps": 1})
        assert response.status_code == 200
        with Image.open(io.BytesIO(response.content)) as image:
            image.load()
            text = dict(image.text)
        assert text["model"] == "my-model"
        assert all(str(tmp_path) not in value for value in text.values())
