"""`lcm-live`: parses arguments, builds settings, calls one of the engine, studio, training or bench.

Each subcommand lives in its own module with ``add_parser(subparsers)`` and ``run(args) -> int``.
A :class:`~lcm_live.errors.UserError` becomes one ``error:`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lcm_live import __version__
from lcm_live.errors import UserError, broken_package_message

SUBCOMMANDS = ["generate", "upscale", "serve", "bench", "distill", "eval", "info"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lcm-live", description="Real-time image generation with Latent Consistency Models."
    )
    parser.add_argument("--version", action="version", version=f"lcm-live {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"lcm_live.cli.{name}")
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ImportError, RuntimeError, OSError) as exc:
        message = broken_package_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
