"""MMA-Diffusion's text attack (Yang et al. 2024): greedy coordinate gradient over real tokens.

Find K real tokens p_adv whose text encoding matches the target prompt's, with the concept's own
words banned from the candidates (MMA removes its sensitive-word list from the vocabulary):

    min_{p_adv} L(p_adv) = 1 - cos( f(p_adv), f(p_target) )

where f is the text encoder's [EoT] hidden state (`match: pooled`, the pooled text feature MMA
matches) or the whole (L, D) sequence (`match: sequence`: the mean cosine over positions, i.e.
what the UNet cross-attends to). Greedy coordinate gradient (GCG, Zou et al. 2023) per step:

1. the gradient of L with respect to the one-hot token matrix (K x A candidates), through
   e = onehot @ E (E the candidates' input embeddings, substituted at the K slots);
2. for every slot, the `topk` candidates with the most negative gradient;
3. `candidates` prompts, each the current one with one random slot set to one of its top-k;
4. all candidates evaluated exactly (batched, no gradient); the best becomes current.

As in GCG the current prompt always moves to the best candidate; the best prompt seen is returned,
so the objective never ends above its starting point.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Budget:
    tokens: int = 20  # K (MMA-Diffusion: 20)
    steps: int = 1000
    topk: int = 256
    candidates: int = 512  # prompts evaluated per step
    match: str = "pooled"
    batch_size: int = 256  # prompts per text-encoder call
    restarts: int = 1  # independent searches per target, seeded apart (trce.attacks.base)

    def __post_init__(self) -> None:
        check_budget(self, NAME, positive=("tokens", "topk", "candidates", "batch_size"))
        choose(f"{NAME} match", self.match, MATCHES)


def _features(h: torch.Tensor, eos: torch.Tensor, match: str) -> torch.Tensor:
    """(B, L, D) hidden states -> (B, D) [EoT] states, or (B, L, D) unchanged for `sequence`."""
    if match == "pooled":
        return h[torch.arange(len(h), device=h.device), eos.to(h.device)]
    return h


def _loss(feat: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    """(B, ...) features vs (...) goal -> (B,) 1 - cosine (mean over positions for sequences)."""
    return 1 - F.cosine_similarity(feat.float(), goal.float()[None].expand_as(feat), dim=-1).reshape(len(feat), -1).mean(1)


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
    vocab = Vocabulary.for_pipeline(pipe, config.banned)
    table = full[vocab.ids.to(full.device)].float()  # (A, E): every encoder's embedding of each candidate
    base, slots, _ = compose(tok, [int(vocab.ids[0])] * budget.tokens)
    eos = torch.tensor([slots.stop])  # the [EoT] position right after the K tokens

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

    def solve(target: Target) -> TargetResult:
        seed = target_seed(config, target)
        gen = torch.Generator().manual_seed(seed)
        ids = tokenize(tok, [target.prompt])
        with torch.no_grad():
            goal = _features(fam.encode_ids(pipe, ids), first_eos(ids, tok.eos_token_id), budget.match)[0]
        rows = vocab.sample((budget.tokens,), gen)
        current = finite(evaluate(rows[None], goal)[0], NAME, target, 0)
        start, best, best_rows = current, current, rows.clone()
        k = min(budget.topk, len(vocab))
        bar = tqdm(range(budget.steps), desc=f"{NAME} #{target.index}", leave=False, disable=not progress,
                   mininterval=1)
        for step in bar:
            top = (-gradient(rows, goal)).topk(k, dim=1).indices  # (K, k) candidate rows per slot
            pos = torch.randint(budget.tokens, (budget.candidates,), generator=gen)
            pick = top[pos, torch.randint(k, (budget.candidates,), generator=gen)]
            cands = rows.repeat(budget.candidates, 1)
            cands[torch.arange(budget.candidates), pos] = pick
            losses = evaluate(cands, goal)
            j = int(losses.argmin())
            rows, current = cands[j], finite(losses[j], NAME, target, step + 1)
            if current < best:
                best, best_rows = current, rows.clone()
            bar.set_postfix(loss=f"{best:.4g}")
        tokens = vocab.ids[best_rows].tolist()
        _, _, content = compose(tok, tokens)
        return TargetResult(
            index=target.index, target=target.prompt, seed=target.seed, attack=NAME, attack_seed=seed,
            prompt=vocab.text(best_rows), tokens=tokens, ids=content, objective=best, objective_start=start,
            objective_plain=None, steps=budget.steps, seconds=0.0, extra={"match": budget.match},
        )

    with frozen(*fam.text_encoders(pipe)):
        return run_targets(NAME, targets, config, solve, progress)
