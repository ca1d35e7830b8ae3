"""`lcm-live distill` and `lcm-live eval` end to end on a micro teacher (seconds, CPU)."""

import json

from lcm_live.cli import main


def _distill(teacher, out, *extra):
    return main(["distill", "--teacher", str(teacher), "--output", str(out), "--batch-size", "2",
                 "--pool-size", "8", "--time-cond-proj-dim", "16", "--checkpoint-every", "1", *extra])


def test_distill_resume_and_eval_full(tmp_path, tiny_sd_dir, capsys):
    out = tmp_path / "lcm"
    assert _distill(tiny_sd_dir, out, "--max-train-steps", "1") == 0
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "LatentConsistencyModelPipeline"
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 1
    assert json.loads((out / "unet" / "config.json").read_text())["time_cond_proj_dim"] == 16
    assert not list(out.rglob("*.bin")) and list(out.rglob("*.safetensors"))
    # an existing output needs --resume; with it, training continues from the checkpoint
    assert _distill(tiny_sd_dir, out, "--max-train-steps", "2") == 2
    assert "--resume" in capsys.readouterr().err
    assert _distill(tiny_sd_dir, out, "--max-train-steps", "2", "--resume") == 0
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(out), "--teacher", str(tiny_sd_dir), "--steps", "1", "--pairs", "3",
                 "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    rows = result["rows"]
    assert result["seed"] == 0
    assert [(r["sampler"], r["steps"]) for r in rows] == [("LCM", 1), ("DDIM", 1), ("DPM-Solver++", 1)]
    assert all(0.0 <= r["color"] <= 1.0 for r in rows)
    assert "| LCM | 1 |" in capsys.readouterr().out


def test_distill_lora_and_eval(tmp_path, tiny_sd_dir):
    out = tmp_path / "lora"
    assert _distill(tiny_sd_dir, out, "--lora", "--lora-rank", "4", "--max-train-steps", "1") == 0
    assert (out / "pytorch_lora_weights.safetensors").exists()
    assert main(["eval", "--model", str(out), "--teacher", str(tiny_sd_dir), "--steps", "1", "--pairs", "2"]) == 0


def test_bad_flags_are_one_line_errors(tmp_path, tiny_sd_dir, capsys):
    assert main(["eval", "--model", str(tmp_path), "--steps", "1,x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --steps") and "Traceback" not in err
    assert main(["eval", "--model", str(tmp_path / "missing")]) == 2
    assert "error: --model" in capsys.readouterr().err
    assert _distill(tiny_sd_dir, tmp_path / "x", "--w-min", "9", "--w-max", "3") == 2
    assert "w_min <= w_max" in capsys.readouterr().err


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, tiny_sd_dir, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _distill(tiny_sd_dir, tmp_path / "x", "--device", "cuda") == 2
    assert main(["eval", "--model", str(tiny_sd_dir), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("--device cuda: torch sees no CUDA device") == 2 and "--device cpu" in err
    assert not (tmp_path / "x").exists()


def test_eval_seed_picks_held_out_seeds_and_is_refused_where_cases_are_fixed(monkeypatch, capsys):
    from lcm_live.training import eval as eval_model
    from lcm_live.training import eval_lora

    seen = {}
    monkeypatch.setattr(eval_lora.LoraModels, "builtin", classmethod(lambda cls: "the family"))
    monkeypatch.setattr(eval_lora, "run_lora_eval", lambda models, **kw: seen.update(kw, models=models))
    assert main(["eval", "--task", "lora", "--seed", "1000", "--steps", "4"]) == 0
    assert seen["models"] == "the family" and seen["seed"] == 1000 and seen["steps"] == (4,)
    monkeypatch.setattr(eval_model, "run_eval", lambda model, **kw: seen.update(kw, model=model))
    assert main(["eval", "--model", "builtin:shapes", "--seed", "7", "--steps", "1"]) == 0
    assert seen["seed"] == 7 and seen["model"].endswith("shapes")
    assert main(["eval", "--task", "inpaint", "--seed", "3"]) == 2
    assert "error: --seed 3: --task inpaint uses its fixed cases' seeds" in capsys.readouterr().err
    assert main(["eval", "--task", "lora", "--seed", "-1"]) == 2
    assert "error: --seed -1: must be 0 or more" in capsys.readouterr().err
