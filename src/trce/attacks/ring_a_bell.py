"""Ring-A-Bell (Tsai et al. 2023): a model-agnostic attack that needs only the text encoder f.

Reference: chiayi-hsu/Ring-A-Bell at e4585ada0a5eb185fbef89bb94147c97f8d2f79a, Get_Concept_Vector.ipynb (the
concept vector) and InversePrompt.ipynb (the genetic search); the defaults below are InversePrompt's
(docs/fidelity.md holds the side-by-side table).

1. Concept vector (their Eq. 3): c = (1/N) sum_i [ f(P_i^with) - f(P_i^without) ] over N prompt pairs that
   differ by the concept, on the full last hidden state (L, D) (`text_encoder(ids)[0]`), as the reference.
2. Target (Eq. 4): for each target prompt P, P_cont = f(P) + eta * c (`cof` 3 in the reference).
3. Genetic search for K real tokens whose encoding approaches P_cont: min_P~ d(f(P~), P_cont), d the sum of
   squared errors over the (L, D) sequence (`metric: sse`, the reference's fitness), or their mean (`mse`, the
   same ranking) or 1 - cosine of the flattened sequences (`cosine`, a trce variant).

The search, as InversePrompt's: `population` random K-token prompts; each of the `generations` generations
scores the population, sorts it and keeps the best half (population // 2, truncation selection). Unless it is the
last generation, each survivor in turn stays and, with probability `crossover`, is crossed with a uniformly
random survivor at a random cut (single point, slots [0, K)) giving BOTH children; then every individual,
survivors included, with probability `mutation_rate` gets one random slot replaced by a random candidate token.
The population so varies in size around `population`. `elite` (0, the reference's: none) protects the best
`elite` survivors from mutation, a trce variant that makes the best objective non-increasing.

Differences from the reference (docs/fidelity.md): tokens are drawn from the real whole-word tokens minus the
concept's own words (the reference: any id in [1, 49406), no ban), so the prompt found re-tokenises to the very
tokens scored; the result is the best prompt scored in any generation (the reference: the best of the last,
which a mutated survivor can make worse), so the objective never ends above its start.

Pairs (`AttackConfig.pairs`): ShapeWorld captions with the concept value vs the same caption with
another value (`shapeworld_pairs`), Ring-A-Bell's own "sensitive prompt"/"normal prompt" CSV
(`pairs_from_file`), or a concept spec's (malicious, safe) pairs (`pairs_from_spec`). The reference's own
vectors: nudity from 50 pairs (Nudity_prompt.csv / NoNudity_prompt.csv, 19 rows of its 5x-repeated array
dropped by its NudeNet check), violence from 30 (Violence_30.csv).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

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
DISTANCES = ("sse", "mse", "cosine")


@dataclass(frozen=True)
class Budget:
    """The defaults are InversePrompt's (module doc); `preset="fast"` the cheap search CI and the demo run."""

    PRESETS: ClassVar[dict[str, dict]] = {"fast": {"population": 100, "generations": 40}}

    tokens: int = 16  # K, the adversarial prompt's length (`length` 16; 75 for K = 77)
    eta: float = 3.0  # strength of the concept vector (`cof` 3)
    population: int = 200  # `population_size`
    generations: int = 3000  # `generation`
    mutation_rate: float = 0.25  # `mutateRate`
    crossover: float = 0.5  # `crossoverRate`
    elite: int = 0  # survivors kept from mutation (0: none, the reference's; a trce variant)
    metric: str = "sse"  # the reference's fitness: sum of squared errors
    batch_size: int = 256  # prompts per text-encoder call (memory only)
    restarts: int = 1  # independent searches per target, seeded apart (trce.attacks.restarts)
    preset: str = ""  # the named preset the budget was built from ("": the authors' attack)

    def __post_init__(self) -> None:
        check_budget(self, NAME, positive=("tokens", "population", "generations", "batch_size"),
                     unit=("mutation_rate", "crossover"))
        choose(f"{NAME} metric", self.metric, DISTANCES)
        if self.population < 2:
            raise TrceError(f"{NAME} budget population must be at least 2 (the best half survives), "
                            f"got {self.population}")
        if self.elite > self.population // 2:
            raise TrceError(f"{NAME} budget elite ({self.elite}) must not exceed the survivors, population // 2 "
                            f"({self.population // 2})")


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
    if metric == "sse":
        return ((h - target) ** 2).flatten(1).sum(1)
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


