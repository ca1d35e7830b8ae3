"""`make builtin-model`: data -> VAE -> teacher -> distillation -> eval -> the LoRA family -> copy into the package.

Each stage writes its output under ``--work`` (default ``runs/builtin``) and is skipped when that output
exists (``--force`` redoes it), so an interrupted recipe resumes where it stopped (``<work>/recipe.json`` records
the settings: a folder made with other ones is refused unless ``--force``); the teacher and the
distillation also resume from their own checkpoints. Seeds are fixed: the same command reproduces the
shipped model (up to CPU floating-point nondeterminism). Wall time per stage is appended to
``<work>/times.json``.

    python -m lcm_live.training.recipe                # everything
    python -m lcm_live.training.recipe --stage vae    # one stage (vae, teacher, distill, eval, ship)

The LoRA family's stages (vae-decoder, lcm-lora, outline-teacher, outline-lora, lora-eval: ``lora_recipe.py``) run
on the teacher trained here; ``make builtin-lora`` runs them alone on the shipped teacher.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from lcm_live.training import lora_recipe

PACKAGE_BUILTIN = Path(__file__).resolve().parent.parent / "builtin"
LORA_STAGES = lora_recipe.STAGES  # vae-decoder, lcm-lora, outline-teacher, outline-lora, lora-eval
STAGES = ["vae", "teacher", "distill", "eval", *LORA_STAGES, "ship"]

# The shipped recipe's knobs (measured choices; see docs/builtin-model.md).
VAE_STEPS = 1500
TEACHER_STEPS = 10000
DISTILL_STEPS = 1500
TEACHER_POOL = 16384  # shapes images encoded once for the teacher
DISTILL_POOL = 4096
W_RANGE = (2.0, 12.0)  # w = guidance_scale - 1: covers the engine's default guidance 8.0


def knobs() -> dict:
    """The recipe's settings, written to ``<work>/recipe.json``: outputs made with others are not reused."""
    return {"vae_steps": VAE_STEPS, "teacher_steps": TEACHER_STEPS, "distill_steps": DISTILL_STEPS,
            "w_range": list(W_RANGE), "teacher_pool": TEACHER_POOL, "distill_pool": DISTILL_POOL}


def check_work_folder(work: Path, force: bool) -> str | None:
    """None when ``work`` may be used (new, or made by this recipe, or ``--force``); else why not."""
    path = work / "recipe.json"
    made = any(OUTPUTS[stage](work) is not None and OUTPUTS[stage](work).exists() for stage in STAGES)
    if force or not made:
        return None
    if not path.exists():
        return (f"--work {work}: holds outputs of an older recipe (no recipe.json); "
                "pass --force to redo them, or give a new --work folder")
    old = json.loads(path.read_text())
    if old != knobs():
        diff = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in knobs().items() if old.get(k) != v)
        return f"--work {work}: made with other settings ({diff}); pass --force to redo it, or give a new --work folder"
    return None


def _log(msg: str) -> None:
    print(msg, flush=True)


def _record_time(work: Path, stage: str, seconds: float, device: str) -> None:
    path = work / "times.json"
    times = json.loads(path.read_text()) if path.exists() else {}
    times[stage] = round(seconds, 1)
    times.setdefault("device", {})[stage] = device
    path.write_text(json.dumps(times, indent=2))


def stage_vae(work: Path, device: str) -> None:
    from lcm_live.training.vae import train_vae

    train_vae(work / "vae", steps=VAE_STEPS, bf16=False, device=device, log=_log)


def stage_teacher(work: Path, device: str) -> None:
    from lcm_live.training.teacher import train_teacher

    train_teacher(work / "teacher", vae_dir=work / "vae", steps=TEACHER_STEPS, batch_size=64, pool_size=TEACHER_POOL,
                  learning_rate=1e-3, check_every=2000, bf16=False, device=device, log=_log)


def stage_distill(work: Path, device: str) -> None:
    from lcm_live.training.distill import DistillConfig, distill

    distill(DistillConfig(teacher=str(work / "teacher" / "pipeline"), data="shapes",
                          output=str(work / "student"), max_train_steps=DISTILL_STEPS, batch_size=32,
                          learning_rate=3e-4, w_min=W_RANGE[0], w_max=W_RANGE[1], time_cond_proj_dim=64,
                          pool_size=DISTILL_POOL, checkpoint_every=250, resume=True, bf16=False, device=device), log=_log)


def stage_eval(work: Path, device: str) -> None:
    from lcm_live.training.eval import run_eval

    run_eval(str(work / "student"), teacher=str(work / "teacher" / "pipeline"),
             json_path=work / "eval.json", device=device, log=_log)


def lora_stage(stage: str):
    """A LoRA-family stage on the teacher trained here (the full LCM beside it in its eval)."""
    def run(work: Path, device: str) -> None:
        lora_recipe.run_stages(work, work / "teacher" / "pipeline", [stage], device=device, force=True, full_lcm=work / "student")
    return run


def stage_ship(work: Path, device: str) -> None:
    for src, name in ((work / "student", "shapes"), (work / "teacher" / "pipeline", "shapes-teacher")):
        dest = PACKAGE_BUILTIN / name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("checkpoint*", "*.json.tmp"))
        _log(f"shipped {src} -> {dest}")
    lora_recipe.ship(work, PACKAGE_BUILTIN, log=_log)


OUTPUTS = {
    "vae": lambda w: w / "vae" / "config.json",
    "teacher": lambda w: w / "teacher" / "pipeline" / "model_index.json",
    "distill": lambda w: w / "student" / "model_index.json",
    "eval": lambda w: w / "eval.json",
    **{stage: lora_recipe.OUTPUTS[stage] for stage in LORA_STAGES},
    "ship": lambda w: None,  # always copies
}
RUNNERS = {"vae": stage_vae, "teacher": stage_teacher, "distill": stage_distill, "eval": stage_eval,
           **{stage: lora_stage(stage) for stage in LORA_STAGES}, "ship": stage_ship}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lcm_live.training.recipe", description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/builtin", help="working folder (default: %(default)s)")
    parser.add_argument("--stage", choices=STAGES, action="append", help="run only these stages (repeatable)")
    parser.add_argument("--force", action="store_true", help="redo stages whose output exists")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch CPU threads (default: all cores, %(default)s here; on a machine shared with "
                             "other jobs use 1: a preempted thread stalls every op)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where to train (default: %(default)s; the recipe is sized for a 2-core CPU, and "
                             "cuda runs the same steps on a GPU in minutes)")
    args = parser.parse_args(argv)
    import torch

    from lcm_live.training.distill import check_device

    check_device(args.device)

    torch.set_num_threads(max(1, args.threads))
    work = Path(args.work)
    problem = check_work_folder(work, args.force)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.json").write_text(json.dumps(knobs(), indent=2))
    for stage in args.stage or STAGES:
        done = OUTPUTS[stage](work)
        if done is not None and done.exists() and not args.force:
            _log(f"== {stage}: output exists ({done}), skipped (--force redoes it)")
            continue
        _log(f"== {stage}")
        start = time.time()
        RUNNERS[stage](work, args.device)
        _record_time(work, stage, time.time() - start, args.device)
        _log(f"== {stage}: {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
