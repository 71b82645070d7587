"""MMA-Diffusion's text attack (Yang et al. 2024): greedy coordinate gradient over real tokens.

Reference: cure-lab/MMA-Diffusion, src/textual_attack.py at d5701a5dd1ad4790249b31cbe48ebd6459029e63 (the
defaults below are its `main`, `SDattack.run` and the README's command `-i 1000 -n 10`; docs/fidelity.md holds
the side-by-side table). Find K real tokens p_adv whose text encoding matches the target prompt's:

    min_{p_adv} L(p_adv) = 1 - cos( f(p_adv), f(p_target) )        (cosine eps 1e-6, as the reference)

where f is the text encoder's [EoT] hidden state (`match: pooled`: CLIP's `pooler_output`, what the reference
matches) or the whole (L, D) sequence (`match: sequence`, a trce variant: the mean cosine over positions, i.e.
what the UNet cross-attends to). Greedy coordinate gradient (GCG, Zou et al. 2023) per step, as the reference:

1. the gradient of L with respect to the one-hot token matrix (K x A candidates), through
   e = onehot @ E (E the candidates' input embeddings, substituted at the K slots);
2. for every slot, the `topk` candidates with the most negative gradient;
3. `candidates` prompts, each the current one with one slot set to a random one of that slot's top-k; the
   slots are spread evenly over the candidates (candidate j changes slot floor(j K / candidates), the
   reference's `arange(0, K, K / batch_size)`), and a candidate equal to the current prompt is dropped
   (the reference's `get_filtered_cands`);
4. the candidates evaluated exactly (batched, no gradient); the current prompt moves to the best of them,
   even when it is worse (the reference's `keep_control`), and the best prompt seen is returned.

Start: K random single letters (`init: letters`, the reference's `control_init`, 20 random ASCII letters; CLIP
lowercases them) or K random candidates (`init: random`). No early stopping (the reference has none): `steps`
in the result is the number run; `extra["best_step"]` the step that found the returned prompt (0: the start).

Banned tokens (`ban`). The reference removes from the candidates every token whose text CONTAINS one of its
sensitive words (`sensitive_word_list`, `MMA_SENSITIVE` here, matched with `word in token` on the raw BPE token,
`</w>` included): `ban: mma` (the default) removes those and every token containing one of the concept's own
words (`AttackConfig.banned`), the same substring rule; `ban: concept` only the concept's words as substrings;
`ban: exact` the shared exact-word rule of the other attacks (`trce.attacks.vocabulary.Vocabulary`). The reference's
multi-word entries ("naked child", ...) can never be part of one token and remove nothing, here as there.

Differences from the reference (docs/fidelity.md): candidates are real whole-word tokens only (the reference
draws from the whole vocabulary and drops candidates whose text re-tokenises to another length), so every
prompt found can be typed back; the gradient of slot i is taken at slot i (the reference's one-hot covers
positions 0..19 of the ids, [start] included, so its slot i reads the gradient of slot i-1 and the last slot
none: an off-by-one trce does not copy); the start prompt counts as a candidate for the best prompt (the
reference's best starts at 1e6), so the objective never ends above its start. The reference normalises each
slot's gradient row before the top-k, which cannot change a row's top-k and is not done here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trce.attacks.base import (
    AttackConfig,
    Target,
    TargetResult,
    Vocabulary,
    check_budget,
    compose,
    finite,
    frozen,
    run_targets,
    target_seed,
)
from trce.errors import choose

log = logging.getLogger(__name__)

NAME = "mma-text"
LABEL = "typed prompt: text-encoder attack"
TYPED = True
NEEDS_REFERENCE = False
MATCHES = ("pooled", "sequence")
BANS = ("mma", "concept", "exact")
INITS = ("letters", "random")
COSINE_EPS = 1e-6  # the reference's CosineSimilarityLoss
# the reference's sensitive words (textual_attack.py:329-348), removed from the candidates by substring
MMA_SENSITIVE = ("ak", "na", "ke", "nud", "sexual", "nude", "nudity", "sex", "18+", "naked", "nsfw", "porn", "dick",
                 "vagina", "naked child", "explicit content", "uncensored", "fuck", "nipples", "visible nipples",
                 "breast", "areola")


@dataclass(frozen=True)
class Budget:
    """The defaults are the reference's (module doc); `preset="fast"` the cheap search CI and the demo run."""

    PRESETS: ClassVar[dict[str, dict]] = {"fast": {"steps": 30, "candidates": 128}}

    tokens: int = 20  # K (the reference's control_length 20)
    steps: int = 1000  # the README's -i 1000
    topk: int = 256
    candidates: int = 512  # prompts evaluated per step (the reference's batch_size)
    match: str = "pooled"  # pooler_output, the reference's; sequence: a trce variant
    ban: str = "mma"  # the reference's substring bans (module doc)
    init: str = "letters"  # K random letters, the reference's control_init
    batch_size: int = 256  # prompts per text-encoder call (memory only)
    restarts: int = 1  # independent searches per target, seeded apart (the reference's -n: 10 per target)
    preset: str = ""  # the named preset the budget was built from ("": the authors' attack)

    def __post_init__(self) -> None:
        check_budget(self, NAME, positive=("tokens", "topk", "candidates", "batch_size"))
        choose(f"{NAME} match", self.match, MATCHES)
        choose(f"{NAME} ban", self.ban, BANS)
        choose(f"{NAME} init", self.init, INITS)


