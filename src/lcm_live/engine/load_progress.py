"""Byte-level progress of a model load: the safetensors bytes read so far, per component, told to a listener.

A listener is set for the current thread (:func:`listening`: the studio's loader thread sets one around its factory
call); the loads on other threads never see it. While a listener is set, reads go through two wrappers:

- ``safetensors.torch.load_file`` (diffusers' UNet, VAE, ControlNet): read tensor by tensor through ``safe_open``
  (as safetensors' own ``load_file`` does), each tensor's bytes told as it is read;
- ``safe_open`` in ``transformers.modeling_utils`` (the text encoders): a file's bytes told when transformers opens
  it (it reads the tensors just after, lazily).

``engine/loading.py`` announces the files it expects (:func:`expect`) before the pipeline loads, so the total is
known up front; a file read that was not announced adds to the total. Events: ``(component, bytes_read,
bytes_total)`` with ``component`` the file's folder name (``unet``, ``vae``, ``text_encoder``) or its stem.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

_local = threading.local()
_patch_lock = threading.Lock()
_patched = 0  # how many listeners are set across threads: the wrappers are installed while > 0
_originals: dict[str, Any] = {}


class ReadCounter:
    """Bytes read per component against the bytes expected (``total``); calls ``report(component, read, total)``."""

    def __init__(self, report: Callable[[str, int, int], None]):
        self.report = report
        self.expected: dict[str, int] = {}  # path -> size
        self.read: dict[str, int] = {}  # path -> bytes read of it

    @property
    def total(self) -> int:
        return sum(self.expected.values())

    @property
    def done(self) -> int:
        return sum(self.read.values())

    def expect(self, files: Iterable[Path]) -> None:
        for path in files:
            self.expected.setdefault(str(path), Path(path).stat().st_size)

    def add(self, path: str, nbytes: int) -> None:
        path = str(path)
        if path not in self.expected:
            self.expected[path] = Path(path).stat().st_size
        self.read[path] = min(self.read.get(path, 0) + nbytes, self.expected[path])
        self.report(component_of(path), self.done, self.total)

    def finish(self, path: str) -> None:
        """The whole file is read: its header and padding count too, so a load ends at exactly the total."""
        self.add(path, self.expected.get(str(path), 0) - self.read.get(str(path), 0))


def component_of(path: str) -> str:
    p = Path(path)
    return p.parent.name if p.parent.name else p.stem


def current() -> ReadCounter | None:
    return getattr(_local, "counter", None)


def expect(files: Iterable[Path]) -> None:
    """The safetensors files the load on this thread is about to read (nothing when no listener is set)."""
    counter = current()
    if counter is not None:
        counter.expect(files)
        with _patch_lock:  # the load imports transformers now anyway: its reads are counted from here on
            if _patched and "safe_open" not in _originals:
                _install_transformers()


def pipeline_files(folder: Path) -> list[Path]:
    """The non-variant safetensors weights of a diffusers folder's components (``unet/diffusion_pytorch_model
    .safetensors``, sharded ``-00001-of-00002`` ones too; not ``.fp16.`` variants: the loader does not read them)."""
    return sorted(p for p in Path(folder).glob("*/*.safetensors") if "." not in p.stem)


@contextlib.contextmanager
def listening(report: Callable[[str, int, int], None]) -> Iterator[ReadCounter]:
    """Count this thread's safetensors reads meanwhile; ``report(component, bytes_read, bytes_total)``."""
    global _patched
    counter = ReadCounter(report)
    _local.counter = counter
    with _patch_lock:
        if _patched == 0:
            _install()
        _patched += 1
    try:
        yield counter
    finally:
        _local.counter = None
        with _patch_lock:
            _patched -= 1
            if _patched == 0:
                _uninstall()


def _install() -> None:
    import safetensors
    import safetensors.torch

    _originals["load_file"] = safetensors.torch.load_file
    safetensors.torch.load_file = _load_file
    if "transformers.modeling_utils" in sys.modules:  # else on expect(): importing it takes seconds
        _install_transformers()


def _install_transformers() -> None:
    try:
        import transformers.modeling_utils as tmu
    except ImportError:  # transformers is a dependency; a broken install still loads diffusers' parts
        return
    _originals["safe_open"] = tmu.safe_open
    tmu.safe_open = _safe_open


def _uninstall() -> None:
    import safetensors.torch

    safetensors.torch.load_file = _originals.pop("load_file")
    if "safe_open" in _originals:
        import transformers.modeling_utils as tmu

        tmu.safe_open = _originals.pop("safe_open")


def _load_file(filename: Any, device: Any = "cpu", **kwargs: Any) -> dict[str, Any]:
    counter = current()
    if counter is None:  # another thread's load while this one listens
        return _originals["load_file"](filename, device=device, **kwargs)
    from safetensors import safe_open

    # Copied from safetensors.torch.load_file (0.8, there one get_tensors() call): tensor by tensor, each counted.
    result = {}
    with safe_open(filename, framework="pt", device=device, **kwargs) as f:
        for k in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
            tensor = f.get_tensor(k)
            result[k] = tensor
            counter.add(str(filename), tensor.numel() * tensor.element_size())
    counter.finish(str(filename))
    return result


def _safe_open(filename: Any, *args: Any, **kwargs: Any) -> Any:
    handle = _originals["safe_open"](filename, *args, **kwargs)
    counter = current()
    if counter is not None:
        counter.finish(str(filename))
    return handle
