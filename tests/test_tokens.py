"""Token roles come from the tokenizer: multi-token words, padding, truncation, pair alignment."""

import pytest
import torch

from trce.concepts import fill
from trce.errors import TrceError
from trce.shapeworld.tokenizer import build_tokenizer
from trce.shapeworld.world import vocab
from trce.tokens import first_eos, pair_positions, parse_role, role_positions, token_span, tokenize


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _pieces(tok, word):
    return tok(word, add_special_tokens=False).input_ids


def test_parse_role_combinations_and_typos():
    assert parse_role("eot+key") == ("eot", "key")
    with pytest.raises(TrceError, match=r"token role 'eot\+eot' names 'eot' twice"):
        parse_role("eot+eot")
    with pytest.raises(TrceError, match="did you mean 'eot'"):
        parse_role("eto")
    with pytest.raises(TrceError, match="bad token role"):
        parse_role("eot+")
    with pytest.raises(TrceError, match="unknown token role 'key'"):
        parse_role("key", ("eot", "all"))


def test_multi_token_word_span_is_exactly_its_pieces(tok):
    word = "xylophonic"  # not in the ShapeWorld vocabulary: BPE splits it into several pieces
    assert word not in " ".join(vocab().all_text())
    pieces = _pieces(tok, word)
    assert len(pieces) > 1
    prompt, span = fill("a drawing of a {} circle on a black background", word)
    ids = tokenize(tok, [prompt])[0]
    start, end = token_span(tok, prompt, span, ids)
    assert ids[start:end].tolist() == pieces
    assert start == 1 + len(_pieces(tok, "a drawing of a"))  # after the start token and the prefix
    positions = role_positions(tok, ids, ("key",), (start, end))
    assert positions == list(range(start, end))


def test_eot_is_first_eos_and_eot_all_covers_padding(tok):
    prompt = "a crimson star"
    ids = tokenize(tok, [prompt])[0]
    n = len(_pieces(tok, prompt))
    eos = int(first_eos(ids[None], tok.eos_token_id)[0])
    assert eos == n + 1
    assert role_positions(tok, ids, ("eot",)) == [eos]
    assert role_positions(tok, ids, ("eot-all",)) == list(range(eos, tok.model_max_length))
    assert role_positions(tok, ids, ("sot",)) == [0]
    assert role_positions(tok, ids, ("all",)) == list(range(tok.model_max_length))
    assert all(int(ids[p]) == tok.eos_token_id for p in role_positions(tok, ids, ("eot-all",)))


def test_prompt_that_fills_the_context(tok):
    filler = " ".join(["a red circle"] * 20)  # far more than 32 tokens
    prompt, span = fill(filler + " {}", "xylophonic")  # the expression lies beyond the context
    ids = tokenize(tok, [prompt])[0]
    length = tok.model_max_length
    assert ids.shape[0] == length
    # CLIP keeps an end-of-text token at the last position: that is the [EoT].
    assert role_positions(tok, ids, ("eot",)) == [length - 1]
    assert role_positions(tok, ids, ("eot-all",)) == [length - 1]
    start, end = token_span(tok, prompt, span, ids)
    assert start == end  # cut off: no key tokens
    assert pair_positions(tok, ids, ids, ("key",), (start, end), (start, end)) == []
    # Partly cut: the span stops at the last content token.
    prompt2, span2 = fill(" ".join(["a red circle"] * 9) + " {}", "xylophonic")
    ids2 = tokenize(tok, [prompt2])[0]
    s2, e2 = token_span(tok, prompt2, span2, ids2)
    assert s2 < e2 == length - 1
    assert ids2[s2:e2].tolist() == _pieces(tok, "xylophonic")[: e2 - s2]


