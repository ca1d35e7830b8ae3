"""Client JSON is bounded before it is parsed (issue: "[" * 1000 killed the session with a RecursionError)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcm_live.studio.json_input import JsonRefused, loads_checked, nesting_depth

from .conftest import next_final, next_of, params, receive, running_studio

pytestmark = pytest.mark.timeout(60)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet=st.characters(codec="utf-8"), max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=20,
)


def reference_depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max((reference_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((reference_depth(v) for v in value), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_depth_counts_brackets_outside_strings_only(value):
    text = json.dumps(value, ensure_ascii=False)
    assert nesting_depth(text.encode()) == reference_depth(value)


@pytest.mark.parametrize(("text", "depth"), [
    ('{"prompt": "[[[[[[[[[[[[ {{{{{{"}', 1),
    ('{"prompt": "a \\"[[[[[[[[[[[["}', 1),  # an escaped quote does not end the string
    ('{"prompt": "ends in a backslash \\\\"}[[', 2),  # an escaped backslash does not escape the quote
    ("[" * 1000, 1000),
])
def test_depth_of_tricky_texts(text, depth):
    assert nesting_depth(text.encode()) == depth


def test_deep_nesting_is_refused_before_parsing_without_recursion():
    with pytest.raises(JsonRefused) as info:
        loads_checked("[" * 100_000, max_bytes=1 << 20)
    assert "nests 100000 levels" in info.value.message and info.value.code == "invalid_params"
    with pytest.raises(JsonRefused, match="more than 10 values"):
        loads_checked(json.dumps(list(range(20))), max_bytes=1 << 20, max_values=10)
    with pytest.raises(JsonRefused) as info:
        loads_checked("x" * 2000, max_bytes=1000)
    assert info.value.code == "too_large"
    assert loads_checked('{"type": "params", "regions": [{"prompt": "a"}]}', max_bytes=1000)["regions"][0]


@pytest.mark.parametrize("payload", ["[" * 1000, "{\"a\":" * 1000, "[" * 200_000])
def test_nested_websocket_message_gets_an_error_and_keeps_the_session(payload):
    with running_studio() as (client, engine, state), client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(payload)
        error = next_of(ws, "error")
        assert error["code"] == "invalid_params" and "nests" in error["message"]
        ws.send_text(params(prompt="after the attack"))
        assert next_final(ws)["params"]["prompt"] == "after the attack"


def test_nested_rest_body_gets_the_json_error_shape():
    with running_studio() as (client, _, _):
        response = client.post("/api/generate", content="[" * 1000, headers={"content-type": "application/json"})
        assert response.status_code == 422
        body = response.json()
        assert body["type"] == "error" and body["code"] == "invalid_params" and "nests" in body["message"]


def test_unknown_field_names_are_not_echoed_in_full():
    huge = "f" * 1_900_000
    with running_studio(max_ws_text_bytes=4 << 20) as (client, _, _), client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(json.dumps({"type": "params", huge: 1}))
        error = next_of(ws, "error")
        assert error["code"] == "invalid_params" and "unknown field" in error["message"]
        assert len(error["message"]) < 300 and len(error["field"] or "") <= 60
