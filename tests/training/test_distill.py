"""Latent consistency distillation on a micro teacher: the math matches diffusers, and the loss falls."""

import copy
import re

import pytest
import torch

from lcm_live.errors import UserError
from lcm_live.training import distill as D


def test_guidance_embedding_matches_the_lcm_pipeline():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 1.5, 7.0, 14.0])
    ours = D.guidance_scale_embedding(w, 32)
    theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=32)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_boundary_conditions_match_lcm_scheduler():
    from diffusers import LCMScheduler

    sched = LCMScheduler()
    for t in (0, 19, 259, 999):
        c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
        ours_skip, ours_out = D.boundary_scalings(torch.tensor([t]))
        assert abs(float(ours_skip) - c_skip) < 1e-6 and abs(float(ours_out) - c_out) < 1e-6
    c_skip, c_out = D.boundary_scalings(torch.tensor([0]))
    assert float(c_skip) == 1.0 and float(c_out) == 0.0


def _fixed_batch(pipe, b=4, seed=0):
    from lcm_live.training.text import tokenize

    g = torch.Generator().manual_seed(seed)
    h = pipe.unet.config.sample_size
    latents = torch.randn(b, 4, h, h, generator=g)
    noise = torch.randn(b, 4, h, h, generator=g)
    with torch.no_grad():
        cond = pipe.text_encoder(tokenize(pipe.tokenizer, ["a red circle"] * b)).last_hidden_state
        empty = pipe.text_encoder(tokenize(pipe.tokenizer, [""])).last_hidden_state
    t_start = torch.tensor([999, 499, 259, 19])[:b]
    w = torch.tensor([3.0, 5.0, 7.0, 9.0])[:b]
    return latents, noise, cond, empty, t_start, w


LR = {False: 3e-4, True: 1e-3}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_few_steps_lower_the_loss(tiny_sd_dir, lora):
    from peft import LoraConfig

    from lcm_live.training.teacher import noise_scheduler

    pipe = D.load_teacher(str(tiny_sd_dir))
    teacher = pipe.unet.eval().requires_grad_(False)
    alphas = noise_scheduler().alphas_cumprod.float()
    torch.manual_seed(0)
    if lora:
        student = copy.deepcopy(teacher)
        student.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=D.LORA_TARGETS))
        target, w_dim = None, None
        params = [p for p in student.parameters() if p.requires_grad]
        assert params and len(params) < len(list(student.parameters()))
    else:
        student = D.make_student(teacher, 16)
        assert float(student.time_embedding.cond_proj.weight.abs().sum()) == 0.0  # starts as the teacher
        target, w_dim = copy.deepcopy(student).requires_grad_(False), 16
        params = list(student.parameters())
    batch = _fixed_batch(pipe)
    opt = torch.optim.Adam(params, lr=LR[lora])
    losses = []
    for _ in range(12):
        loss = D.lcd_loss(student, target, teacher, *batch, alphas, skip=20, w_dim=w_dim, bf16=False)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_bad_settings_are_one_line_user_errors(tmp_path, tiny_sd_dir):
    with pytest.raises(UserError, match="--w-min"):
        D.distill(D.DistillConfig(teacher=str(tiny_sd_dir), output=str(tmp_path / "o"), w_min=5, w_max=2))
    with pytest.raises(UserError, match="--teacher"):
        D.distill(D.DistillConfig(teacher=str(tmp_path / "nope"), output=str(tmp_path / "o")))
    with pytest.raises(UserError, match="--max-train-steps"):
        D.distill(D.DistillConfig(teacher=str(tiny_sd_dir), output=str(tmp_path / "o"), max_train_steps=0))


def test_lora_exclude_leaves_those_modules_without_lora_layers(tiny_sd_dir):
    from peft import LoraConfig

    pipe = D.load_teacher(str(tiny_sd_dir))
    cfg = D.DistillConfig(teacher=str(tiny_sd_dir), output="unused", lora=True, lora_exclude=("up_blocks.1",))
    student = copy.deepcopy(pipe.unet)
    student.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=D.LORA_TARGETS,
                                   exclude_modules=D.lora_exclusions(student, cfg)))
    layers = D.lora_layers(student)
    assert layers and not any(k.startswith("up_blocks.1.") for k in layers)
    assert any(k.startswith("up_blocks.0.") for k in layers) and any(k.startswith("down_blocks.") for k in layers)
    # whole module names, not string prefixes: up_blocks.1 does not take up_blocks.10 with it
    pattern = re.compile(D.lora_exclusions(student, cfg))
    assert pattern.fullmatch("up_blocks.1.resnets.0.conv1") and pattern.fullmatch("up_blocks.1")
    assert not pattern.fullmatch("up_blocks.10.resnets.0.conv1") and not pattern.fullmatch("up_blocks.0.attentions.1")


def test_lora_exclude_names_a_module_and_needs_lora(tmp_path, tiny_sd_dir):
    with pytest.raises(UserError, match="--lora-exclude up_blocks.9: the UNet has no module"):
        D.distill(D.DistillConfig(teacher=str(tiny_sd_dir), output=str(tmp_path / "o"), lora=True,
                                  lora_exclude=("up_blocks.9",), max_train_steps=1, pool_size=4, batch_size=2))
    with pytest.raises(UserError, match="add --lora"):
        D.distill(D.DistillConfig(teacher=str(tiny_sd_dir), output=str(tmp_path / "o"), lora_exclude=("up_blocks.1",)))


def test_the_saved_config_carries_no_folder_of_the_build_machine(tmp_path, monkeypatch):
    from lcm_live.training.distill import _portable

    monkeypatch.chdir(tmp_path)
    inside = tmp_path / "models" / "teacher"
    config = _portable({"teacher": str(inside), "output": "runs/x", "data": "shapes", "device": "/elsewhere/dev"})
    assert config == {"teacher": "models/teacher", "output": "runs/x", "data": "shapes", "device": "/elsewhere/dev"}
