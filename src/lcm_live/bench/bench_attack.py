"""Another user's frame latency while attackers send images that are dear to decode (issue 13, item 4).

Starts ``lcm-live serve`` (FakeEngine, ``--step-latency`` per step) and one live WebSocket client that changes its
prompt after each frame, measuring input-to-frame latency: first alone (``baseline``), then while ``--attackers``
REST clients post, as fast as they are answered, a crafted progressive JPEG (one scan repeated to ``--flood-bytes``:
seconds of decoding before the fix) or a costly but valid image (``--payload valid``: a 1024x1024 noise JPEG of
10 scans). ``latency_ratio_p50`` compares the two phases.

    python -m lcm_live.bench.bench_attack --attackers 6 --seconds 10 --json out.json
    python -m lcm_live.bench.bench_attack --src /path/to/an/older/checkout/src   # the same run on other code
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from lcm_live.bench.local_http import free_port, http_get, stop_process

FRAME_WAIT_S = 30.0  # past the phase's end, how long the live client waits for its last frame


def scan_flood(nbytes: int, side: int = 1024) -> bytes:
    """A valid progressive JPEG of a flat image with its smallest scan repeated until the file is ``nbytes``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 130, 140)).save(buf, format="JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    starts, pos = [], data.index(b"\xff\xda")
    while pos >= 0:
        starts.append(pos)
        pos = data.find(b"\xff\xda", pos + 2)
    end = data.rindex(b"\xff\xd9")
    smallest = min((data[a:b] for a, b in zip(starts, [*starts[1:], end], strict=True)), key=len)
    return data[:end] + smallest * max(1, (nbytes - len(data)) // len(smallest)) + data[end:]


def valid_costly(side: int = 1024) -> bytes:
    """A progressive JPEG of noise: within every limit, the most a legitimate image costs to decode."""
    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="JPEG", progressive=True, quality=95)
    return buf.getvalue()


def _post(url: str, body: bytes) -> int:
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as res:
            res.read()
            return res.status
    except urllib.error.HTTPError as err:
        err.read()
        return err.code


async def _attacker(url: str, body: bytes, stop: asyncio.Event, statuses: dict[int, int]) -> None:
    while not stop.is_set():
        try:
            status = await asyncio.to_thread(_post, url, body)
        except OSError:
            status = 0
        statuses[status] = statuses.get(status, 0) + 1


async def _live_client(ws_url: str, seconds: float, steps: int) -> list[float]:
    from websockets.asyncio.client import connect

    latencies: list[float] = []
    async with connect(ws_url, max_size=8 << 20) as ws:
        json.loads(await ws.recv())  # hello
        deadline, n = time.monotonic() + seconds, 0
        while time.monotonic() < deadline:
            n += 1
            sent = time.monotonic()
            await ws.send(json.dumps({"type": "params", "prompt": f"live {n}", "seed": n, "width": 256, "height": 256,
                                      "num_inference_steps": steps, "previews": False}))
            while True:
                try:
                    raw = await asyncio.wait_for(ws.recv(), timeout=max(0.1, deadline + FRAME_WAIT_S - time.monotonic()))
                except asyncio.TimeoutError:  # no frame at all: counted as the time waited
                    latencies.append(time.monotonic() - sent)
                    return latencies
                if isinstance(raw, bytes):
                    continue
                msg = json.loads(raw)
                if msg["type"] == "frame" and msg["final"] and msg["seed"] == n:
                    latencies.append(time.monotonic() - sent)
                    break
                if msg["type"] == "error":
                    break
    return latencies


def _summary(latencies: list[float]) -> dict[str, Any]:
    ordered = sorted(latencies)
    pick = (lambda q: round(ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))] * 1000, 1)) if ordered \
        else (lambda q: None)
    return {"frames": len(ordered), "p50_ms": pick(0.5), "p95_ms": pick(0.95),
            "mean_ms": round(statistics.fmean(ordered) * 1000, 1) if ordered else None}


def run(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("LCM_LIVE_TOKEN", "LCM_LIVE_FAKE_ENGINE")}
    if args.src:
        env["PYTHONPATH"] = str(Path(args.src).resolve())
    fake = json.dumps({"step_latency_s": args.step_latency, "record_calls": False})
    cmd = [sys.executable, "-c", "import sys; from lcm_live.cli import main; sys.exit(main(sys.argv[1:]))",
           "serve", "--port", str(port), "--max-sessions", "2", "--fake-engine", fake]
    log = Path(tempfile.mkdtemp(prefix="bench_attack_")) / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    payload = scan_flood(args.flood_bytes) if args.payload == "flood" else valid_costly()
    body = json.dumps({"mode": "img2img", "prompt": "attack", "strength": 0.5, "num_inference_steps": 2,
                       "image": base64.b64encode(payload).decode()}).encode()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if http_get(base + "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve did not become ready: {log.read_text()[-2000:]}")
            time.sleep(0.2)

        async def main() -> tuple[list[float], list[float], dict[int, int]]:
            ws_url = f"ws://127.0.0.1:{port}/ws"
            baseline = await _live_client(ws_url, args.seconds, args.num_inference_steps)
            stop, statuses = asyncio.Event(), {}
            attackers = [asyncio.create_task(_attacker(base + "/api/generate", body, stop, statuses))
                         for _ in range(args.attackers)]
            await asyncio.sleep(1.0)  # the attack is under way
            attacked = await _live_client(ws_url, args.seconds, args.num_inference_steps)
            stop.set()
            await asyncio.gather(*attackers)
            return baseline, attacked, statuses

        baseline, attacked, statuses = asyncio.run(main())
    finally:
        stop_process(proc, timeout=30)  # a server stuck decoding does not even stop: killed then
    alone, under = _summary(baseline), _summary(attacked)
    ratio = (under["p50_ms"] / alone["p50_ms"]) if alone["p50_ms"] and under["p50_ms"] else None
    return {"payload": args.payload, "payload_bytes": len(payload), "attackers": args.attackers,
            "step_latency_s": args.step_latency, "num_inference_steps": args.num_inference_steps,
            "baseline": alone, "under_attack": under, "latency_ratio_p50": None if ratio is None else round(ratio, 2),
            "attack_statuses": {str(k): v for k, v in sorted(statuses.items())}, "src": args.src or "installed",
            "cpu_count": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lcm_live.bench.bench_attack", description=__doc__.split("\n\n")[0])
    p.add_argument("--attackers", type=int, default=6)
    p.add_argument("--seconds", type=float, default=10.0, help="each phase: alone, then under attack")
    p.add_argument("--payload", choices=["flood", "valid"], default="flood")
    p.add_argument("--flood-bytes", type=int, default=1_400_000)
    p.add_argument("--step-latency", type=float, default=0.025, help="FakeEngine seconds per step")
    p.add_argument("--num-inference-steps", type=int, default=2)
    p.add_argument("--src", default=None, help="run the server from this src/ folder (another checkout)")
    p.add_argument("--json", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
