"""`lcm-live serve --model A --model B` and `--models models.toml`: the presets reach the settings and the studio's
registry; refusals are one line (server start mocked as in test_serve.py)."""

from __future__ import annotations

from lcm_live.cli import main


def test_several_models_are_presets_named_by_their_ids(fake_uvicorn, capsys):
    assert main(["serve", "--model", "builtin:shapes", "--model", "/srv/models/other", "--max-loaded-models", "3",
                 "--fake-engine", "{}"]) == 0
    studio = fake_uvicorn["config"].app.state.studio
    assert [p.name for p in studio.settings.models] == ["builtin:shapes", "other"]
    assert studio.settings.engine.model == "builtin:shapes" and studio.settings.studio.max_loaded_models == 3
    assert studio.models.names == ("builtin:shapes", "other") and not studio.models.implicit
    assert "models the page may pick: builtin:shapes, other" in capsys.readouterr().err


def test_one_model_keeps_the_single_model_server(fake_uvicorn):
    assert main(["serve", "--model", "builtin:shapes", "--fake-engine", "{}"]) == 0
    studio = fake_uvicorn["config"].app.state.studio
    assert studio.settings.models == [] and studio.models.implicit and studio.models.names == ("builtin:shapes",)


def test_models_file(fake_uvicorn, tmp_path):
    path = tmp_path / "models.toml"
    path.write_text('[models.fast]\nmodel = "builtin:shapes"\n[models.slow]\nmodel = "org/slow"\nwidth = 768\n')
    assert main(["serve", "--models", str(path), "--fake-engine", "{}"]) == 0
    studio = fake_uvicorn["config"].app.state.studio
    assert studio.models.names == ("fast", "slow") and studio.settings.engine.model == "builtin:shapes"


def test_refusals_are_one_line(fake_uvicorn, tmp_path, capsys):
    path = tmp_path / "models.toml"
    path.write_text('[models.a]\nmodel = "x"\nsteps = 4\n')
    assert main(["serve", "--models", str(path), "--fake-engine", "{}"]) == 2
    err = capsys.readouterr().err
    assert "preset 'a', key 'steps'" in err and "Traceback" not in err
    assert main(["serve", "--models", str(path), "--model", "x", "--fake-engine", "{}"]) == 2
    assert "--models FILE and --model go apart" in capsys.readouterr().err
    assert "ran" not in fake_uvicorn
