"""Every image carries its parameters: PNG text chunks, an optional JSON sidecar, and safe saving.

Chunks: ``parameters`` holds the whole dict as JSON (what :func:`read_png_parameters` reads back); each key also
gets its own chunk (strings as they are, other values as JSON) so that image viewers and ``exiftool`` show them.
Saving writes a temporary file in the target folder and renames it into place, so a failed run never leaves a
partial image; unique names under ``outputs/`` are claimed with a hard link, which fails if the name is taken.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lcm_live.errors import UserError

DEFAULT_OUTPUT_DIR = "outputs"


def png_info(parameters: dict[str, Any]) -> Any:
    """A ``PIL.PngImagePlugin.PngInfo`` with the ``parameters`` JSON chunk and one chunk per key (iTXt: UTF-8)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt("parameters", json.dumps(parameters, ensure_ascii=False, sort_keys=True))
    for key, value in parameters.items():
        if key == "parameters":
            continue
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        info.add_itxt(str(key), text)
    return info


def read_png_parameters(path: str | Path) -> dict[str, Any]:
    """The ``parameters`` chunk of a PNG written by lcm-live ({} when there is none)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        text = getattr(image, "text", {}).get("parameters")
    return json.loads(text) if text else {}


def sidecar_path(image_path: str | Path) -> Path:
    return Path(image_path).with_suffix(".json")


def read_sidecar(image_path: str | Path) -> dict[str, Any]:
    return json.loads(sidecar_path(image_path).read_text(encoding="utf-8"))


def check_output_path(path: str | Path) -> Path:
    """An explicit ``--output``: a .png whose folder exists (or can be made) and is not a folder itself."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".png":
        raise UserError(f"--output {str(path)!r}: give a .png file name (the parameters are stored in PNG text "
                        "chunks)", field="output")
    if path.is_dir():
        raise UserError(f"--output {str(path)!r} is a folder; give a file name such as {path / 'image.png'}",
                        field="output")
    return path


def numbered(path: Path, index: int, count: int) -> Path:
    """``out.png`` for one image; ``out-1.png``, ``out-2.png``, ... for several."""
    return path if count == 1 else path.with_name(f"{path.stem}-{index + 1}{path.suffix}")


def _write_atomic(target: Path, write: Callable[[Path], None], *, exclusive: bool) -> None:
    """Write through a temporary file in ``target``'s folder, then move it into place.

    ``exclusive``: never replace an existing file (FileExistsError instead): the name is claimed with a hard link.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        if exclusive:
            try:
                os.link(tmp, target)  # atomic, and fails if the name exists
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: best effort
                if target.exists():
                    raise FileExistsError(target) from None
                os.replace(tmp, target)
        else:
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def save_image(image: Any, path: str | Path, parameters: dict[str, Any], *, metadata: str = "none",
               exclusive: bool = False) -> Path:
    """Save one PNG with its parameters (and ``metadata="json"``: a sidecar next to it). Returns the path.

    If the sidecar cannot be written the image is removed again: both or neither.
    """
    path = Path(path)
    _write_atomic(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=png_info(parameters)), exclusive=exclusive)
    if metadata == "json":
        try:
            text = json.dumps(parameters, ensure_ascii=False, indent=2, sort_keys=True) + "\n"
            _write_atomic(sidecar_path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"), exclusive=False)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    return path


def save_unique(image: Any, parameters: dict[str, Any], *, directory: str | Path = DEFAULT_OUTPUT_DIR,
                metadata: str = "none", stem: str | None = None) -> Path:
    """Save under ``directory`` with a fresh name ``lcm-YYYYmmdd-HHMMSS-<seed>[-N].png``; never overwrites."""
    directory = Path(directory)
    stem = stem or f"lcm-{time.strftime('%Y%m%d-%H%M%S')}-{parameters.get('seed', 'x')}"
    for n in range(10_000):
        candidate = directory / (f"{stem}.png" if n == 0 else f"{stem}-{n + 1}.png")
        if candidate.exists() or (metadata == "json" and sidecar_path(candidate).exists()):
            continue
        try:
            return save_image(image, candidate, parameters, metadata=metadata, exclusive=True)
        except FileExistsError:
            continue  # another process took the name between the check and the link
    raise UserError(f"no free file name for {stem!r} in {directory}; pass --output PATH", field="output")


def save_images(images: list[Any], parameters: dict[str, Any], *, output: str | Path | None = None,
                directory: str | Path = DEFAULT_OUTPUT_DIR, metadata: str = "none") -> list[Path]:
    """Save a generation's images; with several, each records its ``image_index`` (0-based, in the batch)."""
    if metadata not in ("none", "json"):
        raise UserError(f"--metadata {metadata!r}: use none or json", field="metadata")
    target = check_output_path(output) if output is not None else None
    paths = []
    for i, image in enumerate(images):
        params = dict(parameters)
        if len(images) > 1:
            params["image_index"] = i
        if target is not None:
            paths.append(save_image(image, numbered(target, i, len(images)), params, metadata=metadata))
        else:
            paths.append(save_unique(image, params, directory=directory, metadata=metadata))
    return paths