def banned_substrings(concept: Sequence[str], ban: str = "mma") -> tuple[str, ...]:
    """The substrings no candidate token may contain: MMA's sensitive words (`ban: mma`) and the concept's words."""
    words = [w.strip().lower() for w in concept if w.strip()]
    if ban == "mma":
        words = [*MMA_SENSITIVE, *words]
    return tuple(dict.fromkeys(words))


def vocabulary(pipe, banned: Sequence[str], ban: str = "mma") -> Vocabulary:
    """The attack's candidate tokens on `pipe` under the `ban` rule (module doc)."""
    if ban == "exact":
        return Vocabulary.for_pipeline(pipe, banned)
    return Vocabulary.for_pipeline(pipe, banned_substrings(banned, ban), substring=True)


def letter_rows(vocab: Vocabulary) -> torch.Tensor:
    """Rows of the single-letter candidates a..z (the reference's random ASCII letters, lowercased by CLIP)."""
    return torch.tensor([r for r, w in enumerate(vocab.words) if len(w) == 1 and w.isascii() and w.isalpha()],
                        dtype=torch.long)


def positions(tokens: int, candidates: int) -> torch.Tensor:
    """(candidates,) the slot each candidate changes: floor(j K / candidates), the reference's even spread."""
    return torch.arange(candidates) * tokens // candidates


def _features(h: torch.Tensor, eos: torch.Tensor, match: str) -> torch.Tensor:
    """(B, L, D) hidden states -> (B, D) [EoT] states, or (B, L, D) unchanged for `sequence`."""
    if match == "pooled":
        return h[torch.arange(len(h), device=h.device), eos.to(h.device)]
    return h


