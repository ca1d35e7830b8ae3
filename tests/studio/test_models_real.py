"""Model presets on the real Engine: two tiny LCMs built in code, a switch between them over the WebSocket (progress
messages, readiness in GET /api/models, the other session's frames from its own model), and a style scale moved
from a request (the LoRA re-fused on torch, a runtime input on OpenVINO: the frame changes, and moving it back gives
the first frame again)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from lcm_live.config import EngineSettings, ModelPreset, Settings, StudioSettings, StylePreset
from lcm_live.studio.app import create_app, default_engine_factory

from .conftest import next_of, params, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def second_lcm(tmp_path_factory):
    from lcm_live.engine.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_lcm_b"), full_lcm=True, seed=1)


@pytest.fixture(scope="module")
def ink(tiny_lcm_dir, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from lcm_live.engine.tiny import save_tiny_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_lcm_dir / "unet")
    return save_tiny_lora(tmp_path_factory.mktemp("ink") / "ink.safetensors", unet, rank=2, seed=5, std=0.2)


def real_app(presets, backend="torch", openvino_cache_dir=None, **studio):
    settings = Settings(engine=EngineSettings(device="cpu", dtype="float32", backend=backend, decoder="vae",
                                              openvino_cache_dir=openvino_cache_dir),
                        studio=StudioSettings(allowed_hosts=["testserver"], default_previews=False,
                                              warmup_width=64, warmup_height=64, **studio),
                        models=presets)
    return create_app(settings, default_engine_factory(settings))


def difference(frame_a, frame_b) -> int:
    """The largest pixel difference between two frames (decoded JPEG)."""
    import io

    from PIL import Image, ImageChops

    a, b = (Image.open(io.BytesIO(f["_bytes"])).convert("RGB") for f in (frame_a, frame_b))
    return max(high for _, high in ImageChops.difference(a, b).getextrema())


def final_with_models(ws):
    seen = []
    while True:
        msg = next_of(ws, "model", "frame")
        if msg["type"] == "model":
            seen.append(msg)
        elif msg["final"]:
            return seen, msg


def test_switch_between_two_tiny_models_keeps_the_other_session_on_its_own(tiny_lcm_dir, second_lcm):
    presets = [ModelPreset(name="one", model=str(tiny_lcm_dir)), ModelPreset(name="two", model=str(second_lcm))]
    app = real_app(presets, max_sessions=2, max_loaded_models=2)
    frame = dict(prompt="a red circle", seed=3, width=64, height=64, num_inference_steps=2)
    with TestClient(app) as client:
        studio = app.state.studio
        wait_until(lambda: studio.worker.ready, timeout=120, what="the first tiny model")
        listed = client.get("/api/models").json()["models"]
        assert [(m["name"], m["loaded"], m["ready"]) for m in listed] == [("one", True, True), ("two", False, False)]
        with client.websocket_connect("/ws") as a, client.websocket_connect("/ws") as b:
            next_of(a, "hello"), next_of(b, "hello")
            a.send_text(params(**frame))
            _, first_one = final_with_models(a)
            a.send_text(params(**frame, model="two"))
            seen, first_two = final_with_models(a)
            reads = [m for m in seen if "bytes_read" in m]  # the safetensors bytes, between the stages
            assert [(m["state"], m["progress"]) for m in seen if m not in reads] == [
                ("loading", 0.0), ("loading", 0.9), ("ready", 1.0)]
            assert [m["progress"] for m in seen] == sorted(m["progress"] for m in seen)
            assert reads and reads[-1]["bytes_read"] == reads[-1]["bytes_total"] > 0
            assert {m["component"] for m in reads} <= {"unet", "vae", "text_encoder"} and reads[0]["progress"] > 0
            assert first_two["_bytes"] != first_one["_bytes"]  # another model's picture
            b.send_text(params(**frame))  # the other session: its model (the default), still loaded
            seen, other = final_with_models(b)
            assert seen == [] and other["_bytes"] == first_one["_bytes"]
            listed = client.get("/api/models").json()["models"]
            assert [(m["loaded"], m["ready"], m["family"]) for m in listed] == [(True, True, "lcm")] * 2
            a.send_text(params(**{**frame, "seed": 4}, model="one"))  # back: a loaded preset, no load
            seen, _ = final_with_models(a)
            assert [m["state"] for m in seen] == ["ready"]
            assert studio.worker.switcher.last_switch_s is not None


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_a_style_scale_from_the_request_moves_the_lora(tiny_lcm_dir, ink, backend, tmp_path):
    """torch re-fuses the weights; OpenVINO runs the style's branch graph with the scale as an input."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    styles = [StylePreset(name="ink", lora=str(ink), scale=0.2, min=0.0, max=1.5)]
    app = real_app([ModelPreset(name="inked", model=str(tiny_lcm_dir), styles=styles),
                    ModelPreset(name="plain", model=str(tiny_lcm_dir))], backend=backend, openvino_cache_dir=str(tmp_path))
    frame = dict(prompt="a red circle", seed=3, width=64, height=64, num_inference_steps=2, model="inked")
    with TestClient(app) as client:
        studio = app.state.studio
        wait_until(lambda: studio.worker.ready, timeout=120, what="the tiny model")
        if backend == "openvino":  # the sliders' graph is made with the load, not at the first move
            unet = studio.worker.switcher.engines["inked"].engine.pipe.unet
            assert unet.styles is not None and unet.conversions == 2
        with client.websocket_connect("/ws") as ws:
            next_of(ws, "hello")
            ws.send_text(params(**frame))
            _, at_default = final_with_models(ws)
            ws.send_text(params(**frame, lora_scales={"ink": 1.5}))
            _, strong = final_with_models(ws)
            ws.send_text(params(**frame, lora_scales={"ink": 0.2}))
            _, back = final_with_models(ws)
            ws.send_text(params(**frame, lora_scales={"ink": 2.0}))
            err = next_of(ws, "error")
    assert difference(strong, at_default) > 8
    assert difference(back, at_default) <= 2  # float32: the first weights (or the fused IR) again, to rounding
    if backend == "openvino":
        unet = studio.worker.switcher.engines["inked"].engine.pipe.unet
        assert unet.conversions == 2  # the fused UNet's IR and the branch graph's: none at the moves
    assert err["field"] == "lora_scales.ink" and "0..1.5" in err["message"]