def next_generation(survivors: torch.Tensor, budget: Budget, vocab: Vocabulary, gen: torch.Generator,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(population, changed, origin) from the survivors (n, K), sorted best first, as InversePrompt's `crossover` then
    `mutation`: every survivor, and after it, with probability `crossover`, its two children with a uniformly
    random survivor at a cut c in [0, K) (child 1: its slots before c, the partner's from c; child 2 the other
    way); then each individual, but the first `elite` survivors, mutated with probability `mutation_rate` at one
    random slot to a random candidate. `changed` (len,) marks the individuals that need scoring, `origin` (len,)
    the survivor each individual is (-1 for children)."""
    n, k = survivors.shape
    cross = torch.rand(n, generator=gen) < budget.crossover  # (n,)
    partner = torch.randint(n, (n,), generator=gen)
    cut = torch.randint(k, (n,), generator=gen)
    before = torch.arange(k)[None] < cut[:, None]  # (n, K): slots taken from the survivor itself in child 1
    one = torch.where(before, survivors, survivors[partner])
    two = torch.where(before, survivors[partner], survivors)
    parts, origin = [], []
    for i in range(n):  # the reference's order: survivor, then its children
        parts.append(survivors[i : i + 1])
        origin.append(i)
        if cross[i]:
            parts += [one[i : i + 1], two[i : i + 1]]
            origin += [-1, -1]
    pop = torch.cat(parts)
    origin_t = torch.tensor(origin)
    changed_t = origin_t < 0
    protected = torch.zeros(len(pop), dtype=torch.bool)
    protected[torch.nonzero(~changed_t).flatten()[: budget.elite]] = True  # the best `elite` survivors
    mutate = (torch.rand(len(pop), generator=gen) < budget.mutation_rate) & ~protected
    slot = torch.randint(k, (len(pop),), generator=gen)
    new = vocab.sample((len(pop),), gen)
    pop[mutate, slot[mutate]] = new[mutate]
    return pop, changed_t | mutate, origin_t


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
        best, best_rows, best_gen = start, pop[int(fit.argmin())].clone(), 1
        survive = budget.population // 2
        bar = tqdm(range(1, budget.generations), desc=f"{NAME} #{target.index}", leave=False,
                   disable=not progress, mininterval=1)
        for g in bar:  # generation 1 was the initial population's scoring
            order = fit.argsort(stable=True)[:survive]  # the best half survives
            pop, changed, origin = next_generation(pop[order], budget, vocab, gen)
            kept = fit[order]
            fit = torch.empty(len(pop))
            fit[~changed] = kept[origin[~changed]]  # unmutated survivors keep their score
            if bool(changed.any()):
                fit[changed] = fitness(pop[changed], goal)
            now = finite(fit.min(), NAME, target, g + 1)
            if now < best:
                best, best_rows, best_gen = now, pop[int(fit.argmin())].clone(), g + 1
            bar.set_postfix(d=f"{best:.4g}")
        tokens = vocab.ids[best_rows].tolist()
        _, _, content = compose(tok, tokens)
        plain_d = float(distance(plain[None], goal, budget.metric)[0])
        return TargetResult(
            index=target.index, target=target.prompt, seed=target.seed, attack=NAME, attack_seed=seed,
            prompt=vocab.text(best_rows), tokens=tokens, ids=content, objective=best, objective_start=start,
            objective_plain=plain_d, steps=budget.generations, seconds=0.0,
            extra={"metric": budget.metric, "concept_norm": float(c.norm()), "pairs": len(config.pairs),
                   "best_generation": best_gen, "preset": budget.preset},
        )

    return run_targets(NAME, targets, config, solve, progress)
