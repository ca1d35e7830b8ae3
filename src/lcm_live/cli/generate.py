"""`lcm-live generate` (placeholder until its issue lands: it says so and exits non-zero)."""

from __future__ import annotations

import argparse

from lcm_live.errors import UserError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="not built yet")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    raise UserError("'lcm-live generate' is not built yet")
