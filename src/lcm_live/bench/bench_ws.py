"""Soak and overhead benchmark of the studio over its real WebSocket (R15).

Starts ``lcm-live serve`` as a subprocess (FakeEngine with injected faults, or a real model), runs N
``websockets`` clients for D seconds with random disconnects, slow readers, bursts of param updates, malformed
messages and canvases, polls ``/healthz`` throughout, then scrapes ``/metrics`` and the server's RSS and log.

    python -m lcm_live.bench.bench_ws --engine fake --clients 16 --duration 60 --faults default --json out.json
    python -m lcm_live.bench.bench_ws --engine model --model builtin:shapes --clients 1 --duration 60 --faults none
    python -m lcm_live.bench.bench_ws --ray --replicas 2 --in-flight 2 --clients 1 --faults none --step-latency 0.25

With one client and no faults, ``studio_overhead_fraction`` is the studio's own share of each frame: client-seen
latency (params/canvas sent -> frame received) minus the engine's generation time, over that latency.
``fps_per_client`` gives each client's frames per second beside ``fps_total``; ``--max-batch-size`` sets the
studio's stream batching (frames of several sessions in one engine call; the default is the studio's own).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lcm_live.bench.local_http import free_port, http_get, stop_process
from lcm_live.bench.ws_clients import OVERSIZE, _bad_image, _canvas, _last_input, _pipelined_client, next_text

DOCUMENTED_ERROR_CODES = {"invalid_params", "invalid_image", "too_large", "oom", "engine_error", "timeout",
                          "internal_error", "capacity", "not_ready", "broadcast_off"}
DOCUMENTED_CLOSE_CODES = {1000, 1001, 1008, 1009, 1011, 1012, 1013}
UNHANDLED_MARKERS = ("Exception in ASGI application", "Task exception was never retrieved", "Exception in thread",
                     "unexpected error around job")
FAULTS = {
    "none": {},
    "default": {"error_rate": 0.05, "oom_rate": 0.01, "spike_rate": 0.02},
}


class Stats:
    def __init__(self) -> None:
        self.latencies_s: list[float] = []  # input sent -> its final frame received
        self.overheads_s: list[float] = []  # latency minus the engine's generation time
        self.frames = 0
        self.frames_by_client: dict[int, int] = {}
        self.errors: dict[str, int] = {}
        self.close_codes: dict[str, int] = {}
        self.served = 0
        self.rejected: dict[str, int] = {}
        self.undocumented: list[str] = []
        self.healthz_total = 0
        self.healthz_failed = 0
        self.last_inputs = 0  # sessions that ended by choice, each after a last input of its own
        self.last_inputs_lost: list[str] = []  # which of those never got their frame
        self.aborted = 0  # sessions ended by dropping the TCP connection mid-generation


async def _client(idx: int, url: str, deadline: float, stats: Stats, *, faults: bool, steps: int, size: int,
                  seed: int, mode: str) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    rng = random.Random(seed * 1000 + idx)
    slow_reader = faults and rng.random() < 0.2
    if mode == "mixed":
        mode = "img2img" if rng.random() < 0.5 else "txt2img"
    live = mode == "img2img" and not faults
    while time.monotonic() < deadline:
        sent_at: dict[int, float] = {}
        aborted_by_us = False
        try:
            async with connect(url, max_size=8 * 1024 * 1024, open_timeout=10) as ws:
                hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if hello.get("type") == "error":  # capacity / not ready: documented, then a close
                    stats.rejected[hello["code"]] = stats.rejected.get(hello["code"], 0) + 1
                    if hello["code"] not in DOCUMENTED_ERROR_CODES:
                        stats.undocumented.append(f"error code {hello['code']}")
                    await asyncio.sleep(0.5 + rng.random())
                    continue
                stats.served += 1
                session_end = min(deadline, time.monotonic() + (rng.uniform(2, 8) if faults else 1e9))
                counter = rng.randrange(2**31)

                # Live drawing (img2img, no faults): the params go once, then only a new canvas per frame, as the
                # page sends after each stroke; the clock starts when the canvas is sent.
                canvas_sent_at: list[float] = []
                params_sent: list[bool] = []

                async def send_input(ws=ws, sent_at=sent_at, canvas_sent_at=canvas_sent_at,
                                     params_sent=params_sent) -> None:
                    nonlocal counter
                    if live and params_sent:
                        data = _canvas(rng, size)  # client-side drawing and encoding: before the clock starts
                        canvas_sent_at[:] = [time.monotonic()]
                        await ws.send(data)
                        return
                    burst = rng.randrange(1, 6) if faults else 1
                    for _ in range(burst):
                        counter += 1
                        if faults and rng.random() < 0.02:
                            await ws.send(rng.choice(["{bad json", json.dumps({"type": "params", "steps": 99}),
                                                      json.dumps({"type": "nope"}), "[" * 5000]))
                            continue
                        if faults and rng.random() < 0.02:
                            await ws.send(_bad_image(rng))
                            continue
                        if faults and rng.random() < 0.005:
                            await ws.send(b"\0" * OVERSIZE)
                            continue
                        data = _canvas(rng, size) if mode == "img2img" else None
                        sent_at[counter % 2**32] = time.monotonic()
                        await ws.send(json.dumps({"type": "params", "mode": mode, "prompt": f"soak {idx}",
                                                  "seed": counter % 2**32, "num_inference_steps": steps,
                                                  "width": size, "height": size, "strength": 0.6}))
                        if data is not None:
                            await ws.send(data)
                        params_sent[:] = [True]

                await send_input()
                if faults and rng.random() < 0.15:  # gone mid-generation, without a closing handshake
                    await asyncio.sleep(rng.uniform(0, 0.1))
                    ws.transport.abort()
                    stats.aborted += 1
                    aborted_by_us = True
                    continue
                while time.monotonic() < session_end:
                    msg = await next_text(ws, session_end)
                    if msg is None:
                        break
                    if msg["type"] == "error":
                        stats.errors[msg["code"]] = stats.errors.get(msg["code"], 0) + 1
                        if msg["code"] not in DOCUMENTED_ERROR_CODES:
                            stats.undocumented.append(f"error code {msg['code']}")
                        await send_input()
                    elif msg["type"] == "frame" and msg["final"]:
                        stats.frames += 1
                        stats.frames_by_client[idx] = stats.frames_by_client.get(idx, 0) + 1
                        t_sent = canvas_sent_at.pop() if canvas_sent_at else sent_at.pop(msg["seed"], None)
                        if t_sent is not None:
                            latency = time.monotonic() - t_sent
                            stats.latencies_s.append(latency)
                            stats.overheads_s.append(max(0.0, latency - msg["timings"]["generation_ms"] / 1000))
                        if slow_reader:
                            await asyncio.sleep(rng.uniform(0.5, 2.0))
                        await send_input()
                if faults:
                    counter += 1
                    await _last_input(ws, idx, counter % 2**32, mode, steps, size, rng, stats)
        except InvalidStatus as exc:
            code = f"http {exc.response.status_code}"
            stats.rejected[code] = stats.rejected.get(code, 0) + 1
            await asyncio.sleep(0.5)
        except ConnectionClosed as exc:
            if aborted_by_us:  # the client's own abort (a fault it injected), not the server's doing
                continue
            code = exc.rcvd.code if exc.rcvd else 1006
            stats.close_codes[str(code)] = stats.close_codes.get(str(code), 0) + 1
            if code not in DOCUMENTED_CLOSE_CODES:
                stats.undocumented.append(f"close {code}")
        except (OSError, asyncio.TimeoutError) as exc:
            stats.undocumented.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.5)


async def _poll_health(base: str, deadline: float, stats: Stats) -> None:
    while time.monotonic() < deadline:
        stats.healthz_total += 1
        try:
            status, _ = await asyncio.to_thread(http_get, base + "/healthz")
        except OSError:
            status = 0
        if status != 200:
            stats.healthz_failed += 1
        await asyncio.sleep(0.25)


def _metrics(base: str) -> dict[str, float]:
    status, body = http_get(base + "/metrics")
    text = body.decode()
    out: dict[str, float] = {}
    for line in text.splitlines() if status == 200 else []:
        if line.startswith("lcm_live_") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import psutil

    port = free_port()
    base, url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/ws"
    cmd = [str(Path(sys.executable).with_name("lcm-live")), "serve", "--port", str(port),
           "--max-sessions", str(args.max_sessions)]
    if args.workers > 1:
        cmd += ["--devices", ",".join([args.worker_device] * args.workers)]
    if args.ray:  # the studio on Ray Serve: a local cluster started (and stopped) by serve
        cmd += ["--ray", "--replicas", str(args.replicas)]
        if args.cpus_per_replica is not None:
            cmd += ["--cpus-per-replica", str(args.cpus_per_replica)]
    if args.engine == "fake":
        fake = {"step_latency_s": args.step_latency, "record_calls": False, **FAULTS[args.faults]}
        cmd += ["--fake-engine", json.dumps(fake)]
    else:
        cmd += ["--model", args.model, "--device", args.device]
    log_path = Path(tempfile.mkdtemp(prefix="bench_ws_")) / "serve.log"
    env = {k: v for k, v in os.environ.items() if k not in ("LCM_LIVE_TOKEN", "LCM_LIVE_FAKE_ENGINE")}
    if args.max_batch_size is not None:
        env["LCM_LIVE_STUDIO__MAX_BATCH_SIZE"] = str(args.max_batch_size)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        ready_deadline = time.monotonic() + args.ready_timeout
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"serve exited {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                status, body = http_get(base + "/readyz")
                # with --ray: every replica up (the ingress is ready with the first)
                if status == 200 and (not args.ray or json.loads(body)["workers"]["ready"] == args.replicas):
                    break
            except OSError:
                pass
            if time.monotonic() > ready_deadline:
                raise SystemExit("serve did not become ready")
            time.sleep(0.2)
        server = psutil.Process(proc.pid)
        rss_start = server.memory_info().rss
        stats = Stats()

        async def main() -> None:
            deadline = time.monotonic() + args.duration
            if args.in_flight > 1 or args.pipelined:
                tasks = [_pipelined_client(i, url, deadline, stats, in_flight=args.in_flight,
                                           steps=args.num_inference_steps, size=args.size) for i in range(args.clients)]
            else:
                tasks = [_client(i, url, deadline, stats, faults=args.faults != "none",
                                 steps=args.num_inference_steps, size=args.size, seed=args.seed, mode=args.mode)
                         for i in range(args.clients)]
            await asyncio.gather(_poll_health(base, deadline, stats), *tasks)

        t0 = time.monotonic()
        asyncio.run(main())
        elapsed = time.monotonic() - t0
        rss_end = server.memory_info().rss
        metrics = _metrics(base)
    finally:
        stop_process(proc)
    log = log_path.read_text(errors="replace")
    # Serve's proxy logs "Task exception was never retrieved" when a WebSocket client closes mid-stream (a Ray bug:
    # ray-project/ray#64077); counted apart, since it is not the studio's
    proxy_lines = [line for line in log.splitlines() if "(ProxyActor" in line]
    ray_proxy_disconnect_errors = sum("async generator ignored GeneratorExit" in line for line in proxy_lines)
    own_log = "\n".join(line for line in log.splitlines() if "(ProxyActor" not in line) if args.ray else log
    unhandled = [m for m in UNHANDLED_MARKERS if m in own_log]
    # Only meaningful with one client: with several, the wait for other sessions' frames counts as overhead.
    fractions = [o / la for o, la in zip(stats.overheads_s, stats.latencies_s, strict=True) if la > 0]
    overhead = statistics.median(fractions) if fractions and args.clients == 1 else None
    result = {
        "engine": args.engine if args.engine == "fake" else args.model,
        "clients": args.clients, "duration_s": round(elapsed, 1), "faults": args.faults,
        "num_inference_steps": args.num_inference_steps, "size": args.size, "mode": args.mode,
        "frames": stats.frames, "fps_total": round(stats.frames / elapsed, 2),
        "fps_per_client": [round(stats.frames_by_client.get(i, 0) / elapsed, 2) for i in range(args.clients)],
        "max_batch_size": args.max_batch_size, "workers": args.workers, "in_flight": args.in_flight,
        "ray_replicas": args.replicas if args.ray else None, "cpus_per_replica": args.cpus_per_replica,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "latency_p50_ms": _ms(_pct(stats.latencies_s, 0.5)), "latency_p95_ms": _ms(_pct(stats.latencies_s, 0.95)),
        "studio_overhead_p50_ms": _ms(_pct(stats.overheads_s, 0.5)),
        "studio_overhead_fraction": None if overhead is None else round(overhead, 4),
        "sessions_served": stats.served, "rejected": stats.rejected, "errors": stats.errors,
        "last_inputs": stats.last_inputs, "last_inputs_lost": stats.last_inputs_lost[:20],
        "sessions_aborted": stats.aborted,
        "close_codes": stats.close_codes, "undocumented": stats.undocumented[:20],
        "healthz_total": stats.healthz_total, "healthz_failed": stats.healthz_failed,
        "rss_growth_mb": round((rss_end - rss_start) / 2**20, 1), "unhandled_in_log": unhandled,
        "ray_proxy_disconnect_errors": ray_proxy_disconnect_errors if args.ray else None,
        "server_exit_code": proc.returncode,
        "metrics": {k: v for k, v in metrics.items() if not k.split("{")[0].endswith(("_bucket", "_created"))},
        "cpu_count": os.cpu_count(),
    }
    result["passed"] = (stats.healthz_failed == 0 and not unhandled and not stats.undocumented
                        and result["rss_growth_mb"] < 50 and proc.returncode == 0 and stats.frames > 0
                        and not stats.last_inputs_lost)
    return result


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lcm_live.bench.bench_ws", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=["fake", "model"], default="fake")
    p.add_argument("--model", default="builtin:shapes", help="with --engine model: what `serve --model` loads")
    p.add_argument("--device", default="auto")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-sessions", type=int, default=8)
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="the studio's max_batch_size (default: its own, 1 on a CPU, max-sessions on a GPU)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds")
    p.add_argument("--faults", choices=sorted(FAULTS), default="default")
    p.add_argument("--step-latency", type=float, default=0.02, help="FakeEngine seconds per step")
    p.add_argument("--num-inference-steps", type=int, default=2)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--mode", choices=["mixed", "txt2img", "img2img"], default="mixed",
                   help="img2img sends a new canvas with every params message, like live drawing")
    p.add_argument("--workers", type=int, default=1, help="serve --devices with this many workers (studio/pool.py)")
    p.add_argument("--worker-device", default="cpu", help="the device of each worker (cpu, cuda:0, ...)")
    p.add_argument("--ray", action="store_true",
                   help="serve --ray: the studio on Ray Serve (a local cluster) with --replicas generator replicas")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: generator replicas")
    p.add_argument("--cpus-per-replica", type=float, default=None,
                   help="with --ray: CPUs (torch threads) per replica (default: serve's, the cores shared)")
    p.add_argument("--in-flight", type=int, default=1,
                   help="inputs each client keeps unanswered (the page keeps as many as the server has workers)")
    p.add_argument("--pipelined", action="store_true",
                   help="the pipelined client (txt2img, no previews) even with --in-flight 1: the same client at "
                        "every worker count (lcm-live bench --live --workers/--ray uses it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--json", default=None, help="write the result here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    print(f"passed: {result['passed']}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
