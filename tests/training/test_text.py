"""The locally built word-level CLIP tokenizer."""

from transformers import CLIPTokenizer

from lcm_live.training.shapes import vocabulary
from lcm_live.training.text import MAX_LENGTH, build_text_encoder, build_tokenizer, learn_merges, tokenize


def test_every_caption_word_is_one_token_and_round_trips(tmp_path):
    tok = build_tokenizer(tmp_path / "tok")
    ids = tok("a large white triangle on a black background").input_ids
    assert len(ids) == 10  # start + 8 words + end
    again = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert again("a large white triangle on a black background").input_ids == ids
    assert tok.decode(ids[1:-1]).strip() == "a large white triangle on a black background"
    assert len(tok("zebra").input_ids) > 3  # other text still tokenizes, byte by byte


def test_merges_deterministic():
    assert learn_merges(vocabulary()) == learn_merges(vocabulary())


def test_text_encoder_shapes(tmp_path):
    tok = build_tokenizer(tmp_path / "tok")
    enc = build_text_encoder(tok)
    ids = tokenize(tok, ["a small red circle on a green background", ""])
    assert tuple(ids.shape) == (2, MAX_LENGTH)
    assert tuple(enc(ids).last_hidden_state.shape) == (2, MAX_LENGTH, enc.config.hidden_size)
