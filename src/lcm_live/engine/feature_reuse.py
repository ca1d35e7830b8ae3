"""Feature reuse (``--feature-reuse K``): the deep UNet blocks' output of one evaluation reused by the next ones,
the shallow blocks recomputed. The idea of DeepCache (Ma, Fang and Wang 2023, "DeepCache: Accelerating Diffusion
Models for Free"): in a U-Net the skip branch of the highest resolution carries what changes from one evaluation to
the next, while the features that come up from the deep blocks change slowly, across denoising steps and, in the
studio's live modes, across consecutive frames of a canvas that changes a stroke at a time.

Split (diffusers' ``UNet2DConditionModel``): the *shallow* part is the time embedding, ``conv_in``, the first down
block, the last up block and the output head (``conv_norm_out``, ``conv_act``, ``conv_out``); the *deep* feature
is the output of the up block before the last (sd15 at 256²: (B, 640, 32, 32)), which the last up block takes with
the skip connections of ``conv_in`` and the first down block. A full evaluation runs diffusers' own forward and
keeps that feature (a forward hook); a reused one runs :func:`shallow_forward` with it.

Which feature an evaluation may reuse: by default the one computed at the same timestep by an earlier frame
(between live frames); with ``across_steps`` the last evaluation's, whatever its timestep (DeepCache's own,
between the steps of one generation). When a full evaluation runs (:class:`FeatureReuse`, the policy; the same
for the torch and the OpenVINO UNet):
1. every K-th evaluation at that timestep (or overall, across steps) (K = 1: always, the exact path);
2. the conditioning changed: another prompt, guidance embedding, SDXL size ids, or another input shape (size, batch);
3. the input moved: the latents at a timestep differ from the last ones seen at that timestep (since the
   conditioning last changed) by more than ``drift`` (relative L2). Within one generation each step has its own
   timestep, so reuse between steps is unaffected; between live frames the same timesteps come back, and another
   seed (new noise), a cleared or new canvas, exceed it, while a stroke added to a sketch stays far below it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

# Relative L2 change of the latents at one timestep, frame to frame, past which the deep feature is recomputed.
# Another seed changes the noise part of img2img latents (0.85 of them at strength 0.5): a change near 1. A
# stroke moves the latents by a few percent.
DRIFT = 0.3
MAX_TIMESTEPS_KEPT = 64


def deep_block(unet: Any) -> Any:
    """The up block whose output is the deep feature: the one before the last."""
    return unet.up_blocks[-2]


@contextlib.contextmanager
def capturing_deep_feature(unet: Any):
    """Within the block, ``store["feature"]`` is the deep feature of the last forward of ``unet``."""
    store: dict[str, torch.Tensor] = {}

    def keep(_module: Any, _args: Any, output: torch.Tensor) -> None:
        store["feature"] = output

    handle = deep_block(unet).register_forward_hook(keep)
    try:
        yield store
    finally:
        handle.remove()


def shallow_forward(unet: Any, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                    deep_feature: torch.Tensor, timestep_cond: torch.Tensor | None = None,
                    added_cond_kwargs: dict | None = None) -> torch.Tensor:
    """The UNet's output with the deep blocks replaced by ``deep_feature``: diffusers' ``forward`` (0.42) for the
    shallow blocks only, no ControlNet residuals, attention masks or class labels (the engine uses none)."""
    tome = getattr(unet, "_tome_info", None)
    if tome is not None:  # token merging (engine/tome.py) reads the latents' size, which its UNet pre-hook sets
        tome["size"] = (sample.shape[2], sample.shape[3])
    # Copied from diffusers.models.unets.unet_2d_condition.UNet2DConditionModel.forward (the shallow blocks).
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs)
    emb = emb + aug_emb if aug_emb is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                                               added_cond_kwargs=added_cond_kwargs)
    sample = unet.conv_in(sample)
    first, last = unet.down_blocks[0], unet.up_blocks[-1]
    if getattr(first, "has_cross_attention", False):
        _, res_samples = first(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
    else:
        _, res_samples = first(hidden_states=sample, temb=emb)
    # The last up block takes the first len(resnets) skips: conv_in's and the first down block's layers'.
    skips = ((sample,) + tuple(res_samples))[:len(last.resnets)]
    if getattr(last, "has_cross_attention", False):
        sample = last(hidden_states=deep_feature, temb=emb, res_hidden_states_tuple=skips,
                      encoder_hidden_states=encoder_hidden_states)
    else:
        sample = last(hidden_states=deep_feature, temb=emb, res_hidden_states_tuple=skips)
    if unet.conv_norm_out:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)


class FeatureReuse:
    """The refresh policy and the cached deep features, shared by consecutive calls (live frames) and steps.

    ``across_steps`` False (the default): a deep feature is reused only at the timestep it was computed at, i.e.
    by the next frames' evaluations at that step (one cached feature per timestep). True: DeepCache's own reuse,
    the last evaluation's feature whatever its timestep, so also between the steps of one generation. Measured on
    builtin:shapes (docs/benchmarks.md): between live frames the output keeps a cosine of 0.999 to the exact
    one; between the 4 steps of an LCM, whose timesteps lie 250 apart, it falls to 0.3: DeepCache's premise
    (adjacent steps of a 50-step sampler see nearly the same features) does not hold for few-step models."""

    def __init__(self, interval: int, *, across_steps: bool = False, drift: float = DRIFT):
        if interval < 1:
            raise ValueError(f"feature_reuse={interval}: the refresh interval K must be >= 1 (1: off)")
        self.interval, self.across_steps, self.drift = interval, across_steps, drift
        self._features: dict[float | None, torch.Tensor] = {}  # timestep (None: across steps) -> deep feature
        self._since_refresh: dict[float | None, int] = {}
        self._conditioning: tuple | None = None
        self._last_input: dict[float, torch.Tensor] = {}  # timestep -> the latents last seen there
        self.full_evaluations = 0
        self.reused_evaluations = 0
        self.last_refresh_reason = ""

    def reset(self) -> None:
        """Forget the cached features: the next evaluations are full ones."""
        self._features.clear()
        self._since_refresh.clear()
        self._last_input.clear()
        self._conditioning = None

    def _slot(self, timestep: Any) -> float | None:
        return None if self.across_steps else _timestep_key(timestep)

    def refresh_reason(self, sample: torch.Tensor, timestep: Any, conditioning: tuple) -> str:
        """Why the next evaluation must be a full one ("" when a cached feature may be reused)."""
        if not _same(conditioning, self._conditioning):
            return "conditioning or shape changed"
        slot = self._slot(timestep)
        if slot not in self._features:
            return "no cached feature" + ("" if self.across_steps else " at this timestep")
        if self._since_refresh[slot] >= self.interval:
            return f"every {self.interval} evaluations"
        previous = self._last_input.get(_timestep_key(timestep))
        if previous is not None and previous.shape == sample.shape:
            change = float((sample.float() - previous.float()).norm() / previous.float().norm().clamp_min(1e-12))
            if change > self.drift:
                return f"input moved {change:.2f} > {self.drift} at this timestep"
        return ""

    def __call__(self, sample: torch.Tensor, timestep: Any, conditioning: tuple,
                 full: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                 shallow: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The model output: ``full()`` -> (output, deep feature) on a refresh, else ``shallow(feature)``.
        ``conditioning``: every input besides the latents and the timestep (a change forces a refresh)."""
        reason = self.refresh_reason(sample, timestep, conditioning)
        if reason == "conditioning or shape changed":  # another generation: nothing of the last one holds
            self.reset()
            self._conditioning = tuple(c.detach().clone() if torch.is_tensor(c) else c for c in conditioning)
        self._remember(sample, timestep)
        slot = self._slot(timestep)
        if reason:
            out, feature = full()
            if len(self._features) >= MAX_TIMESTEPS_KEPT:
                self._features.clear()
                self._since_refresh.clear()
            self._features[slot], self._since_refresh[slot] = feature, 1
            self.full_evaluations += 1
            self.last_refresh_reason = reason
            return out
        self._since_refresh[slot] += 1
        self.reused_evaluations += 1
        return shallow(self._features[slot])

    def _remember(self, sample: torch.Tensor, timestep: Any) -> None:
        if len(self._last_input) >= MAX_TIMESTEPS_KEPT:
            self._last_input.clear()
        self._last_input[_timestep_key(timestep)] = sample.detach().clone()

    def stats(self) -> dict[str, Any]:
        return {"interval": self.interval, "full_evaluations": self.full_evaluations,
                "reused_evaluations": self.reused_evaluations}


