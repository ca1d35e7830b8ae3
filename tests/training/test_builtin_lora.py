"""The shipped LoRA family (issue 18): files, loading by name and by `auto`, and the floors on a fast subset
(the 96-pair table is in docs/builtin-model.md)."""

import json

import pytest
import torch
from lora_files import loaded_modules, lora_modules

from lcm_live.training.recipe import PACKAGE_BUILTIN

NAMES = ("shapes-teacher", "shapes-lcm-lora", "shapes-outline-teacher", "shapes-outline-lora")
needs_family = pytest.mark.skipif(
    not all((PACKAGE_BUILTIN / n).is_dir() for n in NAMES),
    reason="the LoRA family is not built in this checkout (`make builtin-lora` makes it)",
)


@needs_family
def test_shipped_files_are_safetensors_diffusers_and_small():
    files = [p for p in PACKAGE_BUILTIN.rglob("*") if p.is_file() and not p.is_symlink()]
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt") or "checkpoint" in f.parts]
    assert sum(f.stat().st_size for f in files) < 30 * 2**20  # every built-in together (links count once)
    ft = PACKAGE_BUILTIN / "shapes-outline-teacher"
    assert json.loads((ft / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    for part in ("text_encoder", "tokenizer", "vae"):
        assert (ft / part).is_symlink() and (ft / part).resolve() == (PACKAGE_BUILTIN / "shapes-teacher" / part)
    for lora in ("shapes-lcm-lora", "shapes-outline-lora"):
        assert [p.name for p in (PACKAGE_BUILTIN / lora).glob("*.safetensors")] == ["pytorch_lora_weights.safetensors"]


@needs_family
def test_every_layer_of_the_shipped_loras_loads():
    """load_lora_weights judges a file's key format by its first key: a file whose attention layers are named
    in diffusers' old form (``to_k.lora.down``) and convolutions in peft's (``conv1.lora_A``) loses its attention
    layers without an error (the first LoRA family did)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(PACKAGE_BUILTIN / "shapes-teacher", torch_dtype=torch.float32)
    for name in ("shapes-lcm-lora", "shapes-outline-lora"):
        pipe.load_lora_weights(str(PACKAGE_BUILTIN / name), adapter_name=name.replace("-", "_"))
        held = lora_modules(PACKAGE_BUILTIN / name / "pytorch_lora_weights.safetensors")
        assert any(".attn2.to_k" in m for m in held)
        assert loaded_modules(pipe.unet, name.replace("-", "_")) == held, name


@needs_family
def test_auto_and_builtin_names_load_the_lcm_lora():
    from lcm_live.config import EngineSettings, LoraSpec
    from lcm_live.engine.loading import load_model

    def load(model, **kw):
        return load_model(EngineSettings(model=model, **kw), device="cpu", dtype=torch.float32, progress=False)

    plain = load("builtin:shapes-teacher", lcm_lora="none").pipe.unet.state_dict()
    model = load("builtin:shapes-teacher", lcm_lora="auto")
    assert model.kind == "lcm-lora" and model.loras == [("builtin:shapes-lcm-lora", 1.0)]
    fused = model.pipe.unet.state_dict()
    assert any(not torch.equal(fused[k], plain[k]) for k in plain)  # the adapter is in the weights
    stacked = load("builtin:shapes-outline-teacher", lcm_lora="builtin:shapes-lcm-lora",
                   loras=[LoraSpec(source="builtin:shapes-outline-lora", scale=1.0)])
    assert stacked.loras == [("builtin:shapes-lcm-lora", 1.0), ("builtin:shapes-outline-lora", 1.0)]


def _scores(setup: str, steps: int = 4) -> dict:
    """One set-up of `eval --task lora` on 32 of the 96 pairs (every third: all 16 colour pairs, every shape x
    size cell; a stride of 4 would see only 4 colour pairs)."""
    from lcm_live.training.checker import score_images
    from lcm_live.training.eval import _run
    from lcm_live.training.eval_lora import LoraModels, _setups
    from lcm_live.training.shapes import eval_specs

    _, outlined, guidance, load, solver = next(s for s in _setups(LoraModels.builtin()) if s[0] == setup)
    pipe = load()
    if solver:
        from lcm_live.training.eval import teacher_scheduler

        pipe.scheduler = teacher_scheduler(solver)
    specs = eval_specs(outline=outlined)[::3]
    images = _run(pipe, [s.caption for s in specs], 0, num_inference_steps=steps, guidance_scale=guidance)
    return score_images(images, specs, outlined=True)


@needs_family
def test_base_with_the_lcm_lora_meets_its_floors_at_4_steps():
    acc = _scores("base + LCM-LoRA")
    assert acc["color"] >= 0.90 and acc["shape"] >= 0.80, acc


@needs_family
def test_the_unchanged_lcm_lora_works_on_the_fine_tune():
    acc = _scores("fine-tune + LCM-LoRA")
    assert acc["color"] >= 0.85 and acc["shape"] >= 0.75, acc
    ddim = _scores("fine-tune, DDIM")
    assert all(acc[m] > ddim[m] for m in ("color", "shape", "size", "background", "outline")), (acc, ddim)


# Issue 18's outline floors (96 pairs, 4 steps: 0.900 and 0.856 for the shipped family; docs/builtin-model.md).
@needs_family
def test_the_fine_tune_with_the_lcm_lora_draws_outlines():
    assert _scores("fine-tune + LCM-LoRA")["outline"] >= 0.80


@needs_family
def test_stacked_outline_lora_draws_outlines():
    assert _scores("base + LCM-LoRA + outline LoRA")["outline"] >= 0.70


def test_the_recipes_lcm_lora_knobs_fit_the_shipped_teacher():
    """The recipe's LoRA exclusions name modules of the real teacher (a typo would fail only at `make builtin-lora`)."""
    from diffusers import UNet2DConditionModel

    from lcm_live.engine.sources import builtin_root
    from lcm_live.training.distill import DistillConfig, lora_exclusions
    from lcm_live.training.lora_recipe import LCM_LORA

    unet = UNet2DConditionModel.from_pretrained(builtin_root() / "shapes-teacher" / "unet")
    cfg = DistillConfig(teacher="unused", output="unused", lora=True, **LCM_LORA)
    assert lora_exclusions(unet, cfg) and cfg.lora_exclude == ("up_blocks.2",)
