"""The studio's reference image (layer i, the IP-Adapter's) and several ControlNets (net 0: the canvas; net k:
layer n+k), with per-net scale/start/end fields (studio/layers.py, studio/conditioning_params.py), on the real
engine with tiny nets and a tiny IP-Adapter."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lcm_live.config import EngineSettings, StudioSettings
from lcm_live.errors import UserError
from lcm_live.studio.layers import parse_layer_message
from lcm_live.studio.params import build_params_model, parse_params

from .conftest import next_final, params, receive, running_studio, wait_until


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _layer(code: bytes, index: int, data: bytes) -> bytes:
    return b"LCML" + code + bytes([index]) + b"\0\0" + data


def test_reference_and_control_layers_parse_and_bad_indexes_are_refused():
    assert parse_layer_message(_layer(b"i", 0, b"x")).key == "reference"
    assert parse_layer_message(_layer(b"n", 2, b"x")).key == "control:2"
    for data, needle in ((_layer(b"n", 0, b"x"), "net 0's image is the canvas"),
                         (_layer(b"n", 8, b"x"), "numbered 1 to 7"),
                         (_layer(b"i", 1, b"x"), "index 0")):
        with pytest.raises(UserError) as excinfo:
            parse_layer_message(data)
        assert needle in excinfo.value.message and excinfo.value.field == "layer"


def test_per_net_fields_are_lists_of_the_nets_count_and_reach_the_request():
    model = build_params_model(StudioSettings(), controlnet=2, ip_adapter=True)
    props = model.model_json_schema()["properties"]
    assert props["controlnet_conditioning_scale"]["minItems"] == props["control_guidance_end"]["maxItems"] == 2
    assert props["ip_adapter_scale"]["maximum"] == 2.0
    p = parse_params(model, {"mode": "control", "prompt": "x", "controlnet_conditioning_scale": [0.5, 1.5],
                             "control_guidance_end": [1.0, 0.5], "ip_adapter_scale": 0.4})
    canvas, other, ref = Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8), "white"), Image.new("RGB", (4, 4))
    request = p.to_request(canvas, reference=ref, control_images=[other])
    assert request.control_image == [canvas, other] and request.controlnet_conditioning_scale == [0.5, 1.5]
    assert request.control_guidance_end == [1.0, 0.5] and request.ip_adapter_image is ref
    assert request.ip_adapter_scale == 0.4
    assert p.to_request(canvas).control_image == [canvas, None]  # net 1 without its layer sits out
    for bad, field in (({"controlnet_conditioning_scale": [1.0]}, "controlnet_conditioning_scale"),
                       ({"control_guidance_start": [0.5, 0.0], "control_guidance_end": [0.5, 1.0]},
                        "control_guidance_end")):
        with pytest.raises(UserError) as excinfo:
            parse_params(model, {"mode": "control", "prompt": "x", **bad})
        assert excinfo.value.field.startswith(field), excinfo.value.message
    one = build_params_model(StudioSettings(), controlnet=True)
    assert one.model_json_schema()["properties"]["control_guidance_start"]["type"] == "number"
    assert "ip_adapter_scale" not in one.model_fields


@pytest.fixture(scope="module")
def engine(tiny_lcm_dir, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from lcm_live.bench.bench_conditioning import TINY_ENCODER, random_ip_adapter, save_ip_adapter
    from lcm_live.engine.pipeline import Engine
    from lcm_live.engine.tiny import save_tiny_controlnet

    folder = tmp_path_factory.mktemp("conditioning")
    unet = UNet2DConditionModel.from_pretrained(tiny_lcm_dir / "unet")
    nets = [str(save_tiny_controlnet(folder / f"cn{k}", unet, seed=k)) for k in range(2)]
    adapter = save_ip_adapter(folder / "ipa", *random_ip_adapter(unet, TINY_ENCODER))
    return Engine.from_settings(EngineSettings(model=str(tiny_lcm_dir), controlnet=nets, ip_adapter=str(adapter),
                                               device="cpu", dtype="float32"), progress=False)


@pytest.mark.timeout(240)
def test_a_session_with_a_reference_image_and_two_controlnets(engine):
    lines = Image.new("RGB", (128, 128), "white")
    ImageDraw.Draw(lines).line([(0, 0), (127, 127)], fill="black", width=6)
    with running_studio(engine, warmup_width=128, warmup_height=128) as (client, _, state), \
            client.websocket_connect("/ws") as ws:
        wait_until(lambda: state.worker.ready, timeout=120, what="ready")
        hello = receive(ws)
        assert hello["info"]["controlnets"] == ["cn0", "cn1"] and hello["info"]["ip_adapter"] == "ip-adapter.safetensors"
        assert hello["schema"]["properties"]["control_guidance_start"]["maxItems"] == 2
        encoded = engine.ip_embeddings.misses
        ws.send_bytes(_layer(b"i", 0, _png(Image.new("RGB", (40, 40), (200, 30, 30)))))
        ws.send_bytes(_layer(b"n", 1, _png(lines)))
        ws.send_text(params(mode="control", prompt="a red circle", seed=3, width=128, height=128,
                            num_inference_steps=2, control_guidance_end=[1.0, 0.5], ip_adapter_scale=0.8))
        ws.send_bytes(_png(lines))  # the canvas: net 0's image
        with_reference = next_final(ws)
        assert with_reference["type"] == "frame", with_reference
        assert with_reference["params"]["control_guidance_end"] == [1.0, 0.5]
        assert engine.ip_embeddings.misses == encoded + 1  # the reference image reached the engine
        # a reference image that cannot be read: one error naming the field; the session keeps its last good input
        ws.send_bytes(_layer(b"i", 0, b"\x89PNG\r\n\x1a\n not a png"))
        error = next_final(ws)
        assert error["type"] == "error" and error["field"] == "ip_adapter_image"
        ws.send_bytes(_layer(b"i", 0, b""))  # cleared: the next frame is without it
        without = next_final(ws)
        assert without["type"] == "frame"
        a, b = (np.asarray(Image.open(io.BytesIO(f["_bytes"])).convert("RGB"), dtype=np.float64)
                for f in (with_reference, without))
        assert np.abs(a - b).mean() > 0.5
        ws.send_bytes(_layer(b"n", 1, b""))  # net 1's layer cleared: it sits out, another frame
        assert next_final(ws)["type"] == "frame"


@pytest.mark.timeout(240)
def test_rest_takes_the_reference_image_and_the_other_controlnets_images(engine):
    """POST /api/generate takes layers i and n+k inline (ip_adapter_image, control_images), so the page's Save
    renders a frame made with them again; refusals name the field."""
    import base64

    lines = Image.new("RGB", (128, 128), "white")
    ImageDraw.Draw(lines).line([(0, 127), (127, 0)], fill="black", width=6)
    b64 = lambda image: base64.b64encode(_png(image)).decode()  # noqa: E731
    body = {"mode": "control", "prompt": "a red circle", "seed": 5, "width": 128, "height": 128,
            "num_inference_steps": 2, "ip_adapter_scale": 0.8, "image": b64(lines)}
    with running_studio(engine, warmup_width=128, warmup_height=128) as (client, _, state):
        wait_until(lambda: state.worker.ready, timeout=120, what="ready")
        encoded = engine.ip_embeddings.misses
        plain = client.post("/api/generate", json=body)
        both = client.post("/api/generate", json={**body, "ip_adapter_image": b64(Image.new("RGB", (40, 40), "red")),
                                                  "control_images": [b64(lines.rotate(90))]})
        assert plain.status_code == both.status_code == 200, (plain.text, both.text)
        assert engine.ip_embeddings.misses == encoded + 1  # the reference image reached the engine
        a, b = (np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=np.float64) for r in (plain, both))
        assert np.abs(a - b).mean() > 0.5
        for extra, field in [({"control_images": [b64(lines), b64(lines)]}, "control_images"),
                             ({"control_images": "not a list"}, "control_images"),
                             ({"control_images": [b64(lines)], "mode": "txt2img", "image": None}, "control_images"),
                             ({"ip_adapter_image": "%%%"}, "ip_adapter_image"),
                             ({"control_images": ["aGVsbG8="]}, "control_images.0")]:
            sent = {k: v for k, v in {**body, **extra}.items() if v is not None}
            refused = client.post("/api/generate", json=sent)
            assert refused.status_code == 422 and refused.json()["field"] == field, (extra, refused.text)
