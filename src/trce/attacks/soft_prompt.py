"""Soft prompt: UnlearnDiffAtk's objective with free continuous embeddings (no projection).

The k prefix vectors before the target prompt are any vectors at all (Adam, `lr`), not token
embeddings, so the result is not a prompt anyone can type: it measures how much of the concept is
still in the weights ("knowledge left"; cf. Pham et al. 2024, concept inversion), the worst case
for an erasure, not a threat from typed prompts. Reports label it so (`LABEL`).

Objective, samples and reference images: exactly those of `trce.attacks.unlearndiff` (Eq. 3
there). The prefix starts at the embeddings of k random candidate tokens; the best prefix seen is
returned. Each result carries `embeds`: `prompt_embeds` (L, D), the text encoding of
[prefix; prompt] that `pipe(prompt_embeds=...)` generates from (see `generate`), and
`token_embeds` (k, D), the prefix itself; with a results file they are saved to
`embeddings/{index:05d}.safetensors` beside it. `extra["nearest"]` is the text of the tokens
nearest to the prefix (cosine), for a look only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from trce.attacks.base import (
    AttackConfig,
    Target,
    TargetResult,
    Vocabulary,
    check_budget,
    embeddings_file,
    finite,
    frozen,
    project,
    restarts_of,
    run_targets,
)
from trce.attacks.unlearndiff import WhiteBox, candidate_table, per_target
from trce.utils import io

log = logging.getLogger(__name__)

NAME = "soft-prompt"
LABEL = "knowledge left: free soft-prompt embeddings (not a typed prompt; the worst case, not a typed-prompt threat)"
TYPED = False
NEEDS_REFERENCE = True
_HINT = "lower the budget's lr"


@dataclass(frozen=True)
class Budget:
    tokens: int = 5  # k soft vectors before the prompt
    steps: int = 100
    lr: float = 0.01
    samples: int = 8
    images: int = 1
    reference_steps: int = 30
    reference_guidance: float = 7.5
    restarts: int = 1  # independent searches per target, seeded apart (trce.attacks.restarts)

    def __post_init__(self) -> None:
        check_budget(self, NAME, positive=("tokens", "lr", "samples", "images", "reference_steps"))


def placeholder(index: int) -> str:
    """The text that stands for soft prompt `index` in prompt files (it is not what the model sees)."""
    return f"<soft-prompt {index:05d}>"


def attack(pipe, targets: Sequence[Target | str], config: AttackConfig, *, reference=None,
           progress: bool = True) -> list[TargetResult]:
    """Optimise a free k-vector prefix per target against `pipe` (see the module doc).

    `reference`: the original model's images of each target's concept (as for unlearndiff).
    """
    config = config.with_budget(Budget, NAME)
    budget: Budget = config.budget
    from trce.families import family_of

    fam = family_of(pipe)
    vocab = Vocabulary.for_pipeline(pipe, config.banned)
    table = candidate_table(pipe, vocab)
    if restarts_of(budget) > 1:
        reference = per_target(reference, budget, config.size)

    def solve(target: Target) -> TargetResult:
        wb = WhiteBox(pipe, vocab, table, config, target, reference, NAME)
        soft = table[wb.rows].clone().requires_grad_(True)  # (k, D)
        opt = torch.optim.Adam([soft], lr=budget.lr)
        start = best = float("inf")
        best_soft = soft.detach().clone()
        bar = tqdm(range(budget.steps + 1), desc=f"{NAME} #{target.index}", leave=False, disable=not progress,
                   mininterval=1)
        for step in bar:
            last = step == budget.steps
            with torch.set_grad_enabled(not last):
                loss = wb.loss(soft)
            value = finite(loss, NAME, target, step, _HINT)
            if step == 0:
                start = value
            if value < best:
                best, best_soft = value, soft.detach().clone()
            bar.set_postfix(loss=f"{best:.4g}")
            if last:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            prompt_embeds = wb.cond(best_soft)[0].float().cpu()  # (L, D)
        embeds = {"prompt_embeds": prompt_embeds, "token_embeds": best_soft.float().cpu()}
        path, rel = embeddings_file(config, target)
        if path is not None:
            io.save_tensors(path, embeds, {"target": target.prompt, "seed": str(target.seed), "attack": NAME})
        return TargetResult(
            index=target.index, target=target.prompt, seed=target.seed, attack=NAME, attack_seed=wb.seed,
            prompt=None, tokens=[], ids=[], objective=best, objective_start=start, objective_plain=wb.plain,
            steps=budget.steps, seconds=0.0, embeddings=rel, embeds=embeds,
            extra={"nearest": vocab.text(project(best_soft, table)), "label": "knowledge left"},
        )

    with frozen(*fam.text_encoders(pipe), fam.denoiser(pipe)):
        return run_targets(NAME, targets, config, solve, progress)