def _timestep_key(timestep: Any) -> float:
    t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
    return float(t.reshape(-1)[0])


def _same(a: tuple | None, b: tuple | None) -> bool:
    if a is None or b is None or len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if torch.is_tensor(x) or torch.is_tensor(y):
            if not (torch.is_tensor(x) and torch.is_tensor(y) and x.shape == y.shape and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def conditioning_of(sample: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep_cond: Any,
                    added_cond_kwargs: dict | None) -> tuple:
    """What besides the latents' values and the timestep decides the deep feature."""
    added = added_cond_kwargs or {}
    return (tuple(sample.shape), encoder_hidden_states, timestep_cond, added.get("text_embeds"), added.get("time_ids"))


class FeatureReuseUNet(torch.nn.Module):
    """A stand-in for a torch ``pipe.unet`` that reuses its deep feature under a :class:`FeatureReuse` policy.
    (The OpenVINO UNet runs the same policy over two IRs of its own: engine/openvino_backend.py.)"""

    def __init__(self, unet: Any, reuse: FeatureReuse):
        super().__init__()
        self.unet = unet
        self.reuse = reuse
        self.config = unet.config

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def device(self):
        return self.unet.device

    # The blocks, for what reads them (engine/interrupt.py's stop checks between blocks).
    @property
    def down_blocks(self):
        return self.unet.down_blocks

    @property
    def mid_block(self):
        return self.unet.mid_block

    @property
    def up_blocks(self):
        return self.unet.up_blocks

    def forward(self, sample, timestep, encoder_hidden_states=None, timestep_cond=None, added_cond_kwargs=None,
                cross_attention_kwargs=None, down_block_additional_residuals=None,
                mid_block_additional_residual=None, return_dict: bool = True, **unused):
        if down_block_additional_residuals is not None or mid_block_additional_residual is not None:
            raise ValueError("feature reuse does not take a ControlNet's residuals (refused at load time)")
        kw = {"encoder_hidden_states": encoder_hidden_states, "timestep_cond": timestep_cond,
              "added_cond_kwargs": added_cond_kwargs}

        def full() -> tuple[torch.Tensor, torch.Tensor]:
            with capturing_deep_feature(self.unet) as store:
                out = self.unet(sample, timestep, cross_attention_kwargs=cross_attention_kwargs, return_dict=False,
                                **kw)[0]
            return out, store["feature"]

        def shallow(feature: torch.Tensor) -> torch.Tensor:
            return shallow_forward(self.unet, sample, timestep, deep_feature=feature, **kw)

        out = self.reuse(sample, timestep, conditioning_of(sample, encoder_hidden_states, timestep_cond,
                                                           added_cond_kwargs), full, shallow)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)
