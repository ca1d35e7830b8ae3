"""`lcm-live eval --task inpaint|regions`: masks and region prompts on a shapes model, read back by the checker.

- **inpaint**: a 128x128 picture of one small shape in its top-left quadrant; the mask is the empty bottom-right
  quadrant (feather 4 px); the prompt asks for another shape, in another colour, on the same background. The
  checker reads the mask's quadrant (colour, shape, background), and every pixel farther than the feather band
  outside the mask must equal the input's (the largest difference is reported; the floor is 2 of 255).
- **regions**: a 128x64 picture, each 64x64 half a region with its own caption (a large shape, its colour and
  background differ between the halves), an empty base prompt. The checker reads each half.

Fixed, balanced cases (colours, shapes and backgrounds cycle; seed = case index), run through the engine as a user
would (``Engine.generate_batch``), at --device cpu float32 by default. Floors at 4 steps (issue 14): inpaint colour
>= 0.85, shape >= 0.70, outside difference <= 2; regions colour and background >= 0.85 in each half.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lcm_live.training.checker import read_image
from lcm_live.training.shapes import COLORS, PALETTE, SHAPES, ShapeSpec, caption_for, draw

FLOORS = {"inpaint": {"color": 0.85, "shape": 0.70, "outside_max_abs_diff": 2},
          "regions": {"left_color": 0.85, "left_background": 0.85, "right_color": 0.85, "right_background": 0.85}}
CANVAS, QUADRANT, FEATHER = 128, 64, 4  # inpaint: pixels
CHUNK = 8  # requests per generate_batch call


@dataclass(frozen=True)
class Case:
    prompt: str
    want: list[tuple[str, str, str]]  # (colour, shape, background) per area read back
    init: Any = None  # inpaint: the input picture
    masks: tuple[Any, ...] = ()  # inpaint: (mask,); regions: (left, right)
    prompts: tuple[str, ...] = ()  # regions: each mask's prompt


def _quadrant_mask(left: int, top: int, width: int, height: int, size: tuple[int, int]) -> Any:
    from PIL import Image

    mask = Image.new("L", size, 0)
    mask.paste(255, (left, top, left + width, top + height))
    return mask


def inpaint_cases(n: int) -> list[Case]:
    from PIL import Image

    mask = _quadrant_mask(CANVAS - QUADRANT, CANVAS - QUADRANT, QUADRANT, QUADRANT, (CANVAS, CANVAS))
    cases = []
    for i in range(n):
        color, shape, background = COLORS[i % 8], SHAPES[i % 3], COLORS[(i + 3) % 8]
        there = ShapeSpec("small", COLORS[(i + 5) % 8], SHAPES[(i + 1) % 3], background, 24, 8, 8)
        init = Image.new("RGB", (CANVAS, CANVAS), PALETTE[background])
        init.paste(Image.fromarray(draw([there])[0]), (0, 0))
        cases.append(Case(caption_for("small", color, shape, background), [(color, shape, background)], init,
                          (mask,)))
    return cases


def regions_cases(n: int) -> list[Case]:
    size = (2 * QUADRANT, QUADRANT)
    halves = (_quadrant_mask(0, 0, QUADRANT, QUADRANT, size), _quadrant_mask(QUADRANT, 0, QUADRANT, QUADRANT, size))
    cases = []
    for i in range(n):
        left = (COLORS[i % 8], SHAPES[i % 3], COLORS[(i + 2) % 8])
        right = (COLORS[(i + 5) % 8], SHAPES[(i + 1) % 3], COLORS[(i + 7) % 8])
        prompts = tuple(caption_for("large", c, s, b) for c, s, b in (left, right))
        cases.append(Case("", [left, right], masks=halves, prompts=prompts))
    return cases


def _requests(task: str, cases: list[Case], steps: int) -> list[Any]:
    from lcm_live.engine.request import GenerationRequest, Region

    if task == "inpaint":
        return [GenerationRequest(c.prompt, image=c.init, strength=1.0, mask_image=c.masks[0], mask_feather=FEATHER,
                                  num_inference_steps=steps, seed=i, width=CANVAS, height=CANVAS)
                for i, c in enumerate(cases)]
    return [GenerationRequest(c.prompt, regions=[Region(p, m) for p, m in zip(c.prompts, c.masks, strict=True)],
                              num_inference_steps=steps, seed=i, width=2 * QUADRANT, height=QUADRANT)
            for i, c in enumerate(cases)]


def score(task: str, cases: list[Case], images: list[Any]) -> dict[str, float]:
    """The accuracies (and, for inpaint, the largest change outside the mask's feather band) of one row."""
    from PIL import ImageFilter

    hits: dict[str, int] = {}
    worst = 0
    for case, image in zip(cases, images, strict=True):
        pixels = np.asarray(image).astype(np.int16)
        if task == "inpaint":
            areas = {"": pixels[CANVAS - QUADRANT:, CANVAS - QUADRANT:]}
            band = np.asarray(case.masks[0].filter(ImageFilter.MaxFilter(2 * FEATHER + 1))) > 0
            worst = max(worst, int(np.abs(pixels - np.asarray(case.init, np.int16))[~band].max()))
        else:
            areas = {"left_": pixels[:, :QUADRANT], "right_": pixels[:, QUADRANT:]}
        for (prefix, area), (color, shape, background) in zip(areas.items(), case.want, strict=True):
            reading = read_image(area)
            for key, ok in (("color", reading.color == color), ("shape", reading.shape == shape),
                            ("background", reading.background == background)):
                hits[prefix + key] = hits.get(prefix + key, 0) + int(ok)
    row: dict[str, float] = {key: count / len(cases) for key, count in hits.items()}
    if task == "inpaint":
        row["outside_max_abs_diff"] = worst
    return row


def floors_met(task: str, row: dict[str, float]) -> bool:
    return all(row[k] <= v if k.endswith("diff") else row[k] >= v for k, v in FLOORS[task].items())


def run_mask_eval(task: str, model: str, *, steps: tuple[int, ...], n: int, json_path: str | None = None,
                  device: str = "cpu", engine: Any = None) -> list[dict[str, Any]]:
    """One row per step count; printed as a table, written as JSON with ``json_path``."""
    if engine is None:
        from lcm_live.config import EngineSettings
        from lcm_live.engine.pipeline import Engine

        engine = Engine.from_settings(EngineSettings(model=model, device=device, dtype="float32", decoder="vae"),
                                      progress=False)
    cases = inpaint_cases(n) if task == "inpaint" else regions_cases(n)
    rows = []
    for count in steps:
        t0 = time.perf_counter()
        requests, images = _requests(task, cases, count), []
        for i in range(0, len(requests), CHUNK):
            for result in engine.generate_batch(requests[i:i + CHUNK]):
                if result.error is not None:
                    raise result.error
                images += result.images
        row = {"steps": count, **score(task, cases, images), "seconds": round(time.perf_counter() - t0, 2)}
        row["floors_met"] = floors_met(task, row) if count == 4 else None
        rows.append(row)
    _print(task, model, rows, n)
    if json_path:
        report = {"task": task, "model": model, "pairs": n, "device": device, "floors": FLOORS[task], "rows": rows}
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return rows


def _print(task: str, model: str, rows: list[dict[str, Any]], n: int) -> None:
    keys = [k for k in rows[0] if k not in ("steps", "seconds", "floors_met")]
    print(f"lcm-live eval --task {task} --model {model}: {n} cases")
    print("| steps | " + " | ".join(keys) + " | seconds |")
    print("|---" * (len(keys) + 2) + "|")
    for row in rows:
        cells = [f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in keys]
        print(f"| {row['steps']} | " + " | ".join(cells) + f" | {row['seconds']} |")
    at4 = [r for r in rows if r["steps"] == 4]
    if at4:
        print(f"floors at 4 steps ({FLOORS[task]}): {'met' if at4[0]['floors_met'] else 'NOT met'}")
