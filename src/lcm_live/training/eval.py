"""`lcm-live eval`: the analytic checker over a fixed, balanced set of 96 prompt/seed pairs.

Rows: the LCM (its own LCMScheduler) at 1, 2, 4, 8 steps; beside it the teacher under DDIM and
DPM-Solver++ (``DPMSolverMultistepScheduler``) at the same step counts, with classifier-free guidance at
the same ``guidance_scale``. The teacher's solvers use ``timestep_spacing="trailing"`` so that even one
step starts from t=999 (SD's "leading" default starts 1-step sampling at t=1, which would be unfair).
Everything runs through the real diffusers pipelines, as a user would, in float32 (on the CPU by default).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from lcm_live.training.checker import score_images
from lcm_live.training.shapes import eval_specs

STEP_COUNTS = (1, 2, 4, 8)
DEFAULT_GUIDANCE = 8.0
CHUNK = 48  # images per pipeline call: bounds memory, keeps the progress bar moving


def _generators(seed: int, n: int):
    import torch

    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _run(pipe, prompts: list[str], seed: int, **kwargs) -> np.ndarray:
    """uint8 images (N, H, W, 3); image i always uses seed + i, whatever the chunking."""
    out = []
    for i in range(0, len(prompts), CHUNK):
        chunk = prompts[i:i + CHUNK]
        result = pipe(prompt=chunk, generator=_generators(seed + i, len(chunk)), output_type="np",
                      height=64, width=64, **kwargs)
        out.append((np.clip(result.images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def teacher_scheduler(solver: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing",
                  steps_offset=1)
    if solver == "ddim":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **common)
    if solver == "dpm++":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **common)
    raise ValueError(solver)


def sample_sd(unet, text_encoder, tokenizer, vae, prompts, *, steps: int, guidance: float, solver: str,
              seed: int = 0) -> np.ndarray:
    """The teacher through StableDiffusionPipeline with CFG."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=teacher_scheduler(solver), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return _run(pipe, prompts, seed, num_inference_steps=steps, guidance_scale=guidance)


def resolve_model(name: str) -> str:
    """``builtin:NAME`` -> the packaged folder (the engine's one resolution, engine/sources.py); else unchanged."""
    from lcm_live.engine.sources import BUILTIN_PREFIX, builtin_folder

    return str(builtin_folder(name[len(BUILTIN_PREFIX):])) if name.startswith(BUILTIN_PREFIX) else name


def load_lcm(model: str, base: str | None = None):
    """A LatentConsistencyModelPipeline from a full-LCM folder, or an LCM-LoRA folder
    (pytorch_lora_weights.safetensors) fused into ``base``, a plain SD folder, under LCMScheduler."""
    import torch
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline

    from lcm_live.errors import UserError

    folder = Path(model)
    if (folder / "model_index.json").exists():
        pipe = LatentConsistencyModelPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    elif (folder / "pytorch_lora_weights.safetensors").exists():
        if base is None:
            raise UserError(f"--model {model}: an LCM-LoRA; give its base model with --teacher", field="model")
        sd = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32)
        sd.load_lora_weights(str(folder), weight_name="pytorch_lora_weights.safetensors")
        sd.fuse_lora()
        # an LCM-LoRA has no w input: it runs in the SD pipeline with LCMScheduler (the documented way)
        sd.scheduler = LCMScheduler.from_config(sd.scheduler.config)
        pipe = sd
    else:
        raise UserError(f"--model {model}: neither a diffusers folder (model_index.json) nor an LCM-LoRA folder",
                        field="model")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_eval(model: str, *, teacher: str | None = None, guidance: float = DEFAULT_GUIDANCE,
             steps: tuple[int, ...] = STEP_COUNTS, n: int = 96, json_path: str | Path | None = None,
             seed: int = 0, device: str = "cpu", log=print, feature_reuse: int = 1,
             token_merging: float = 0.0, feature_reuse_across_steps: bool = False) -> dict:
    """Score the LCM ``model`` (and ``teacher``, if given) and print a table; returns the results.
    ``feature_reuse`` K / ``token_merging`` R: the LCM's UNet with those speed-ups (engine/feature_reuse.py,
    engine/tome.py; the teacher's rows stay exact), to measure their quality cost against a run without."""
    import torch
    from diffusers import StableDiffusionPipeline
    from tqdm import tqdm

    specs = eval_specs(n_per_cell=-(-n // 96))[:n]
    prompts = [s.caption for s in specs]
    lcm = load_lcm(model, base=teacher).to(device)
    if token_merging > 0:
        from lcm_live.engine.tome import apply_token_merging

        apply_token_merging(lcm.unet, token_merging)
    if feature_reuse > 1:  # a new prompt chunk refreshes; across steps: between the steps of each call
        from lcm_live.engine.feature_reuse import FeatureReuse, FeatureReuseUNet

        lcm.unet = FeatureReuseUNet(lcm.unet, FeatureReuse(feature_reuse, across_steps=feature_reuse_across_steps))
    # an LCM-LoRA bakes the teacher's guidance in (no w input): guidance 1.0, one UNet pass, as documented
    lcm_guidance = guidance if lcm.unet.config.get("time_cond_proj_dim") else 1.0
    jobs = [("LCM", k) for k in steps]
    tpipe = None
    if teacher:
        tpipe = StableDiffusionPipeline.from_pretrained(teacher, torch_dtype=torch.float32).to(device)
        tpipe.set_progress_bar_config(disable=True)
        jobs += [(solver, k) for solver in ("DDIM", "DPM-Solver++") for k in steps]
    rows = []
    for name, k in tqdm(jobs, desc="eval", dynamic_ncols=True):
        start = time.time()
        if name == "LCM":
            images = _run(lcm, prompts, seed, num_inference_steps=k, guidance_scale=lcm_guidance)
        else:
            tpipe.scheduler = teacher_scheduler("ddim" if name == "DDIM" else "dpm++")
            images = _run(tpipe, prompts, seed, num_inference_steps=k, guidance_scale=guidance)
        acc = score_images(images, specs)
        rows.append({"sampler": name, "steps": k, "guidance_scale": lcm_guidance if name == "LCM" else guidance,
                     **{a: round(v, 3) for a, v in acc.items()},
                     "seconds": round(time.time() - start, 1)})
    result = {"model": str(model), "teacher": teacher, "guidance_scale": guidance, "pairs": n, "seed": seed,
              "rows": rows, "feature_reuse": feature_reuse, "token_merging": token_merging,
              "feature_reuse_across_steps": feature_reuse_across_steps}
    log(format_table(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def format_table(result: dict) -> str:
    speedups = [f"{k} {result[k]}" for k, off in (("feature_reuse", 1), ("token_merging", 0.0),
                                                   ("feature_reuse_across_steps", False))
                if result.get(k, off) != off]
    lines = [f"eval: {result['pairs']} prompt/seed pairs, guidance_scale {result['guidance_scale']}"
             + (f" (LCM with {', '.join(speedups)})" if speedups else ""),
             "| sampler | steps | color | shape | size | background |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['color']:.3f} | {r['shape']:.3f} | "
                     f"{r['size']:.3f} | {r['background']:.3f} |")
    return "\n".join(lines)
