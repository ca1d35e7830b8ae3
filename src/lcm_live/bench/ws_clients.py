"""The WebSocket clients of the soak and scaling benchmarks (bench_ws.py): what they send and how they read.

``stats`` is bench_ws's ``Stats``: the clients add frames, latencies, errors and lost inputs to it.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import time
from typing import Any


def _canvas(rng: random.Random, size: int = 256) -> bytes:
    """A sketch-like canvas: white with a few random strokes, as WebP (what the page sends)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        points = [(rng.randrange(size), rng.randrange(size)) for _ in range(4)]
        draw.line(points, fill=tuple(rng.randrange(256) for _ in range(3)), width=rng.randrange(2, 12))
    buf = io.BytesIO()
    img.save(buf, format="WEBP", quality=85)
    return buf.getvalue()


def _bad_image(rng: random.Random) -> bytes:
    """Bytes a hostile or clumsy client sends as a canvas: garbage, a truncated PNG, a PNG whose header claims
    50000x50000 (a bomb), or a progressive JPEG with one scan repeated 2000 times (seconds to decode)."""
    from PIL import Image

    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 4096))
    buf = io.BytesIO()
    if kind == 1:
        Image.new("RGB", (64, 64), "white").save(buf, format="PNG")
        return buf.getvalue()[: rng.randrange(8, 60)]
    if kind == 2:
        import struct
        import zlib

        header = struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0)
        chunk = b"IHDR" + header
        return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(header)) + chunk
                + struct.pack(">I", zlib.crc32(chunk)) + b"\0" * 64)
    Image.new("RGB", (256, 256), (120, 130, 140)).save(buf, format="JPEG", progressive=True)
    data = buf.getvalue()
    first, end = data.index(b"\xff\xda"), data.rindex(b"\xff\xd9")
    second = data.find(b"\xff\xda", first + 2)
    return data[:end] + data[first:second] * 2000 + data[end:]


OVERSIZE = 2 * 1024 * 1024 + 1  # one byte past the studio's message limit: refused alone, the session stays


async def next_text(ws: Any, until: float, least: float = 0.05) -> dict[str, Any] | None:
    """The next JSON message (frames' image bytes skipped), or None when ``until`` (monotonic) passes first."""
    while True:
        try:
            raw = await asyncio.wait_for(ws.recv(), timeout=max(least, until - time.monotonic()))
        except asyncio.TimeoutError:
            return None
        if not isinstance(raw, bytes):
            return json.loads(raw)


async def _pipelined_client(idx: int, url: str, deadline: float, stats: Any, *, in_flight: int, steps: int,
                            size: int) -> None:
    """A client that keeps ``in_flight`` inputs unanswered (the page does with ``workers`` > 1): a frame answers
    its input and every older one; each input's latency is from its send to the first frame of it or newer."""
    from websockets.asyncio.client import connect

    async with connect(url, max_size=8 * 1024 * 1024, open_timeout=10) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if hello.get("type") != "hello":
            stats.rejected[hello.get("code", "?")] = stats.rejected.get(hello.get("code", "?"), 0) + 1
            return
        stats.served += 1
        sent: dict[int, float] = {}  # seed -> when sent, unanswered
        seed = idx * 10**6

        async def top_up() -> None:
            nonlocal seed
            while len(sent) < in_flight and time.monotonic() < deadline:
                seed += 1
                sent[seed] = time.monotonic()
                await ws.send(json.dumps({"type": "params", "prompt": f"pipelined {idx}", "seed": seed,
                                          "num_inference_steps": steps, "width": size, "height": size,
                                          "previews": False}))

        await top_up()
        while time.monotonic() < deadline or sent:
            msg = await next_text(ws, deadline + 10, least=0.1)
            if msg is None:
                break
            if msg["type"] == "error":
                stats.errors[msg["code"]] = stats.errors.get(msg["code"], 0) + 1
            if msg["type"] != "frame" or not msg["final"]:
                continue
            now = time.monotonic()
            stats.frames += 1
            stats.frames_by_client[idx] = stats.frames_by_client.get(idx, 0) + 1
            if msg["seed"] in sent:
                stats.latencies_s.append(now - sent[msg["seed"]])
                stats.overheads_s.append(max(0.0, now - sent[msg["seed"]] - msg["timings"]["generation_ms"] / 1000))
            for answered in [k for k in sent if k <= msg["seed"]]:
                del sent[answered]
            await top_up()


async def _last_input(ws, idx: int, seed: int, mode: str, steps: int, size: int, rng: random.Random,
                      stats: Any, timeout: float = 20.0) -> None:
    """Nothing is lost: a session's last input gets its frame. An engine fault on it (injected) is retried as a
    user would, by sending it again (the session forgets a failed input, so the same input runs anew)."""
    stats.last_inputs += 1
    message = json.dumps({"type": "params", "mode": mode, "prompt": f"last {idx}", "seed": seed,
                          "num_inference_steps": steps, "width": size, "height": size, "strength": 0.6})
    canvas = _canvas(rng, size) if mode == "img2img" else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await ws.send(message)
        if canvas is not None:
            await ws.send(canvas)
        while time.monotonic() < deadline:
            msg = await next_text(ws, deadline)
            if msg is None:
                break
            if msg["type"] == "frame" and msg["final"] and msg["seed"] == seed:
                return
            if msg["type"] == "error" and msg["code"] in ("engine_error", "oom", "timeout"):
                break  # this input failed in the engine: send it again
    stats.last_inputs_lost.append(f"client {idx} seed {seed}")


