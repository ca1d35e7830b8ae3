"""`lcm-live bench --live --workers R` and `--live --ray --replicas R`: the studio's scaling over its WebSocket.

Starts ``lcm-live serve`` with R local workers (``--devices``, studio/pool.py) or R Ray Serve replicas (``--ray``,
studio/ray_app.py), on the studio's FakeEngine at a fixed time a frame (``--fake-engine-seconds``: the figures show
the machinery, not this machine's cores) or a real model (``--model builtin:shapes``), and drives it with K
WebSocket clients (``--sessions``) through bench_ws.py's machinery: txt2img, no step previews, a new input for each
frame. One client keeps R inputs unanswered (as the page does with R workers: hello's "workers"); several clients
keep one each. Reports total and per-client frames/s,
p50/p95 latency (input sent to its frame), frames dropped, and the studio's overhead per frame (latency minus the
engine's generation time; one client only).
"""

from __future__ import annotations

import argparse
from typing import Any

from lcm_live.errors import UserError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: use a whole number >= 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: use seconds > 0, e.g. 0.5")
    return value


def add_arguments(group: Any) -> None:
    """The flags, in `bench`'s live group."""
    group.add_argument("--workers", type=_positive_int, default=None, metavar="R",
                       help="with --live: the studio with R local workers (serve --devices cpu x R), over its "
                            "WebSocket; with --fake-engine-seconds or --model")
    group.add_argument("--ray", action="store_true",
                       help="with --live: the studio on Ray Serve (a local cluster), --replicas generator replicas")
    group.add_argument("--replicas", type=_positive_int, default=None, metavar="R",
                       help="with --ray: generator replicas (default 1)")
    group.add_argument("--cpus-per-replica", type=float, default=None,
                       help="with --ray: CPUs per replica, and so its torch threads (default: serve's, 1)")
    group.add_argument("--fake-engine-seconds", type=_positive_float, default=None, metavar="S",
                       help="with --workers/--ray: the studio's FakeEngine at S seconds a frame (sleeping: the "
                            "machinery's figures, not the cores')")
    group.add_argument("--model", default=None,
                       help="with --workers/--ray: the model each worker loads, as `serve --model` (e.g. "
                            "builtin:shapes)")
    group.add_argument("--worker-device", default="cpu",
                       help="with --workers: each worker's device (cpu, cuda:0, ...; R of them)")


def requested(args: argparse.Namespace) -> bool:
    return bool(args.workers or args.ray or args.replicas or args.fake_engine_seconds or args.model)


def check(args: argparse.Namespace) -> None:
    """Refuse what does not go together, naming the flag and the fix (before a server starts)."""
    if not args.live:
        raise UserError("--workers, --ray, --replicas, --fake-engine-seconds and --model measure the studio over its "
                        "WebSocket: add --live", field="live")
    if args.workers and args.ray:
        raise UserError(f"--workers {args.workers} runs local workers; with --ray use --replicas {args.workers}",
                        field="workers")
    if (args.replicas or args.cpus_per_replica is not None) and not args.ray:
        raise UserError("--replicas and --cpus-per-replica go with --ray; for local workers use --workers R",
                        field="replicas")
    if (args.fake_engine_seconds is None) == (args.model is None):
        raise UserError("give the engine: --fake-engine-seconds S (the studio's FakeEngine, e.g. 0.5) or --model M "
                        "(e.g. builtin:shapes), one of them", field="fake_engine_seconds")
    if args.width and args.height and args.width != args.height:
        raise UserError(f"--width {args.width} --height {args.height}: the scaling bench draws squares; give one",
                        field="height")
    for flag, value in (("--controlnet", args.controlnet), ("--compile", args.compile),
                        ("--quantize", args.quantize != "none")):
        if value:
            raise UserError(f"{flag} is the in-process live bench's; the scaling bench runs `serve` as it is "
                            "configured (LCM_LIVE_* variables)", field=flag[2:])


