"""Token merging (``--token-merging R``): ToMe for SD (Bolya and Hoffman 2023, "Token Merging for Fast Stable
Diffusion") through its own package, ``tomesd`` (pip install 'lcm-live[tome]').

Before the self-attention of each transformer block at the highest resolution that has attention (SD1.5: the
first down and the last up block, 4096 tokens at 512², 1024 at 256², tomesd's ``max_downsample=1``; SDXL and
builtin:shapes: the second level, ``max_downsample=2``), a fraction R of the tokens is merged into similar ones
(bipartite soft matching against one destination token per 2x2 cell) and unmerged after, so self-attention runs
on (1 - R) of the tokens (cross-attention and the feed-forward unmerged: ToMe for SD's recommended setting).

Checked with diffusers 0.42 (engine/tome.py's tests): tomesd 0.1.3 replaces each ``BasicTransformerBlock``'s
forward with its own copy of an older diffusers' forward; for the blocks SD1.5 and SDXL use (``norm_type
"layer_norm"``, no positional embedding, no feed-forward chunking) that copy is the same arithmetic as 0.42's,
bit for bit when nothing is merged (a test holds them side by side), so the package is used as it is. Other block
kinds (AdaLayerNorm, ...) are refused rather than silently run through the old forward. ``use_rand`` is off: the
destination tokens are the top-left of each cell, so a frame does not depend on a random draw and an OpenVINO trace
(which freezes any draw) is what torch runs.
"""

from __future__ import annotations

from typing import Any

from lcm_live.errors import UserError


def top_attention_downsample(unet: Any) -> int:
    """The downsampling factor of the highest-resolution down block with attention (1, 2, 4 or 8)."""
    for i, block in enumerate(unet.down_blocks):
        if getattr(block, "has_cross_attention", False):
            return 2**i
    raise UserError("--token-merging: this UNet has no attention blocks to merge tokens in; leave it off",
                    field="token_merging")


def check_blocks(unet: Any) -> int:
    """How many transformer blocks ToMe would patch; refuses block kinds tomesd's forward does not cover."""
    count = 0
    for module in unet.modules():
        if type(module).__name__ != "BasicTransformerBlock":
            continue
        kind = getattr(module, "norm_type", "layer_norm")
        if kind != "layer_norm" or getattr(module, "pos_embed", None) is not None or getattr(
                module, "_chunk_size", None):
            raise UserError(f"--token-merging: this UNet's transformer blocks ({kind}, positional embedding or "
                            "chunked feed-forward) are not the kind tomesd's forward covers; leave --token-merging "
                            "off", field="token_merging")
        count += 1
    return count


def apply_token_merging(unet: Any, ratio: float) -> int:
    """Patch ``unet`` in place to merge ``ratio`` of the tokens at the highest resolution; returns how many
    transformer blocks there are (those at the highest resolution merge). ``ratio`` 0 leaves it untouched."""
    if not 0 <= ratio <= 0.75:
        raise UserError(f"--token-merging {ratio}: give a fraction in [0, 0.75] (0: off; ToMe for SD suggests "
                        "0.3-0.6)", field="token_merging")
    if ratio == 0:
        return 0
    try:
        import tomesd
    except ImportError as exc:
        raise UserError("--token-merging needs the tomesd package: pip install 'lcm-live[tome]'",
                        field="token_merging") from exc
    count = check_blocks(unet)
    tomesd.apply_patch(unet, ratio=ratio, max_downsample=top_attention_downsample(unet), sx=2, sy=2, use_rand=False,
                       merge_attn=True, merge_crossattn=False, merge_mlp=False)
    return count
