"""`make builtin-model`'s work folder: outputs are reused only when the same recipe made them."""

import json

from lcm_live.training import recipe


def _made(work):
    (work / "vae").mkdir(parents=True)
    (work / "vae" / "config.json").write_text("{}")


def test_a_new_or_empty_folder_is_fine(tmp_path):
    assert recipe.check_work_folder(tmp_path / "new", force=False) is None
    assert recipe.check_work_folder(tmp_path, force=False) is None


def test_outputs_of_an_older_recipe_are_refused_unless_forced(tmp_path, capsys):
    _made(tmp_path)
    assert "no recipe.json" in recipe.check_work_folder(tmp_path, force=False)
    assert recipe.check_work_folder(tmp_path, force=True) is None
    assert recipe.main(["--work", str(tmp_path), "--stage", "vae"]) == 2  # refused before any training
    assert "--force" in capsys.readouterr().err


def test_other_settings_are_named(tmp_path, monkeypatch):
    _made(tmp_path)
    (tmp_path / "recipe.json").write_text(json.dumps(recipe.knobs()))
    assert recipe.check_work_folder(tmp_path, force=False) is None
    monkeypatch.setattr(recipe, "TEACHER_STEPS", recipe.TEACHER_STEPS + 1)
    problem = recipe.check_work_folder(tmp_path, force=False)
    assert f"teacher_steps {recipe.TEACHER_STEPS - 1} -> {recipe.TEACHER_STEPS}" in problem
