"""Importing ``spandrel`` where torchvision is missing or broken (its PyPI wheel built for another torch).

spandrel 0.4 imports its whole architecture registry on ``import spandrel``; two of its ~45 architectures import
torchvision at module level, and only for functions their forward pass calls: LaMa (inpainting: ``rotate``,
``InterpolationMode``) and RestoreFormer (face restoration: ``normalize``). No super-resolution architecture
(ESRGAN/RRDBNet, Real-ESRGAN Compact, SPAN, SwinIR, HAT, ...) touches torchvision. So where ``import torchvision``
fails, those three names are bound to stand-ins that raise ``TorchvisionMissing`` if ever called, only while
spandrel's modules are imported (``torchvision`` is not left in ``sys.modules``: other libraries still see it
absent), and a model of one of the two architectures is refused by name (``NEEDS_TORCHVISION``).
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from typing import Any

NEEDS_TORCHVISION = frozenset({"LaMa", "RestoreFormer"})  # spandrel architecture ids that call torchvision
_NAMES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


class TorchvisionMissing(RuntimeError):
    """A spandrel architecture called torchvision, which is not importable here."""


def torchvision_works() -> bool:
    """Whether ``import torchvision`` succeeds (a wheel built for another torch fails with errors of any kind)."""
    if "torchvision" in sys.modules and getattr(sys.modules["torchvision"], "__spec__", None) is not None:
        return True
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [n for n, m in sys.modules.items() if m is not None
                     and (n == "torchvision" or n.startswith("torchvision."))]:
            sys.modules.pop(name, None)  # a half-imported broken build
        return False
    return True


def _missing(name: str) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        raise TorchvisionMissing(f"torchvision.transforms.functional.{name} is needed by this model's architecture "
                                 "and torchvision is not importable here")
    return call


@contextlib.contextmanager
def _stand_ins() -> Iterator[None]:
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = types.SimpleNamespace(BILINEAR="bilinear", NEAREST="nearest")
    functional.rotate, functional.normalize = _missing("rotate"), _missing("normalize")
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional
    root = types.ModuleType("torchvision")
    root.transforms = transforms
    before = {name: sys.modules[name] for name in _NAMES if name in sys.modules}
    sys.modules.update(dict(zip(_NAMES, (root, transforms, functional), strict=True)))
    try:
        yield
    finally:
        for name in _NAMES:
            sys.modules.pop(name, None)
        sys.modules.update(before)  # as it was (a None entry blocks the import on purpose)


def import_spandrel() -> Any:
    """``spandrel``, imported with torchvision's stand-ins where torchvision does not import (see above)."""
    if "spandrel" in sys.modules or torchvision_works():
        import spandrel

        return spandrel
    with _stand_ins():
        import spandrel
    return spandrel
