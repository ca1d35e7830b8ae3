"""JSON from clients, checked for shape before it is parsed.

``json.loads`` recurses once per nesting level: ``"[" * 100_000`` (100 KB) raises ``RecursionError``, which is not a
``ValueError`` and used to escape the handlers. A params message is a flat object with at most a few small
nested values (regions, blends), so the structure is bounded *before* parsing: the text's size, its nesting depth
(counted over the brackets outside strings, vectorised with numpy: a 2 MB message costs milliseconds) and, after
parsing, the number of values it holds. Every refusal is a ``UserError`` that names the limit and the fix.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from lcm_live.errors import UserError

MAX_DEPTH = 8  # {"regions": [{"prompt": ...}]} is depth 3; the params schema never needs more than 4
MAX_VALUES = 4096  # every value in the document, containers included


class JsonRefused(UserError):
    """Client JSON refused before or while parsing; ``code`` is the protocol's error code for it."""

    def __init__(self, message: str, code: str = "invalid_params"):
        super().__init__(message, field=None)
        self.code = code


_BRACKET = np.zeros(256, dtype=np.int8)
_BRACKET[[ord("["), ord("{")]] = 1
_BRACKET[[ord("]"), ord("}")]] = -1


def nesting_depth(raw: bytes) -> int:
    """The deepest bracket nesting of a JSON text, brackets inside strings excluded (an upper bound for text
    that is not JSON). Linear and vectorised: a quote opens or closes a string unless an odd run of backslashes
    precedes it (a regex over string literals would backtrack quadratically on ``"\\"\\"...``)."""
    if b"[" not in raw and b"{" not in raw:
        return 0
    arr = np.frombuffer(raw, dtype=np.uint8)
    steps = _BRACKET[arr]
    if b'"' in raw:
        idx = np.arange(arr.size)
        is_backslash = arr == ord("\\")
        last_other = np.maximum.accumulate(np.where(is_backslash, -1, idx))  # last non-backslash at or before i
        run_before = idx - 1 - np.concatenate(([-1], last_other[:-1]))  # backslashes right before i
        quote = (arr == ord('"')) & (run_before % 2 == 0)
        steps = np.where(np.cumsum(quote) % 2 == 1, 0, steps)  # inside a string (or on its opening quote)
    if not steps.any():
        return 0
    return int(np.cumsum(steps, dtype=np.int64).max())


def count_values(value: Any, limit: int) -> int:
    """How many values ``value`` holds (itself included), stopping early once past ``limit``."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        count += 1
        if count > limit:
            return count
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def loads_checked(text: str | bytes, *, max_bytes: int, what: str = "the message",
                  max_depth: int = MAX_DEPTH, max_values: int = MAX_VALUES) -> Any:
    """Parse client JSON within limits; raise ``JsonRefused`` (never ``RecursionError``/``ValueError``)."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if len(raw) > max_bytes:
        raise JsonRefused(f"{what} is {len(raw)} bytes of JSON: the limit is {max_bytes}; send only the params "
                          "(images go as binary messages, or as base64 \"image\" in REST)", code="too_large")
    # Fewer opening brackets than the limit cannot nest past it (a REST body is mostly base64: no brackets at all).
    depth = 0 if raw.count(b"[") + raw.count(b"{") <= max_depth else nesting_depth(raw)
    if depth > max_depth:
        raise JsonRefused(f"{what} nests {depth} levels deep: at most {max_depth} are allowed; send a flat "
                          "object of params")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError cannot happen within max_depth; kept as a last guard
        raise JsonRefused(f"{what} is not valid JSON: send an object of params") from None
    if count_values(data, max_values) > max_values:
        raise JsonRefused(f"{what} holds more than {max_values} values: send only the params")
    return data
