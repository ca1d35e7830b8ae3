"""A word-level CLIPTokenizer built locally, and the small CLIP text encoder of the built-in model.

The vocabulary is CLIP's byte-level base (every byte symbol, alone and word-final, see
``engine/clip_vocab.py``) plus BPE merges learned here on the data set's 16 caption words until each word
is one token. So every caption word is a single token (the UNet reads "red" as one vector, not three), and
any other text still tokenizes (into bytes) instead of failing. The folder is a standard CLIPTokenizer
folder: StableDiffusionPipeline saves and loads it through model_index.json.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from lcm_live.engine.clip_vocab import bytes_to_unicode, write_byte_level_clip_vocab
from lcm_live.training.shapes import vocabulary

MAX_LENGTH = 16  # tokens incl. <|startoftext|> and <|endoftext|>; a caption uses 10
TEXT_HIDDEN = 64  # the text encoder's width = the UNet's cross_attention_dim


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE on ``words`` (each counted once) until every word is one symbol.

    Symbols are CLIP's byte-level characters with ``</w>`` on the last one. Each round merges the most
    frequent adjacent pair (ties broken by first occurrence, so the result is deterministic).
    """
    byte_map = bytes_to_unicode()
    seqs = []
    for w in words:
        chars = [byte_map[b] for b in w.encode("utf-8")]
        chars[-1] += "</w>"
        seqs.append(chars)
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs):
        pairs = Counter(p for s in seqs for p in zip(s, s[1:], strict=False))
        best = max(pairs.items(), key=lambda kv: kv[1])[0]  # Counter keeps insertion order on ties
        merges.append(best)
        for i, s in enumerate(seqs):
            out, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and (s[j], s[j + 1]) == best:
                    out.append(s[j] + s[j + 1])
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            seqs[i] = out
    return merges


def build_tokenizer(folder: str | Path, words: list[str] | None = None):
    """Write and return a CLIPTokenizer whose vocabulary holds each of ``words`` as one token."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    words = words or vocabulary()
    vocab_file, merges_file = write_byte_level_clip_vocab(folder)
    vocab = json.loads(vocab_file.read_text())
    specials = ["<|startoftext|>", "<|endoftext|>"]
    base = [t for t in vocab if t not in specials]
    merges = learn_merges(words)
    merged = [a + b for a, b in merges if a + b not in base]
    tokens = base + list(dict.fromkeys(merged)) + specials  # CLIP keeps its specials last
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=MAX_LENGTH,
                              pad_token="<|endoftext|>")
    for w in words:
        ids = tokenizer(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"tokenizer build: {w!r} became {len(ids)} tokens")  # a bug here, not user input
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_text_encoder(tokenizer, seed: int = 0, hidden: int = TEXT_HIDDEN, layers: int = 2):
    """A small CLIPTextModel (random init) sized for ``tokenizer``."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4,
        num_attention_heads=4, num_hidden_layers=layers, max_position_embeddings=MAX_LENGTH,
        projection_dim=hidden, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))


def tokenize(tokenizer, captions: list[str]):
    """input_ids (N, MAX_LENGTH), padded as SD pipelines do (``padding="max_length"``)."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids
