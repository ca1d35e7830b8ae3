"""Each client's requests carry a cache scope of their own (GenerationRequest.cache_scope: engine caches are never
shared between clients, so a frame's timing tells nothing of what another client typed or drew)."""

from __future__ import annotations

import pytest

from .conftest import next_final, params, receive, running_studio

pytestmark = pytest.mark.timeout(60)


def test_each_session_and_each_rest_request_has_its_own_scope():
    with running_studio(max_sessions=2) as (client, engine, _), \
            client.websocket_connect("/ws") as alice, client.websocket_connect("/ws") as bob:
        sessions = [receive(alice)["session"], receive(bob)["session"]]
        for ws, seed in ((alice, 1), (bob, 2), (alice, 3)):
            ws.send_text(params(prompt="the same prompt", seed=seed))
            next_final(ws)
        for _ in range(2):
            assert client.post("/api/generate", json={"prompt": "the same prompt"}).status_code == 200
    scopes = [request.cache_scope for request in engine.calls if request.prompt == "the same prompt"]
    assert scopes[:3] == [sessions[0], sessions[1], sessions[0]]  # a session keeps its scope from frame to frame
    rest = scopes[3:]
    assert len(rest) == 2 and len(set(rest)) == 2 and not set(rest) & set(sessions)