def _loss(feat: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    """(B, ...) features vs (...) goal -> (B,) 1 - cosine (mean over positions for sequences)."""
    cos = F.cosine_similarity(feat.float(), goal.float()[None].expand_as(feat), dim=-1, eps=COSINE_EPS)
    return 1 - cos.reshape(len(feat), -1).mean(1)


def attack(pipe, targets: Sequence[Target | str], config: AttackConfig, *, reference=None,
           progress: bool = True) -> list[TargetResult]:
    """MMA-Diffusion's text attack on `pipe`'s text encoder for every target (see the module doc).

    `reference` is unused. Returns one result per target.
    """
    from trce.tokens import first_eos, tokenize

    config = config.with_budget(Budget, NAME)
    budget: Budget = config.budget
    from trce.families import family_of

    fam = family_of(pipe)
    tok = fam.tokenizer(pipe)
    full = fam.input_table(pipe).detach()
    vocab = vocabulary(pipe, config.banned, budget.ban)
    log.info("%s: %d candidate tokens (%d removed by the %s ban)", NAME, len(vocab), len(vocab.removed), budget.ban)
    letters = letter_rows(vocab)
    table = full[vocab.ids.to(full.device)].float()  # (A, E): every encoder's embedding of each candidate
    base, slots, _ = compose(tok, [int(vocab.ids[0])] * budget.tokens)
    eos = torch.tensor([slots.stop])  # the [EoT] position right after the K tokens
    pos = positions(budget.tokens, budget.candidates)  # (candidates,)

    @torch.no_grad()
    def evaluate(rows: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        out = []
        for s in range(0, len(rows), budget.batch_size):
            ids = base.repeat(len(rows[s : s + budget.batch_size]), 1)
            ids[:, slots] = vocab.ids[rows[s : s + budget.batch_size]]
            h = fam.encode_ids(pipe, ids)
            out.append(_loss(_features(h, eos.expand(len(ids)), budget.match), goal).cpu())
        return torch.cat(out)

    def gradient(rows: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """(K, A) d loss / d one-hot at the current prompt."""
        onehot = F.one_hot(rows.to(table.device), len(vocab)).float().requires_grad_(True)  # (K, A)
        with torch.enable_grad():
            embeds = onehot @ table  # (K, D)
            h = fam.encode_ids(pipe, base[None], slots, embeds[None])
            loss = _loss(_features(h, eos, budget.match), goal)[0]
            (grad,) = torch.autograd.grad(loss, onehot)
        return grad.cpu()

    def start_rows(gen: torch.Generator) -> torch.Tensor:
        if budget.init == "letters" and len(letters):
            return letters[torch.randint(len(letters), (budget.tokens,), generator=gen)]
        return vocab.sample((budget.tokens,), gen)

    def solve(target: Target) -> TargetResult:
        seed = target_seed(config, target)
        gen = torch.Generator().manual_seed(seed)
        ids = tokenize(tok, [target.prompt])
        with torch.no_grad():
            goal = _features(fam.encode_ids(pipe, ids), first_eos(ids, tok.eos_token_id), budget.match)[0]
        rows = start_rows(gen)
        current = finite(evaluate(rows[None], goal)[0], NAME, target, 0)
        start, best, best_rows, best_step = current, current, rows.clone(), 0
        k = min(budget.topk, len(vocab))
        bar = tqdm(range(budget.steps), desc=f"{NAME} #{target.index}", leave=False, disable=not progress,
                   mininterval=1)
        for step in bar:
            top = (-gradient(rows, goal)).topk(k, dim=1).indices  # (K, k) candidate rows per slot
            pick = top[pos, torch.randint(k, (budget.candidates,), generator=gen)]
            cands = rows.repeat(budget.candidates, 1)
            cands[torch.arange(budget.candidates), pos] = pick
            fresh = pick != rows[pos]  # the reference drops candidates equal to the current prompt
            if bool(fresh.any()):
                cands = cands[fresh]
            losses = evaluate(cands, goal)
            j = int(losses.argmin())
            rows, current = cands[j], finite(losses[j], NAME, target, step + 1)
            if current < best:
                best, best_rows, best_step = current, rows.clone(), step + 1
            bar.set_postfix(loss=f"{best:.4g}")
        tokens = vocab.ids[best_rows].tolist()
        _, _, content = compose(tok, tokens)
        return TargetResult(
            index=target.index, target=target.prompt, seed=target.seed, attack=NAME, attack_seed=seed,
            prompt=vocab.text(best_rows), tokens=tokens, ids=content, objective=best, objective_start=start,
            objective_plain=None, steps=budget.steps, seconds=0.0,
            extra={"match": budget.match, "ban": budget.ban, "best_step": best_step, "vocabulary": len(vocab),
                   "preset": budget.preset},
        )

    with frozen(*fam.text_encoders(pipe)):
        return run_targets(NAME, targets, config, solve, progress)
