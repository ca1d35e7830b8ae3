"""Token merging (engine/tome.py, tomesd): merging nothing is diffusers' own arithmetic bit for bit; merging R
of the tokens shortens only the highest-resolution self-attention, and changes the output a little."""

from __future__ import annotations

import pytest
import torch

from lcm_live.config import EngineSettings
from lcm_live.engine.speedups import apply_speedups
from lcm_live.engine.tome import apply_token_merging
from lcm_live.errors import UserError

pytest.importorskip("tomesd")


def unet_with_top_attention():
    """A tiny UNet whose highest resolution has attention (the tests' usual tiny UNet has none up there)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4).eval()


def run(unet):
    g = torch.Generator().manual_seed(1)
    x, ehs = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, 500, encoder_hidden_states=ehs, return_dict=False)[0]


def self_attention_tokens(unet):
    """The token counts the top down block's self-attention sees, recorded by a hook."""
    seen = []
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    attn.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    return seen


def test_merging_no_token_is_diffusers_arithmetic():
    reference = run(unet_with_top_attention())
    unet = unet_with_top_attention()
    assert apply_token_merging(unet, 0.001) == 4  # patched: top down 1, mid 1, top up 2; none merged (r = 0)
    assert type(unet.down_blocks[0].attentions[0].transformer_blocks[0]).__name__ == "ToMeBlock"
    assert torch.equal(run(unet), reference)


def test_merging_half_the_tokens_shortens_the_top_attention_only():
    reference = run(unet_with_top_attention())
    unet = unet_with_top_attention()
    apply_token_merging(unet, 0.5)
    seen = self_attention_tokens(unet)
    out = run(unet)
    assert seen == [128]  # 16 x 16 = 256 tokens, half merged
    assert not torch.equal(out, reference)
    assert torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0) > 0.9


def test_ratio_bounds_and_off():
    unet = unet_with_top_attention()
    assert apply_token_merging(unet, 0) == 0
    assert type(unet.down_blocks[0].attentions[0].transformer_blocks[0]).__name__ == "BasicTransformerBlock"
    with pytest.raises(UserError, match="--token-merging 0.9") as err:
        apply_token_merging(unet, 0.9)
    assert err.value.field == "token_merging"


def test_engine_flag():
    from lcm_live.engine.architectures import build_pipeline

    pipe = build_pipeline("tiny", dtype=torch.float32)
    applied = apply_speedups(pipe, EngineSettings(model="tiny", backend="torch", token_merging=0.4), "cpu",
                             torch.float32)
    assert "token_merging:0.4" in applied
    assert any(type(m).__name__ == "ToMeBlock" for m in pipe.unet.modules())
