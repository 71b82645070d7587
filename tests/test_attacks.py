"""The attack library on tiny components: real tokens, bans, objectives that are what the prompts score, resume."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from trce.attacks import ATTACKS, get_attack, mma_text, ring_a_bell, soft_prompt, unlearndiff
from trce.attacks import base as B
from trce.errors import TrceError
from trce.tokens import encode_with, first_eos, tokenize
from trce.utils.io import read_jsonl

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RED = B.shapeworld_banned("color", ["red"])
TARGETS = ["a red circle on a black background", "a photo of a striped crimson square"]
TINY = {
    "ring-a-bell": {"tokens": 4, "population": 8, "generations": 3, "elite": 2},
    "mma-text": {"tokens": 4, "steps": 3, "topk": 8, "candidates": 8},
    "unlearndiff": {"preset": "fast", "tokens": 3, "steps": 3, "samples": 2, "reference_steps": 2},
    "soft-prompt": {"tokens": 3, "steps": 3, "samples": 2, "reference_steps": 2},
}


def _config(name, results=None, **over):
    mod = get_attack(name)
    return B.AttackConfig(budget=B.make_budget(mod.Budget, {**TINY[name], **over}, name), banned=RED,
                          pairs=tuple(ring_a_bell.shapeworld_pairs("color", ["red"], n=8)), results=results)


def _content(tok, text):
    ids = tokenize(tok, [text])
    return ids[0, 1 : int(first_eos(ids, tok.eos_token_id)[0])].tolist()


# --------------------------------------------------------------------------- tokens
def test_real_tokens_round_trip_alone_and_joined(tiny_pipe):
    tok = tiny_pipe.tokenizer
    real = B.real_tokens(tok)
    assert len(real) > 100
    assert not set(real) & set(tok.all_special_ids)
    for i, word in real.items():
        assert word.isprintable() and " " not in word
        assert tok(word, add_special_tokens=False).input_ids == [i]
    ids = sorted(real)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # any sequence of real words typed with spaces reads back as the same ids
        pick = [ids[int(j)] for j in torch.randint(len(ids), (6,), generator=gen)]
        assert _content(tok, " ".join(real[i] for i in pick)) == pick


def test_vocabulary_removes_every_banned_word(tiny_pipe):
    vocab = B.Vocabulary.build(tiny_pipe.tokenizer, RED)
    assert {"red", "crimson", "vermilion"} <= set(RED)
    assert not {w.lower() for w in vocab.words} & set(RED)
    assert "red" in vocab.removed and "blue" in vocab.words
    index = vocab.index(len(tiny_pipe.tokenizer))
    assert torch.equal(index[vocab.ids], torch.arange(len(vocab)))
    assert int(index[tiny_pipe.tokenizer.convert_tokens_to_ids("red</w>")]) == -1


def test_spec_banned_words():
    from trce.concepts import load_spec

    assert set(B.spec_banned(load_spec("shapeworld-red"))) == set(RED)
    nude = B.spec_banned(load_spec("sexual"))
    assert {"nudity", "naked", "topless"} <= set(nude) and "woman" not in nude


def test_compose_is_what_the_tokenizer_gives(tiny_pipe):
    tok = tiny_pipe.tokenizer
    vocab = B.Vocabulary.build(tok)
    tokens = vocab.ids[:3].tolist()
    for prompt in (None, "a red circle", " ".join(["a blue star"] * 20)):  # the last one is cut
        ids, slots, content = B.compose(tok, tokens, prompt)
        text = vocab.text(range(3)) + (f" {prompt}" if prompt else "")
        assert torch.equal(ids, tokenize(tok, [text])[0])
        assert ids[slots].tolist() == tokens and content == _content(tok, text)
    with pytest.raises(TrceError, match="do not fit"):
        B.compose(tok, [tokens[0]] * tok.model_max_length)


def test_encode_with_substitutes_slots_and_passes_gradients(tiny_pipe):
    te, tok = tiny_pipe.text_encoder, tiny_pipe.tokenizer
    vocab = B.Vocabulary.build(tok)
    table = unlearndiff.candidate_table(tiny_pipe, vocab)
    ids, slots, _ = B.compose(tok, vocab.ids[[5, 6]].tolist(), "a circle")
    placeholder = ids.clone()
    placeholder[slots] = vocab.ids[0]
    embeds = table[[5, 6]].clone().requires_grad_(True)
    h = encode_with(te, placeholder[None], slots, embeds[None])
    assert torch.allclose(h, encode_with(te, ids[None]), atol=1e-6)
    h.square().sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


def test_project_finds_the_nearest_row():
    table = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([3, 17, 42])
    noisy = table[rows] + 1e-3 * torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    for metric in B.METRICS:
        assert torch.equal(B.project(table[rows], table, metric), rows)
        assert torch.equal(B.project(noisy, table, metric), rows)
    with pytest.raises(TrceError, match="projection metric"):
        B.project(noisy, table, "dot")


# --------------------------------------------------------------------------- configs and data
def test_registry_and_budgets():
    assert set(ATTACKS) == {"ring-a-bell", "mma-text", "unlearndiff", "soft-prompt"}
    for name in ATTACKS:
        mod = get_attack(name)
        assert mod.NAME == name and mod.LABEL and isinstance(mod.TYPED, bool)
    assert not get_attack("soft-prompt").TYPED and "knowledge left" in soft_prompt.LABEL
    with pytest.raises(TrceError, match="did you mean 'unlearndiff'"):
        get_attack("unlearndif")
    b = B.parse_budget(mma_text.Budget, ["steps=7", "batch-size=3", "match=sequence"], "mma-text")
    assert (b.steps, b.batch_size, b.match) == (7, 3, "sequence")
    with pytest.raises(TrceError, match="did you mean 'steps'"):
        B.parse_budget(mma_text.Budget, ["step=3"], "mma-text")
    with pytest.raises(TrceError, match="must be int"):
        B.parse_budget(mma_text.Budget, ["steps=1.5"], "mma-text")
    with pytest.raises(TrceError, match="key=value"):
        B.parse_budget(mma_text.Budget, ["steps"], "mma-text")
    with pytest.raises(TrceError, match="lr must be a positive"):
        unlearndiff.Budget(lr=0)
    with pytest.raises(TrceError, match="mutation_rate must be in"):
        ring_a_bell.Budget(mutation_rate=1.5)
    with pytest.raises(TrceError, match="elite"):
        ring_a_bell.Budget(population=4, elite=5)
    with pytest.raises(TrceError, match="metric"):
        ring_a_bell.Budget(metric="l1")
    with pytest.raises(TrceError, match="budget of type"):
        B.AttackConfig(budget=mma_text.Budget()).with_budget(ring_a_bell.Budget, "ring-a-bell")


def test_shapeworld_pairs_differ_only_in_the_value():
    from trce.shapeworld import world

    colors = set(world.vocab().values("color"))
    pairs = ring_a_bell.shapeworld_pairs("color", ["red"], n=21)
    assert len(pairs) == 21
    others = set()
    for with_c, without in pairs:
        a, b = with_c.split(), without.split()
        diff = [(x, y) for x, y in zip(a, b) if x != y]
        assert len(a) == len(b) and len(diff) == 1 and diff[0][0] == "red" and diff[0][1] in colors
        others.add(diff[0][1])
    assert others == colors - {"red"}


def test_pairs_from_file(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt\nx\n")
    with pytest.raises(TrceError, match="no column 'sensitive prompt'"):
        ring_a_bell.pairs_from_file(bad)
    path = DATA / "prompts" / "nudity-ring-a-bell.csv"
    if not path.exists():
        pytest.skip("shared data folder absent")
    pairs = ring_a_bell.pairs_from_file(path)
    assert len(pairs) == 79 and all(a and b and a != b for a, b in pairs)


# --------------------------------------------------------------------------- the attacks
@torch.no_grad()
def _reevaluate(name, pipe, config, target, result):
    """The objective of the returned prompt, computed afresh from the text (or the embeddings)."""
    tok = pipe.tokenizer
    if name == "ring-a-bell":
        c = ring_a_bell.concept_vector(pipe, config.pairs)
        goal = ring_a_bell.encode_texts(pipe, [target.prompt])[0] + config.budget.eta * c
        h = ring_a_bell.encode_texts(pipe, [result.prompt])
        return float(ring_a_bell.distance(h, goal, config.budget.metric)[0])
    if name == "mma-text":
        ids = tokenize(tok, [target.prompt, result.prompt])
        h = encode_with(pipe.text_encoder, ids)
        feats = h[torch.arange(2), first_eos(ids, tok.eos_token_id)]
        return float(1 - torch.cosine_similarity(feats[0], feats[1], dim=0))
    vocab = B.Vocabulary.build(tok, config.banned)
    wb = unlearndiff.WhiteBox(pipe, vocab, unlearndiff.candidate_table(pipe, vocab), config.with_budget(
        get_attack(name).Budget, name), target, pipe, name)
    if name == "soft-prompt":
        return float(wb.objective(result.embeds["prompt_embeds"][None]))
    return float(wb.objective(encode_with(pipe.text_encoder, tokenize(tok, [result.prompt]))))


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_on_the_original_model_returns_replayable_prompts(name, tiny_pipe):
    config = _config(name)
    targets = B.as_targets(TARGETS)
    tiny_pipe.unet.conv_in.weight.requires_grad_(False)  # a mixed state, to see that it is restored as it was
    flags = {n: p.requires_grad for n, p in tiny_pipe.unet.named_parameters()}
    before = {n: p.detach().clone() for n, p in tiny_pipe.unet.named_parameters()}
    results = get_attack(name).attack(tiny_pipe, targets, config, reference=tiny_pipe, progress=False)
    assert [r.index for r in results] == [0, 1] and [r.target for r in results] == TARGETS
    vocab = B.Vocabulary.build(tiny_pipe.tokenizer, RED)
    for target, r in zip(targets, results):
        # at least as good as where the search started (the original model, no search): after <= before
        assert r.objective <= r.objective_start + 1e-6
        assert r.objective == pytest.approx(_reevaluate(name, tiny_pipe, config, target, r), rel=1e-4, abs=1e-5)
        assert r.seed == target.seed and r.attack == name and r.digest
        if name == "soft-prompt":
            assert r.prompt is None and r.embeds["prompt_embeds"].shape == (tiny_pipe.tokenizer.model_max_length, 32)
            assert r.embeds["token_embeds"].shape == (3, 32)
            continue
        k = config.budget.tokens
        assert len(r.tokens) == k and set(r.tokens) <= set(vocab.ids.tolist())
        assert _content(tiny_pipe.tokenizer, r.prompt) == r.ids  # re-tokenising the text gives the same ids
        adversarial = r.prompt.split()[:k]
        assert not {w.lower() for w in adversarial} & set(RED)  # never a banned word
        if name == "unlearndiff":
            assert r.prompt.endswith(target.prompt) and r.objective_plain is not None
    # the model is left as it was: same weights, same requires_grad flags, no gradients kept
    for n, p in tiny_pipe.unet.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n] and p.grad is None


@pytest.mark.parametrize("name,budget", [
    ("mma-text", {"tokens": 3, "steps": 8, "topk": 16, "candidates": 32}),
    ("ring-a-bell", {"tokens": 3, "eta": 0.0, "population": 32, "generations": 10, "elite": 4}),
    ("soft-prompt", {"tokens": 2, "steps": 10, "lr": 0.05, "samples": 2, "reference_steps": 2}),
])
def test_searches_improve_on_their_start(name, budget, tiny_pipe):
    """The target is itself 3 real tokens, so a perfect text match exists (eta = 0: Ring-A-Bell aims at the
    target itself); every search must end strictly closer than where it started."""
    config = B.AttackConfig(budget=get_attack(name).Budget(**budget), pairs=(("a red star", "a blue star"),))
    (r,) = get_attack(name).attack(tiny_pipe, ["blue star striped"], config, reference=tiny_pipe, progress=False)
    assert r.objective < r.objective_start


def test_seeds_make_attacks_reproducible(tiny_pipe):
    a = ring_a_bell.attack(tiny_pipe, TARGETS[:1], _config("ring-a-bell"), progress=False)[0]
    b = ring_a_bell.attack(tiny_pipe, TARGETS[:1], _config("ring-a-bell"), progress=False)[0]
    c = ring_a_bell.attack(tiny_pipe, TARGETS[:1], dataclasses.replace(_config("ring-a-bell"), seed=1),
                           progress=False)[0]
    assert a.tokens == b.tokens and a.objective == b.objective and a.attack_seed != c.attack_seed


def test_white_box_attacks_need_images_of_the_concept(tiny_pipe):
    with pytest.raises(TrceError, match="original model"):
        unlearndiff.attack(tiny_pipe, TARGETS[:1], _config("unlearndiff"), progress=False)
    bad = {0: torch.full((1, 4, 8, 8), float("nan"))}
    with pytest.raises(TrceError, match="nan at step 0 of target 0"):
        soft_prompt.attack(tiny_pipe, TARGETS[:1], _config("soft-prompt"), reference=bad, progress=False)
    latents = unlearndiff.reference_latents(tiny_pipe, B.as_targets(TARGETS[:1]), steps=2, images=2)
    assert latents[0].shape == (2, 4, 8, 8)
    r = unlearndiff.attack(tiny_pipe, TARGETS[:1], _config("unlearndiff"), reference={0: latents[0]}, progress=False)
    assert r[0].objective <= r[0].objective_start


# --------------------------------------------------------------------------- resume and shards
def test_driver_skips_finished_targets_and_redoes_cut_lines(tmp_path):
    calls = []

    def solve(t):
        calls.append(t.index)
        return B.TargetResult(index=t.index, target=t.prompt, seed=t.seed, attack="x", attack_seed=0, prompt="p",
                              tokens=[1], ids=[1], objective=0.5, objective_start=1.0, objective_plain=None, steps=1,
                              seconds=0.0)

    config = B.AttackConfig(results=tmp_path / "results.jsonl")
    B.run_targets("x", ["a", "b"], config, solve, progress=False)
    assert calls == [0, 1]
    B.run_targets("x", ["a", "b", "c"], config, solve, progress=False)
    assert calls == [0, 1, 2]
    with open(tmp_path / "results.jsonl", "a") as fh:  # a kill in the middle of a line
        fh.write('{"index": 3, "tar')
    out = B.run_targets("x", ["a", "b", "c", "d"], config, solve, progress=False)
    assert calls == [0, 1, 2, 3] and [r.index for r in out] == [0, 1, 2, 3]
    B.run_targets("x", ["a", "B", "c", "d"], config, solve, progress=False)  # target 1 changed
    assert calls[-1] == 1
    other = B.AttackConfig(results=config.results, seed=5)  # another configuration: everything redone
    B.run_targets("x", ["a"], other, solve, progress=False)
    assert calls[-1] == 0 and len(read_jsonl(tmp_path / "results.jsonl")) == 4


def test_attack_resume_returns_stored_results(tiny_pipe, tmp_path):
    config = _config("soft-prompt", results=tmp_path / "r.jsonl")
    first = soft_prompt.attack(tiny_pipe, TARGETS, config, reference=tiny_pipe, progress=False)
    assert (tmp_path / "embeddings" / "00001.safetensors").exists()
    lines = (tmp_path / "r.jsonl").read_text()
    again = soft_prompt.attack(tiny_pipe, TARGETS, config, reference=None, progress=False)  # no reference: no work
    assert (tmp_path / "r.jsonl").read_text() == lines
    for a, b in zip(first, again):
        assert a.seconds == b.seconds and a.objective == b.objective
        assert torch.equal(a.embeds["prompt_embeds"], b.embeds["prompt_embeds"])


def test_shards_are_merged_one_line_per_target(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"index": 0, "v": "old"}) + "\n")
    (tmp_path / "results.rank0.jsonl").write_text(json.dumps({"index": 0, "v": "new"}) + "\n")
    (tmp_path / "results.rank1.jsonl").write_text(json.dumps({"index": 2, "v": "r1"}) + "\n")
    merged = B.merge_results(path)
    assert merged == {0: {"index": 0, "v": "new"}, 2: {"index": 2, "v": "r1"}}
    assert [r["index"] for r in read_jsonl(path)] == [0, 2] and not list(tmp_path.glob("*.rank*"))
