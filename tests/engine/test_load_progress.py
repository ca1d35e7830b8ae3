"""Byte progress of a model load (engine/load_progress.py): a real tiny diffusers folder loaded through load_model
with a listener on this thread counts every safetensors byte of its components, rising; other threads' loads and
loads with no listener see nothing and the wrappers are gone afterwards."""

from __future__ import annotations

import threading

import safetensors.torch
import torch

from lcm_live.config import EngineSettings
from lcm_live.engine import load_progress
from lcm_live.engine.loading import load_model


def test_a_load_reports_each_components_bytes_rising_to_the_total(tiny_lcm_dir):
    events: list[tuple[str, int, int]] = []
    original = safetensors.torch.load_file
    with load_progress.listening(lambda *e: events.append(e)):
        load_model(EngineSettings(model=str(tiny_lcm_dir), lcm_lora="none"), progress=False)
    assert safetensors.torch.load_file is original  # unwrapped again
    files = load_progress.pipeline_files(tiny_lcm_dir)
    total = sum(p.stat().st_size for p in files)
    assert events and {c for c, _, _ in events} >= {"unet", "vae", "text_encoder"}
    assert all(t == total for _, _, t in events)  # the total known from the first event: announced up front
    done = [d for _, d, _ in events]
    assert done == sorted(done) and done[-1] == total
    assert len([c for c, _, _ in events if c == "unet"]) > 3  # tensor by tensor, not one jump per file


def test_other_threads_and_unlistened_loads_are_not_counted(tmp_path):
    path = tmp_path / "w" / "model.safetensors"
    path.parent.mkdir()
    safetensors.torch.save_file({"a": torch.zeros(64), "b": torch.ones(32)}, str(path))
    events: list[tuple[str, int, int]] = []
    other: list[dict] = []
    with load_progress.listening(lambda *e: events.append(e)):
        t = threading.Thread(target=lambda: other.append(safetensors.torch.load_file(str(path))))
        t.start()
        t.join()
        mine = safetensors.torch.load_file(str(path))
    assert events and events[-1] == ("w", path.stat().st_size, path.stat().st_size)  # only this thread's read
    assert [d for _, d, _ in events][:2] in ([256, 384], [128, 384])  # tensor by tensor, then the header
    assert torch.equal(mine["b"], other[0]["b"])  # both reads whole
    assert load_progress.current() is None
