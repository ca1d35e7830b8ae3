"""`lcm-live eval --task lora`: LCM-LoRA's promise measured on the built-in family (issue 18).

Set-ups, each at 1, 2, 4 and 8 steps over the fixed, balanced 96 prompt/seed pairs (``shapes.eval_specs``):

1. ``base + LCM-LoRA``: the base teacher with the LCM-LoRA, LCMScheduler, guidance 1.0 (as LCM-LoRA runs);
2. ``fine-tune + LCM-LoRA``: the outline fine-tune with the same LCM-LoRA, unchanged (universality);
3. ``base + LCM-LoRA + outline LoRA``: both adapters stacked at weight 1.0 and fused, as ``--lora`` does;
4. ``fine-tune, DDIM`` and ``fine-tune, DPM-Solver++``: the fine-tune without the LCM-LoRA, CFG at guidance 8
   (``timestep_spacing="trailing"``, as in ``eval.py``): what a user gets at these step counts without it;
   ``fine-tune, DDIM, guidance 1``: the same without CFG, which this small model draws far better at 2-4 steps
   than guidance 8 does (so the fine-tune's best few-step DDIM, not only the teacher's setting);
5. ``full LCM``: ``builtin:shapes``, its own w-embedding at guidance 8, for comparison.

Rows with the fine-tune or the outline LoRA get the outlined captions (", outlined"); the others the plain
ones. The checker reads the outline on every row (``checker.read_image(outlined=True)``): an outlined caption
wants its ring, a plain one none. Floors (issue 18, at 4 steps) are reported in the output, never enforced
here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lcm_live.training.checker import score_images
from lcm_live.training.eval import STEP_COUNTS, _run, teacher_scheduler
from lcm_live.training.shapes import eval_specs, outline_visible

TEACHER_GUIDANCE = 8.0  # the teacher's and the full LCM's guidance_scale (the shipped LCM-LoRA bakes in w = 3)
GRID_PAIRS = (0, 37, 70)  # eval pairs shown in each cell of the sample grid (three shapes, six colours)

# (set-up, the measure, the least accuracy at 4 steps): issue 18's floors, reported beside the table
FLOORS = [
    ("base + LCM-LoRA", "color", 0.90), ("base + LCM-LoRA", "shape", 0.80),
    ("fine-tune + LCM-LoRA", "color", 0.85), ("fine-tune + LCM-LoRA", "shape", 0.75),
    ("fine-tune + LCM-LoRA", "outline", 0.80), ("base + LCM-LoRA + outline LoRA", "outline", 0.70),
]
MEASURES = ("color", "shape", "size", "background", "outline")


@dataclass(frozen=True)
class LoraModels:
    """Folders: the base teacher and its fine-tune (pipelines), the two LoRAs, the full LCM."""

    teacher: str
    lcm_lora: str
    outline_teacher: str
    outline_lora: str
    full_lcm: str | None = None  # None: that row is left out
    vae: str | None = None  # a VAE folder every set-up decodes with instead of its own (a recipe's new decoder)

    @classmethod
    def builtin(cls) -> LoraModels:
        from lcm_live.engine.sources import builtin_root
        from lcm_live.errors import UserError

        root = builtin_root()
        names = ("shapes-teacher", "shapes-lcm-lora", "shapes-outline-teacher", "shapes-outline-lora", "shapes")
        missing = [n for n in names if not (root / n).is_dir()]
        if missing:
            raise UserError(f"--task lora: builtin:{missing[0]} is not in this install ({root}); `make builtin-lora` "
                            "makes the LoRA family", field="task")
        return cls(*(str(root / n) for n in names))


def lcm_lora_pipeline(base: str, lcm_lora: str, style_lora: str | None = None):
    """``base`` (an SD folder) with the LCM-LoRA (and a style LoRA) stacked at 1.0 and fused, under
    LCMScheduler: the documented way to run an LCM-LoRA."""
    import torch
    from diffusers import LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32)
    pipe.load_lora_weights(lcm_lora, weight_name="pytorch_lora_weights.safetensors", adapter_name="lcm")
    names = ["lcm"]
    if style_lora:
        pipe.load_lora_weights(style_lora, weight_name="pytorch_lora_weights.safetensors", adapter_name="style")
        names.append("style")
    pipe.set_adapters(names, [1.0] * len(names))
    pipe.fuse_lora(adapter_names=names)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _setups(models: LoraModels):
    """(name, outlined captions, guidance_scale, loader, scheduler per row or None)."""
    import torch
    from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, StableDiffusionPipeline

    def with_vae(load):
        if models.vae is None:
            return load

        def loaded():
            pipe = load()
            pipe.vae = AutoencoderKL.from_pretrained(models.vae, torch_dtype=torch.float32)
            return pipe
        return loaded

    def plain(folder, cls):
        def load():
            pipe = cls.from_pretrained(folder, torch_dtype=torch.float32)
            pipe.set_progress_bar_config(disable=True)
            return pipe
        return load

    rows = [
        ("base + LCM-LoRA", False, 1.0, lambda: lcm_lora_pipeline(models.teacher, models.lcm_lora), None),
        ("fine-tune + LCM-LoRA", True, 1.0, lambda: lcm_lora_pipeline(models.outline_teacher, models.lcm_lora),
         None),
        ("base + LCM-LoRA + outline LoRA", True, 1.0,
         lambda: lcm_lora_pipeline(models.teacher, models.lcm_lora, models.outline_lora), None),
        ("fine-tune, DDIM", True, TEACHER_GUIDANCE, plain(models.outline_teacher, StableDiffusionPipeline), "ddim"),
        ("fine-tune, DDIM, guidance 1", True, 1.0, plain(models.outline_teacher, StableDiffusionPipeline), "ddim"),
        ("fine-tune, DPM-Solver++", True, TEACHER_GUIDANCE, plain(models.outline_teacher, StableDiffusionPipeline),
         "dpm++"),
    ]
    if models.full_lcm:
        rows.append(("full LCM", False, TEACHER_GUIDANCE, plain(models.full_lcm, LatentConsistencyModelPipeline),
                     None))
    return [(name, outlined, guidance, with_vae(load), solver) for name, outlined, guidance, load, solver in rows]


def run_lora_eval(models: LoraModels, *, steps: tuple[int, ...] = STEP_COUNTS, n: int = 96,
                  json_path: str | Path | None = None, grid_path: str | Path | None = None, seed: int = 0,
                  device: str = "cpu", log=print) -> dict:
    """Score every set-up at every step count; print the table and the floors; returns the results."""
    from tqdm import tqdm

    plain_specs = eval_specs(n_per_cell=-(-n // 96))[:n]
    outlined_specs = eval_specs(n_per_cell=-(-n // 96), outline=True)[:n]
    setups = _setups(models)
    rows, cells = [], {}
    bar = tqdm(total=len(setups) * len(steps), desc="eval lora", dynamic_ncols=True)
    for name, outlined, guidance, load, solver in setups:
        pipe = load().to(device)
        specs = outlined_specs if outlined else plain_specs
        for k in steps:
            start = time.time()
            if solver:
                pipe.scheduler = teacher_scheduler(solver)
            images = _run(pipe, [s.caption for s in specs], seed, num_inference_steps=k, guidance_scale=guidance)
            acc = score_images(images, specs, outlined=True)
            rows.append({"setup": name, "steps": k, "guidance_scale": guidance, "outlined_prompts": outlined,
                         **{a: round(v, 3) for a, v in acc.items()}, "seconds": round(time.time() - start, 1)})
            cells[name, k] = [images[i] for i in GRID_PAIRS if i < len(images)]
            bar.update(1)
        del pipe
    bar.close()
    result = {"pairs": n, "seed": seed, "outline_scored_on": sum(map(outline_visible, outlined_specs)),
              "models": dict(models.__dict__), "rows": rows, "floors": check_floors(rows)}
    log(format_lora_table(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    if grid_path:
        save_grid(cells, [s[0] for s in setups], steps, grid_path)
    return result


def check_floors(rows: list[dict]) -> list[dict]:
    """Issue 18's floors at 4 steps, and the fine-tune + LCM-LoRA against the fine-tune's own DDIM: at the
    teacher's guidance 8 (the issue's row) and, where measured, at guidance 1 (its best at 4 steps)."""
    at4 = {r["setup"]: r for r in rows if r["steps"] == 4}
    out = []
    for setup, measure, floor in FLOORS:
        if setup in at4:
            got = at4[setup][measure]
            out.append({"setup": setup, "measure": measure, "floor": floor, "measured": got, "met": got >= floor})
    lora = at4.get("fine-tune + LCM-LoRA")
    for baseline in ("fine-tune, DDIM", "fine-tune, DDIM, guidance 1"):
        ddim = at4.get(baseline)
        if lora and ddim:
            for m in MEASURES:
                # both at the maximum: nothing to beat; reported as a tie (not met: a tie is not a win)
                out.append({"setup": "fine-tune + LCM-LoRA", "measure": m, "floor": f"> {baseline} ({ddim[m]})",
                            "measured": lora[m], "met": lora[m] > ddim[m], "tie": lora[m] == ddim[m] == 1.0})
    return out


def format_lora_table(result: dict) -> str:
    lines = [f"eval --task lora: {result['pairs']} prompt/seed pairs (outline scored on "
             f"{result['outline_scored_on']} outlined captions whose ring can be seen)",
             "| set-up | steps | guidance | color | shape | size | background | outline |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['setup']} | {r['steps']} | {r['guidance_scale']:g} | "
                     + " | ".join(f"{r[m]:.3f}" for m in MEASURES) + " |")
    lines.append("floors at 4 steps (issue 18):")
    for f in result["floors"]:
        status = "met   " if f["met"] else "tied  " if f.get("tie") else "MISSED"
        lines.append(f"  {status} {f['setup']}: {f['measure']} {f['measured']:.3f} "
                     f"(floor {f['floor']})")
    return "\n".join(lines)


def save_grid(cells: dict, setups: list[str], steps: tuple[int, ...], path: str | Path, scale: int = 2) -> None:
    """A PNG: one row per set-up, one column per step count, each cell the ``GRID_PAIRS`` samples."""
    from PIL import Image, ImageDraw

    label_w, head_h, gap = 230, 22, 8
    cell = [np.concatenate(cells[s, k], axis=1) for s in setups for k in steps]
    ch, cw = cell[0].shape[0] * scale, cell[0].shape[1] * scale
    grid = Image.new("RGB", (label_w + len(steps) * (cw + gap), head_h + len(setups) * (ch + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for j, k in enumerate(steps):
        draw.text((label_w + j * (cw + gap) + cw // 2 - 20, 5), f"{k} step{'s' if k > 1 else ''}", fill="black")
    for i, s in enumerate(setups):
        y = head_h + i * (ch + gap)
        draw.text((6, y + ch // 2 - 6), s, fill="black")
        for j, k in enumerate(steps):
            tile = Image.fromarray(np.concatenate(cells[s, k], axis=1)).resize((cw, ch), Image.NEAREST)
            grid.paste(tile, (label_w + j * (cw + gap), y))
    grid.save(path)