def bench_ws_argv(args: argparse.Namespace) -> list[str]:
    """bench_ws.py's arguments for these flags."""
    replicas = args.replicas or 1
    workers = replicas if args.ray else (args.workers or 1)
    steps = args.num_inference_steps or 2
    argv = ["--clients", str(args.sessions), "--max-sessions", str(args.sessions), "--faults", "none",
            "--duration", str(args.seconds), "--num-inference-steps", str(steps),
            "--size", str(args.width or args.height or 256), "--mode", "txt2img",
            "--in-flight", str(workers if args.sessions == 1 else 1), "--pipelined"]
    if args.ray:
        argv += ["--ray", "--replicas", str(replicas)]
        if args.cpus_per_replica is not None:
            argv += ["--cpus-per-replica", str(args.cpus_per_replica)]
    else:
        argv += ["--workers", str(workers), "--worker-device", args.worker_device]
    if args.fake_engine_seconds is not None:
        argv += ["--engine", "fake", "--step-latency", repr(args.fake_engine_seconds / steps)]
    else:
        argv += ["--engine", "model", "--model", args.model, "--device", args.device]
    if args.batch_size is not None:
        argv += ["--max-batch-size", str(args.batch_size)]
    return argv


def run_scaling(args: argparse.Namespace) -> dict[str, Any]:
    from lcm_live.bench.bench_ws import build_parser, run

    report = run(build_parser().parse_args(bench_ws_argv(args)))
    report["frames_dropped"] = int(report["metrics"].get("lcm_live_frames_dropped_total", 0))
    report["fake_engine_seconds"] = args.fake_engine_seconds
    return report


def format_scaling(report: dict[str, Any]) -> str:
    where = (f"Ray Serve, {report['ray_replicas']} replica(s)" if report["ray_replicas"]
             else f"{report['workers']} local worker(s)")
    engine = (f"FakeEngine at {report['fake_engine_seconds']:g} s a frame" if report["fake_engine_seconds"]
              else report["engine"])
    per_client = ", ".join(f"{fps:.2f}" for fps in report["fps_per_client"])
    lines = [
        f"studio: {where}; engine: {engine}; {report['size']}x{report['size']}, "
        f"{report['num_inference_steps']} step(s); {report['clients']} client(s), {report['in_flight']} input(s) "
        f"in flight each; {report['duration_s']} s",
        f"frames: {report['frames']} ({report['frames_dropped']} dropped by the studio)",
        f"frames/s per client: {per_client}",
        f"latency p50 / p95: {report['latency_p50_ms']} / {report['latency_p95_ms']} ms",
        f"overhead per frame, p50: {report['studio_overhead_p50_ms']} ms (latency minus generation"
        + (")" if report["clients"] == 1 else "; with several clients it includes their waits)"),
        f"errors: {report['errors'] or 'none'}; passed: {report['passed']}" + _why_not(report),
        f"live_fps: {report['fps_total']}",
    ]
    return "\n".join(lines)


def _why_not(report: dict[str, Any]) -> str:
    """bench_ws's checks that failed (its soak's: a short run of a real model may grow past its RSS bound)."""
    failed = [what for what, ok in (
        (f"{report['healthz_failed']} failed /healthz", not report["healthz_failed"]),
        (f"unhandled in the log: {report['unhandled_in_log']}", not report["unhandled_in_log"]),
        (f"undocumented: {report['undocumented']}", not report["undocumented"]),
        (f"RSS grew {report['rss_growth_mb']} MB (bound 50)", report["rss_growth_mb"] < 50),
        (f"serve exited {report['server_exit_code']}", report["server_exit_code"] == 0),
        ("no frame", report["frames"] > 0),
        (f"last inputs lost: {report['last_inputs_lost']}", not report["last_inputs_lost"])) if not ok]
    return f" ({'; '.join(failed)})" if failed else ""
