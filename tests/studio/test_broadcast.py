"""Broadcast (studio/broadcast.py): which session's frames go out, the messages, the still route and its key, in
process with TestClient. The endless MJPEG stream is tested on a real server (test_broadcast_stream.py)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from .conftest import next_final, next_of, params, receive, running_studio

pytestmark = pytest.mark.timeout(60)

ON = json.dumps({"type": "broadcast", "on": True})
OFF = json.dumps({"type": "broadcast", "on": False})


def still(client, state):
    return client.get(state.broadcast.still_path)


def take(ws) -> dict:
    """After the hello: turn the broadcast on; its answer."""
    receive(ws)
    ws.send_text(ON)
    return next_of(ws, "broadcast")


def test_off_until_a_page_turns_it_on_then_its_final_frames_go_out(studio):
    client, _, state = studio
    res = still(client, state)
    assert res.status_code == 404 and res.json()["code"] == "no_frame"
    assert "Broadcast" in res.json()["message"]
    with client.websocket_connect("/ws") as ws:
        assert receive(ws)["broadcast"] is True
        ws.send_text(params(prompt="before", seed=1))
        next_final(ws)
        assert state.broadcast.frame is None  # nothing goes out before the page asks
        ws.send_text(ON)
        reply = next_of(ws, "broadcast")
        assert reply["on"] is True and reply["reason"] is None
        assert reply["url"] == f"/broadcast/{state.broadcast.key}.mjpeg"
        assert reply["still"] == f"/broadcast/{state.broadcast.key}.jpg"
        assert (reply["viewers"], reply["max_viewers"]) == (0, 4)
        ws.send_text(params(prompt="after", seed=2))
        frame = next_final(ws)
        res = still(client, state)
        assert res.status_code == 200 and res.headers["content-type"] == "image/jpeg"
        assert res.headers["cache-control"] == "no-store"
        assert res.content == frame["_bytes"]  # the WebSocket's own JPEG, not encoded again


def test_the_frame_on_screen_goes_out_when_the_page_turns_it_on(studio):
    client, _, state = studio
    with client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(params(prompt="already here", seed=3))
        frame = next_final(ws)
        ws.send_text(ON)
        next_of(ws, "broadcast")
        for _ in range(200):
            if state.broadcast.frame is not None:
                break
            ws.send_text(ON)  # a round trip: lets the publish task run
            next_of(ws, "broadcast")
        assert still(client, state).content == frame["_bytes"]


def test_broadcast_messages_are_not_inputs(studio):
    client, _, _ = studio
    with client.websocket_connect("/ws") as ws:
        take(ws)
        ws.send_text(params(prompt="x", seed=1))
        next_final(ws)
        # the page's pacing compares a status's inputs with the input messages it sent (params, canvases)
        assert next_of(ws, "status")["inputs"] == 1


def test_another_page_takes_it_and_the_first_is_told():
    with running_studio(max_sessions=2) as (client, _, state), \
            client.websocket_connect("/ws") as first, client.websocket_connect("/ws") as second:
        receive(first)
        receive(second)
        first.send_text(ON)
        assert next_of(first, "broadcast")["on"] is True
        second.send_text(ON)
        assert next_of(second, "broadcast")["on"] is True
        taken = next_of(first, "broadcast")
        assert taken["on"] is False and "another page" in taken["reason"]
        second.send_text(params(prompt="second", seed=5))
        kept = next_final(second)["_bytes"]
        first.send_text(params(prompt="first", seed=6))
        assert next_final(first)["_bytes"] != kept
        assert still(client, state).content == kept  # the first page's frames no longer go out


def test_off_clears_the_frame_and_a_disconnect_keeps_it(studio):
    client, _, state = studio
    with client.websocket_connect("/ws") as ws:
        take(ws)
        ws.send_text(params(prompt="x", seed=1))
        next_final(ws)
        assert still(client, state).status_code == 200
        ws.send_text(OFF)
        assert next_of(ws, "broadcast")["on"] is False
        assert still(client, state).status_code == 404
        ws.send_text(ON)
        next_of(ws, "broadcast")
        ws.send_text(params(prompt="y", seed=2))
        last = next_final(ws)["_bytes"]
    # the page went away (a reload, an idle timeout): nobody holds it, the last frame stays up
    assert state.broadcast.holder is None
    assert still(client, state).content == last


@pytest.mark.parametrize(("message", "field"), [
    ({"type": "broadcast"}, "on"),
    ({"type": "broadcast", "on": "yes"}, "on"),
    ({"type": "broadcast", "on": True, "url": "/etc"}, "url"),
    ({"type": "broadcast", "on": {"x" * 5000: None}}, "on"),
    ({"type": "broadcast", "on": True, "y" * 5000: 1}, "y" * 57 + "..."),
])
def test_a_bad_broadcast_message_is_refused_alone(studio, message, field):
    client, _, state = studio
    with client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(json.dumps(message))
        error = next_of(ws, "error")
        assert (error["code"], error["field"]) == ("invalid_params", field)
        assert "broadcast" in error["message"] and len(error["message"]) < 200  # what was sent, quoted short
        assert state.broadcast.holder is None
        ws.send_text(params(prompt="still here"))
        assert next_final(ws)["final"] is True


def test_webp_frames_are_broadcast_as_jpeg():
    with running_studio(frame_format="webp") as (client, _, state), client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(ON)
        next_of(ws, "broadcast")
        ws.send_text(params(prompt="x", width=256, height=320))
        assert next_final(ws)["_bytes"][:4] == b"RIFF"
        res = still(client, state)
        assert res.content[:3] == b"\xff\xd8\xff"
        assert Image.open(io.BytesIO(res.content)).size == (256, 320)


def test_a_server_with_no_viewers_allowed_does_not_broadcast():
    with running_studio(max_broadcast_viewers=0) as (client, _, state), client.websocket_connect("/ws") as ws:
        assert receive(ws)["broadcast"] is False  # the page disables its button
        ws.send_text(ON)
        error = next_of(ws, "error")
        assert error["code"] == "broadcast_off" and "MAX_BROADCAST_VIEWERS" in error["message"]
        assert state.broadcast.holder is None


def test_a_wrong_key_is_a_plain_404_and_the_token_is_not_needed():
    token = "t0k3n-for-tests-0123456789abcdefghijkl"
    with running_studio(token=token, broadcast_key="a-fixed-broadcast-key-0123") as (client, _, state):
        assert state.broadcast.key == "a-fixed-broadcast-key-0123"
        for path in ("/broadcast/wrong-key-0123456789.jpg", "/broadcast/wrong-key-0123456789.mjpeg",
                     "/broadcast/a-fixed-broadcast-key-012.jpg"):
            res = client.get(path)
            assert res.status_code == 404 and res.json()["code"] == "not_found", path
        res = client.get("/broadcast/a-fixed-broadcast-key-0123.jpg")  # no token: the key is enough
        assert res.status_code == 404 and res.json()["code"] == "no_frame"
        assert client.get("/readyz").status_code == 401  # and it opens nothing else


def test_a_random_key_each_start_unless_set():
    with running_studio() as (_, _, first), running_studio() as (_, _, second):
        assert first.broadcast.key != second.broadcast.key
        assert len(first.broadcast.key) >= 24


@pytest.mark.parametrize("key", ["short", "has spaces in it 0123456", "slash/in/the/key/0123456789"])
def test_a_bad_broadcast_key_setting_is_refused(key):
    from pydantic import ValidationError

    from lcm_live.config import StudioSettings

    with pytest.raises(ValidationError, match="broadcast_key"):
        StudioSettings(broadcast_key=key)


def test_head_on_the_stream_is_refused_and_holds_nothing(studio):
    client, _, state = studio
    assert client.head(state.broadcast.path).status_code == 405  # an endless body for HEAD would hold the socket
    assert state.broadcast.viewers == 0
