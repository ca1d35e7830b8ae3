"""One rule for every source flag: a source not on disk is a hub id when it reads exactly "org/name"."""

from __future__ import annotations

import pytest

from lcm_live.engine.sources import looks_like_path
from lcm_live.errors import first_line


@pytest.mark.parametrize("source", ["latent-consistency/lcm-lora-sdv1-5", "SimianLuo/LCM_Dreamshaper_v7",
                                    "madebyollin/taesd", "org/name.v2"])
def test_org_slash_name_is_a_hub_id(source):
    assert not looks_like_path(source)


@pytest.mark.parametrize("source", ["style", "./style", "/abs/lcm", "~/models/x", "a/b/c", "C:\\models\\x",
                                    "org/style.safetensors", "org/model.ckpt", "loras/style.SAFETENSORS", "org/"])
def test_anything_else_was_meant_as_a_path(source):
    assert looks_like_path(source)


def test_first_line_of_an_error():
    assert first_line(ValueError("bad header\nTraceback ...")) == "bad header"
    assert first_line(ValueError("x" * 300)) == "x" * 200 and first_line(ValueError("x" * 300), 10) == "x" * 10
    assert first_line(KeyError()) == "KeyError" and first_line(OSError("  \n")) == "OSError"
