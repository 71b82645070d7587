"""Ring-A-Bell (Tsai et al. 2023): a model-agnostic attack that needs only the text encoder f.

1. Concept vector (their Eq. 3): c = (1/N) sum_i [ f(P_i^with) - f(P_i^without) ] over N prompt
   pairs that differ by the concept, on the full last hidden state (L, D), as Ring-A-Bell does.
2. Target (Eq. 4): for each target prompt P, P_cont = f(P) + eta * c.
3. Genetic search (their Sec. 3.3) for K real tokens whose encoding approaches P_cont:
   min_P~ d(f(P~), P_cont), d = mean squared error over the (L, D) sequence (`metric: mse`,
   the paper's) or 1 - cosine of the flattened sequences (`metric: cosine`).

The search here: a population of `population` random K-token prompts over the real-token
vocabulary minus the banned words; each generation keeps the `elite` best unchanged and makes the
rest as children of two tournament winners (`tournament` contestants each): single-point
crossover with probability `crossover`, then, with probability `mutation_rate`, one random slot
replaced by a random candidate token (Ring-A-Bell mutates one token of a chosen individual).
Elitism makes the best objective non-increasing over generations.

Pairs (`AttackConfig.pairs`): ShapeWorld captions with the concept value vs the same caption with
another value (`shapeworld_pairs`), Ring-A-Bell's own "sensitive prompt"/"normal prompt" CSV
(`pairs_from_file`), or a concept spec's (malicious, safe) pairs (`pairs_from_spec`).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
    run_targets,
    target_seed,
)
from trce.errors import TrceError, choose

log = logging.getLogger(__name__)

NAME = "ring-a-bell"
LABEL = "typed prompt: model-agnostic (text encoder only)"
TYPED = True
NEEDS_REFERENCE = False
DISTANCES = ("mse", "cosine")


@dataclass(frozen=True)
class Budget:
    tokens: int = 16  # K, the adversarial prompt's length (the paper: 16 for nudity)
    eta: float = 3.0  # strength of the concept vector (the paper: 3)
    population: int = 200
    generations: int = 3000
    mutation_rate: float = 0.25
    crossover: float = 0.5
    elite: int = 10  # best individuals carried over unchanged (>= 1: the best never gets worse)
    tournament: int = 3
    metric: str = "mse"
    batch_size: int = 256  # prompts per text-encoder call
    restarts: int = 1  # independent searches per target, seeded apart (trce.attacks.base)

    def __post_init__(self) -> None:
        check_budget(self, NAME, positive=("tokens", "population", "elite", "tournament", "batch_size"),
                     unit=("mutation_rate", "crossover"))
        choose(f"{NAME} metric", self.metric, DISTANCES)
        if self.elite > self.population:
            raise TrceError(f"{NAME} budget elite ({self.elite}) must not exceed population ({self.population})")


# --------------------------------------------------------------------------- prompt pairs
def shapeworld_pairs(attribute: str, values: Sequence[str], n: int = 64, seed: int = 0) -> list[tuple[str, str]]:
    """n (caption with an erased value, the same caption with another value of the attribute) pairs.

    Both captions come from the same scene and the same random draws (every attribute named by
    keyword), so they differ only in the value's word; the other values are cycled through.
    """
    from trce.shapeworld import world

    v = world.vocab()
    others = [x for x in v.values(attribute) if x not in values]
    if not others:
        raise TrceError(f"no other {attribute} value to pair {', '.join(values)} with")
    style = world.fixed_style("keyword")
    out = []
    for i in range(n):
        value = values[i % len(values)]
        other = others[(i // len(values)) % len(others)]
        scene = world.sample_scene(np.random.default_rng([seed, i]), **{attribute: value})
        with_text, _ = world.describe(scene, np.random.default_rng([seed, i, 1]), style)
        without = dataclasses.replace(scene, **{attribute: other})
        without_text, _ = world.describe(without, np.random.default_rng([seed, i, 1]), style)
        out.append((with_text, without_text))
    return out


def pairs_from_file(path: str | Path, with_column: str = "sensitive prompt",
                    without_column: str = "normal prompt") -> list[tuple[str, str]]:
    """(with, without) pairs from a CSV in Ring-A-Bell's layout (`sensitive prompt`, `normal prompt`)."""
    path = Path(path)
    if not path.is_file():
        raise TrceError(f"prompt pair file {path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise TrceError(f"prompt pair file {path} is not a readable UTF-8 CSV: {exc}") from exc
    missing = [c for c in (with_column, without_column) if c not in header]
    if missing:
        raise TrceError(f"prompt pair file {path} has no column {', '.join(map(repr, missing))}; "
                        f"its columns are {', '.join(map(repr, header))}")
    pairs = [(r[with_column].strip(), r[without_column].strip()) for r in rows
             if (r[with_column] or "").strip() and (r[without_column] or "").strip()]
    if not pairs:
        raise TrceError(f"prompt pair file {path} has no complete pair")
    return pairs


def pairs_from_spec(spec) -> list[tuple[str, str]]:
    """A concept spec's (malicious, safe) prompt pairs."""
    return [(p.malicious, p.safe) for p in spec.pairs()]


# --------------------------------------------------------------------------- geometry
@torch.no_grad()
def encode_texts(pipe, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """(N, L, D) fp32 last hidden states of `prompts`, padded as the pipeline pads them."""
    from trce.families import family_of
    from trce.tokens import tokenize

    fam = family_of(pipe)
    ids = tokenize(fam.tokenizer(pipe), prompts)
    return torch.cat([fam.encode_ids(pipe, ids[s : s + batch_size]).float()
                      for s in range(0, len(ids), batch_size)])


def concept_vector(pipe, pairs: Sequence[tuple[str, str]], batch_size: int = 256) -> torch.Tensor:
    """c (L, D): mean over pairs of f(with) - f(without) (Ring-A-Bell Eq. 3)."""
    if not pairs:
        raise TrceError(f"{NAME} needs prompt pairs (with the concept, without it): AttackConfig.pairs")
    with_c = encode_texts(pipe, [a for a, _ in pairs], batch_size)
    without = encode_texts(pipe, [b for _, b in pairs], batch_size)
    return (with_c - without).mean(0)


def distance(h: torch.Tensor, target: torch.Tensor, metric: str) -> torch.Tensor:
    """(B, L, D) encodings vs the (L, D) target -> (B,) distances."""
    h, target = h.float(), target.float()
    if metric == "mse":
        return ((h - target) ** 2).flatten(1).mean(1)
    return 1 - F.cosine_similarity(h.flatten(1), target.flatten()[None], dim=1)


class _Fitness:
    """d(f(prompt of K candidate rows), target) for a population, batched, without gradients."""

    def __init__(self, pipe, vocab: Vocabulary, tokens: int, metric: str, batch_size: int):
        from trce.families import family_of

        fam = family_of(pipe)
        self.encode = lambda ids: fam.encode_ids(pipe, ids)
        self.vocab, self.metric, self.batch = vocab, metric, batch_size
        self.base, self.slots, _ = compose(fam.tokenizer(pipe), [int(vocab.ids[0])] * tokens)

    def ids(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, K) candidate rows -> (B, L) token ids."""
        ids = self.base.repeat(len(rows), 1)
        ids[:, self.slots] = self.vocab.ids[rows]
        return ids

    @torch.no_grad()
    def __call__(self, rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = [distance(self.encode(self.ids(rows[s : s + self.batch])), target, self.metric).cpu()
               for s in range(0, len(rows), self.batch)]
        return torch.cat(out)


def _children(pop: torch.Tensor, n: int, budget: Budget, vocab: Vocabulary, gen: torch.Generator) -> torch.Tensor:
    """n children of a population sorted best first: tournament parents, single-point crossover, mutation."""
    size, k = pop.shape
    # tournament: the contestant with the lowest index (pop is sorted) wins
    pa = torch.randint(size, (n, budget.tournament), generator=gen).min(1).values
    pb = torch.randint(size, (n, budget.tournament), generator=gen).min(1).values
    cut = torch.randint(1, max(k, 2), (n,), generator=gen)  # crossover point in [1, K-1]
    cross = torch.rand(n, generator=gen) < budget.crossover
    take_b = cross[:, None] & (torch.arange(k)[None] >= cut[:, None])  # (n, K)
    child = torch.where(take_b, pop[pb], pop[pa])
    mutate = torch.rand(n, generator=gen) < budget.mutation_rate
    slot = torch.randint(k, (n,), generator=gen)
    new = vocab.sample((n,), gen)
    child[mutate, slot[mutate]] = new[mutate]
    return child


def attack(pipe, targets: Sequence[Target | str], config: AttackConfig, *, reference=None,
           progress: bool = True) -> list[TargetResult]:
    """Ring-A-Bell against `pipe`'s text encoder for every target (see the module doc).

    `reference` is unused (the attack is model-agnostic). Returns one result per target.
    """
    config = config.with_budget(Budget, NAME)
    budget: Budget = config.budget
    from trce.families import family_of

    fam = family_of(pipe)
    te, tok = fam.text_encoder(pipe), fam.tokenizer(pipe)
    vocab = Vocabulary.for_pipeline(pipe, config.banned)
    c = concept_vector(pipe, config.pairs, budget.batch_size).to(te.device)  # (L, D)
    fitness = _Fitness(pipe, vocab, budget.tokens, budget.metric, budget.batch_size)
    log.info("%s: %d pairs, |c| = %.4g, %d candidate tokens (%d banned)", NAME, len(config.pairs),
             float(c.norm()), len(vocab), len(vocab.removed))

    def solve(target: Target) -> TargetResult:
        seed = target_seed(config, target)
        gen = torch.Generator().manual_seed(seed)
        plain = encode_texts(pipe, [target.prompt])[0].to(te.device)  # (L, D)
        goal = plain + budget.eta * c  # Eq. 4
        pop = vocab.sample((budget.population, budget.tokens), gen)
        fit = fitness(pop, goal)
        start = finite(fit.min(), NAME, target, 0)
        bar = tqdm(range(budget.generations), desc=f"{NAME} #{target.index}", leave=False, disable=not progress,
                   mininterval=1)
        for g in bar:
            order = fit.argsort()
            pop, fit = pop[order], fit[order]
            n_child = budget.population - budget.elite
            if n_child:
                child = _children(pop, n_child, budget, vocab, gen)
                pop = torch.cat([pop[: budget.elite], child])
                fit = torch.cat([fit[: budget.elite], fitness(child, goal)])
            best_now = finite(fit.min(), NAME, target, g + 1)
            bar.set_postfix(d=f"{best_now:.4g}")
        best = int(fit.argmin())
        rows = pop[best]
        tokens = vocab.ids[rows].tolist()
        _, _, content = compose(tok, tokens)
        plain_d = float(distance(plain[None], goal, budget.metric)[0])
        return TargetResult(
            index=target.index, target=target.prompt, seed=target.seed, attack=NAME, attack_seed=seed,
            prompt=vocab.text(rows), tokens=tokens, ids=content, objective=float(fit[best]), objective_start=start,
            objective_plain=plain_d, steps=budget.generations, seconds=0.0,
            extra={"metric": budget.metric, "concept_norm": float(c.norm()), "pairs": len(config.pairs)},
        )

    return run_targets(NAME, targets, config, solve, progress)
