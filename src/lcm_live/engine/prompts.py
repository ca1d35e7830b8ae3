"""Prompt embeddings, cached: the prompt only changes when the user types, so the text encoder runs once per
distinct (prompt, negative prompt, CFG mode) and every later frame reuses the tensors.

The cached tensors are exactly what the pipeline would compute from ``prompt=``: we call the pipeline's own
``encode_prompt`` with ``num_images_per_prompt=1`` and pass the result as ``prompt_embeds=`` (the pipeline
repeats them per image), so seeds and pixels match a plain diffusers call.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class PromptEmbeddings:
    kwargs: dict[str, Any]  # prompt_embeds, negative_prompt_embeds (CFG), pooled_* (SDXL): passed to the pipeline
    warnings: list[str] = field(default_factory=list)  # e.g. what the tokenizer window cut off


def truncation_warning(tokenizer: Any, text: str, what: str) -> str | None:
    """A warning naming the words a CLIP tokenizer drops from ``text``, or None when it fits.

    CLIP keeps ``model_max_length`` tokens (77), including the start and end tokens.
    """
    if not text or tokenizer is None:
        return None
    limit = int(getattr(tokenizer, "model_max_length", 77))
    ids = tokenizer(text, truncation=False, add_special_tokens=True)["input_ids"]
    if len(ids) <= limit:
        return None
    cut = tokenizer.decode(ids[limit - 1 : -1], skip_special_tokens=True).strip()
    return (f"{what} is {len(ids)} tokens, longer than the text encoder's {limit}-token window; "
            f"this part was cut: {cut!r}")


class PromptCache:
    """An LRU of prompt embeddings for one pipeline (``size`` entries; 0 disables caching)."""

    def __init__(self, size: int = 64):
        self.size = max(0, int(size))
        self._entries: OrderedDict[tuple, PromptEmbeddings] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def get(self, pipe: Any, prompt: str, negative_prompt: str | None, *, do_cfg: bool,
            clip_skip: int | None = None, scope: str | None = None) -> tuple[PromptEmbeddings, bool]:
        """The embeddings for this prompt, and whether they came from the cache (an entry of ``scope`` only:
        GenerationRequest.cache_scope)."""
        is_sdxl = hasattr(pipe, "text_encoder_2")
        key = (scope, prompt, negative_prompt if do_cfg else None, do_cfg, clip_skip, is_sdxl)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry, True
        entry = encode(pipe, prompt, negative_prompt, do_cfg=do_cfg, clip_skip=clip_skip)
        with self._lock:
            self.misses += 1
            if self.size:
                self._entries[key] = entry
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
        return entry, False


def encode(pipe: Any, prompt: str, negative_prompt: str | None, *, do_cfg: bool,
           clip_skip: int | None = None) -> PromptEmbeddings:
    """Run the pipeline's text encoder(s) once: SD1.5/LCM give (B=1, 77, D) embeddings; SDXL adds pooled (1, 1280)."""
    import torch

    warnings = []
    tokenizers = [getattr(pipe, "tokenizer", None)]
    if hasattr(pipe, "tokenizer_2"):
        tokenizers.append(pipe.tokenizer_2)
    for text, what in ((prompt, "the prompt"), (negative_prompt if do_cfg else None, "the negative prompt")):
        # SDXL's two tokenizers share CLIP's 77-token window: one warning is enough.
        tok = next((t for t in tokenizers if t is not None), None)
        message = truncation_warning(tok, text or "", what)
        if message:
            logger.warning(message)
            warnings.append(message)

    device = pipe._execution_device
    with torch.no_grad():
        if hasattr(pipe, "text_encoder_2"):  # SDXL: two encoders, pooled embeddings
            pe, npe, pooled, npooled = pipe.encode_prompt(
                prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=do_cfg,
                negative_prompt=negative_prompt if do_cfg else None, clip_skip=clip_skip,
            )
            kwargs = {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}
            if do_cfg:
                kwargs.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=npooled)
        else:
            pe, npe = pipe.encode_prompt(
                prompt, device, 1, do_cfg, negative_prompt=negative_prompt if do_cfg else None, clip_skip=clip_skip,
            )
            kwargs = {"prompt_embeds": pe}
            if do_cfg:
                kwargs["negative_prompt_embeds"] = npe
    return PromptEmbeddings(kwargs=kwargs, warnings=warnings)