def test_pair_alignment_rules(tok):
    m_prompt, m_span = fill("a {} circle on a black background", "xylophonic")
    s_prompt, s_span = fill("a {} circle on a black background", "")
    m_ids, s_ids = tokenize(tok, [m_prompt, s_prompt])
    m_tok = token_span(tok, m_prompt, m_span, m_ids)
    s_tok = token_span(tok, s_prompt, s_span, s_ids)
    assert s_tok[0] == s_tok[1] == 2  # empty target: zero-width span after "a"
    m_eos = int(first_eos(m_ids[None], tok.eos_token_id)[0])
    s_eos = int(first_eos(s_ids[None], tok.eos_token_id)[0])
    assert pair_positions(tok, m_ids, s_ids, ("eot",)) == [(m_eos, s_eos)]
    assert pair_positions(tok, m_ids, s_ids, ("sot",)) == [(0, 0)]
    # key: every expression token <-> the token before the (empty) slot, here "a" at position 1.
    key = pair_positions(tok, m_ids, s_ids, ("key",), m_tok, s_tok)
    assert [p for p, _ in key] == list(range(*m_tok)) and {q for _, q in key} == {1}
    # eot-all: j-th eos <-> j-th eos, clamped to the last position when the safe side has fewer.
    length = tok.model_max_length
    rows = pair_positions(tok, m_ids, s_ids, ("eot-all",))
    assert rows == [(m_eos + j, s_eos + j) for j in range(length - m_eos)]  # safe side has more eos
    back = pair_positions(tok, s_ids, m_ids, ("eot-all",))  # now the safe side has fewer
    assert back == [(s_eos + j, min(m_eos + j, length - 1)) for j in range(length - s_eos)]
    assert all(int(m_ids[q]) == tok.eos_token_id for _, q in back)
    # A longer target: key tokens map to its last token.
    s2_prompt, s2_span = fill("a {} circle on a black background", "bright snowy")
    s2_ids = tokenize(tok, [s2_prompt])[0]
    s2_tok = token_span(tok, s2_prompt, s2_span, s2_ids)
    key2 = pair_positions(tok, m_ids, s2_ids, ("key",), m_tok, s2_tok)
    assert {q for _, q in key2} == {s2_tok[1] - 1}
    assert s2_ids[s2_tok[1] - 1].tolist() == _pieces(tok, "snowy")[-1]
    combo = pair_positions(tok, m_ids, s_ids, ("eot", "key"), m_tok, s_tok)
    assert combo == [(m_eos, s_eos)] + key


def test_key_needs_a_span(tok):
    ids = tokenize(tok, ["a red circle"])[0]
    with pytest.raises(TrceError, match="key"):
        role_positions(tok, ids, ("key",))


def test_fill_spans_and_empty_slots():
    text, span = fill("a photo of {concept}, oil painting", "Van Gogh")
    assert text[span[0] : span[1]] == "Van Gogh"
    text, span = fill("{}, oil painting", "")
    assert text == ", oil painting" and span == (0, 0)
    text, span = fill("a {} circle", "")
    assert text == "a circle" and span == (1, 1)
    assert torch.equal(tokenize(build_tokenizer(), [text])[0], tokenize(build_tokenizer(), ["a circle"])[0])


def test_encoding_without_the_padding_matches_the_full_run(tiny_pipe):
    """Causal encoder: the outputs up to each prompt's [EoT] do not depend on the columns after it."""
    from trce.tokens import encode, needs_padding

    tok = tiny_pipe.tokenizer
    ids = tokenize(tok, ["a crimson star", "a picture of a dotted blue circle on a black background", "xylophonic"])
    full = encode(tiny_pipe.text_encoder, ids)
    cut = encode(tiny_pipe.text_encoder, ids, tok.eos_token_id)
    eos = first_eos(ids, tok.eos_token_id)
    assert cut.shape[1] == int(eos.max()) + 1 < full.shape[1]
    for row, e in enumerate(eos.tolist()):
        assert torch.allclose(cut[row, : e + 1], full[row, : e + 1], atol=1e-5)
    assert needs_padding(("eot-all",)) and needs_padding(("all",)) and not needs_padding(("eot", "key", "sot"))
