"""`lcm-live eval --task inpaint|regions` on the shipped builtin:shapes: the issue's floors on a fast subset."""

from __future__ import annotations

import json

import pytest

from lcm_live.engine.sources import builtin_root

needs_builtin = pytest.mark.skipif(not (builtin_root() / "shapes" / "model_index.json").exists(),
                                   reason="builtin:shapes not built in this checkout (`make builtin-model` makes it)")


@pytest.fixture(scope="module")
def engine():
    from lcm_live.config import EngineSettings
    from lcm_live.engine.pipeline import Engine

    return Engine.from_settings(EngineSettings(model="builtin:shapes", device="cpu", dtype="float32", decoder="vae"),
                                progress=False)


@needs_builtin
@pytest.mark.parametrize("task", ["inpaint", "regions"])
def test_the_floors_hold_at_4_steps_on_12_cases(engine, task, capsys):
    from lcm_live.training.eval_masks import FLOORS, run_mask_eval

    [row] = run_mask_eval(task, "builtin:shapes", steps=(4,), n=12, engine=engine)
    for key, floor in FLOORS[task].items():
        assert row[key] <= floor if key.endswith("diff") else row[key] >= floor, (key, row)
    assert row["floors_met"] is True and "floors at 4 steps" in capsys.readouterr().out


def test_the_checker_fails_a_picture_that_ignores_the_mask_and_the_regions():
    """The scoring itself: the init image returned unchanged has no new shape in the mask; one flat picture has
    no shape in either half."""
    from PIL import Image

    from lcm_live.training.eval_masks import floors_met, inpaint_cases, regions_cases, score

    cases = inpaint_cases(4)
    row = score("inpaint", cases, [c.init for c in cases])
    assert row["outside_max_abs_diff"] == 0 and row["color"] < 0.85 and not floors_met("inpaint", row)
    regions = regions_cases(4)
    flat = score("regions", regions, [Image.new("RGB", (128, 64), (128, 128, 128))] * 4)
    assert flat["left_color"] == flat["right_color"] == 0 and not floors_met("regions", flat)


@needs_builtin
def test_the_cli_writes_the_table_as_json(tmp_path, capsys):
    from lcm_live.cli import main

    out = tmp_path / "regions.json"
    assert main(["eval", "--task", "regions", "--steps", "1", "--pairs", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["task"] == "regions" and report["model"] == "builtin:shapes" and report["pairs"] == 2
    assert [r["steps"] for r in report["rows"]] == [1] and "| steps |" in capsys.readouterr().out
