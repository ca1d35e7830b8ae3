"""Grep the sources for what must never appear: unsafe deserialisation, remote code, unbounded queues (R8, R14)."""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
FORBIDDEN = {
    "torch.load(": re.compile(r"torch\.load\("),
    "pickle.load": re.compile(r"pickle\.loads?\("),
    "weights_only=False": re.compile(r"weights_only\s*=\s*False"),
    "trust_remote_code=True": re.compile(r"trust_remote_code\s*=\s*True"),
    "asyncio.Queue() without maxsize": re.compile(r"asyncio\.Queue\(\s*\)|asyncio\.Queue\(\s*maxsize\s*=\s*0\s*\)"),
}


def _python_files() -> list[Path]:
    files = sorted(SRC.rglob("*.py"))
    assert files, f"no sources under {SRC}"
    return files


def test_sources_have_no_unsafe_patterns():
    problems = []
    for path in _python_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            for name, pattern in FORBIDDEN.items():
                if pattern.search(code):
                    problems.append(f"{path.relative_to(SRC)}:{number}: {name}")
    assert problems == []


def test_the_grep_catches_what_it_should():
    samples = ["x = torch.load(f)", "pickle.loads(b)", "m(weights_only=False)", "trust_remote_code=True",
               "q = asyncio.Queue()"]
    for sample, pattern in zip(samples, FORBIDDEN.values(), strict=True):
        assert pattern.search(sample)
    assert not FORBIDDEN["asyncio.Queue() without maxsize"].search("asyncio.Queue(maxsize=1)")
