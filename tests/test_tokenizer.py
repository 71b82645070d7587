import re

from trce.shapeworld import world
from trce.shapeworld.tokenizer import MAX_LENGTH, build_tokenizer


def test_every_world_word_is_one_token_and_unknown_words_split():
    tok = build_tokenizer()
    words = {w for text in world.vocab().all_text() for w in re.findall(r"[a-z]+", text.lower())}
    for word in words:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    assert len(tok("zyxqv", add_special_tokens=False).input_ids) > 1


def test_padding_uses_end_of_text_as_sd_v1():
    tok = build_tokenizer()
    ids = tok("a crimson star", padding="max_length", max_length=tok.model_max_length).input_ids
    assert tok.model_max_length == MAX_LENGTH and len(ids) == MAX_LENGTH
    assert ids[0] == tok.bos_token_id
    assert tok.pad_token_id == tok.eos_token_id
    first_eot = ids.index(tok.eos_token_id)
    assert first_eot == 1 + 3  # bos + three word tokens
    assert all(i == tok.eos_token_id for i in ids[first_eot:])


def test_eot_position_counts_tokens_not_words():
    tok = build_tokenizer()
    ids = tok("a zyxqv star", padding="max_length", max_length=tok.model_max_length).input_ids
    n_pieces = len(tok("zyxqv", add_special_tokens=False).input_ids)
    assert ids.index(tok.eos_token_id) == 1 + 1 + n_pieces + 1
