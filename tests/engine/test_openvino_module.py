"""engine/openvino_module.py's cache writes: whole files only, and no temporary file shared by two writers."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import pytest
import torch

from lcm_live.engine.openvino_module import save_ir, save_weights_once

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed")


def test_two_writers_of_one_weights_file_never_share_a_temporary_file(tmp_path, monkeypatch):
    """The pool's workers share one IR cache: two processes converting the same shape at once must each write
    their own temporary file, then rename it (the last rename wins; a reader never sees half a file)."""
    import safetensors.torch

    seen: list[str] = []
    both_writing = threading.Barrier(2)
    real_save = safetensors.torch.save_file

    def save_file(tensors, filename, *args, **kwargs):
        seen.append(filename)
        both_writing.wait(timeout=10)  # both writers are inside save_file at once
        real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    target = tmp_path / "cache" / "weights.safetensors"
    module = torch.nn.Linear(3, 2)
    writers = [threading.Thread(target=save_weights_once, args=(module, target)) for _ in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=20)
    assert len(seen) == 2 and seen[0] != seen[1]
    assert safetensors.torch.load_file(target)["weight"].equal(module.weight.detach())
    assert sorted(p.name for p in target.parent.iterdir()) == ["weights.safetensors"]  # no temporary file left


@needs_openvino
def test_an_ir_is_saved_whole_and_a_failed_save_leaves_no_temporary_files(tmp_path, monkeypatch):
    import numpy as np
    import openvino as ov

    model = ov.convert_model(torch.nn.Linear(4, 2).eval(), example_input=torch.zeros(1, 4))
    path = tmp_path / "ir" / "linear.xml"
    save_ir(model, path, compress_to_fp16=False)
    assert sorted(p.name for p in path.parent.iterdir()) == ["linear.bin", "linear.xml"]
    compiled = ov.Core().compile_model(ov.Core().read_model(path), "CPU")
    assert np.asarray(compiled(np.zeros((1, 4), np.float32))[0]).shape == (1, 2)

    def broken(model, output, *args, **kwargs):
        Path(output).write_text("<half")  # a save that dies half way
        raise RuntimeError("disk full")

    monkeypatch.setattr(ov, "save_model", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_ir(model, tmp_path / "ir" / "other.xml", compress_to_fp16=False)
    assert sorted(p.name for p in path.parent.iterdir()) == ["linear.bin", "linear.xml"]
