"""Hardened stage T: the attacker in the loop (`robust=R`), and RECE's iterated closed form.

Stage T solves Eq. 5 once on the spec's prompts. An attacker who can choose the text encoder's *input* can
still find a state e that the edited layers read as the concept. Hardening runs R rounds of

    1. find adversarial states that bring the concept back on the CURRENT edited model (W T):
       - closed form (RECE, Gong et al. 2024, Eq. 8): for each erase row e_c, the state whose keys and values
         under the edit are closest to what the ORIGINAL layers made of e_c,
             e* = argmin_e  Σ_l ||W_l T e − W_l e_c||² + λ ||e||²  =  (Tᵀ G T + λ I)⁻¹ Tᵀ G e_c,
         with G = Σ_l W_lᵀ W_l over every layer the token input reaches (one D x D matrix), and λ relative to
         tr(Tᵀ G T) / D as stage T's ridge is;
       - white box (`soft`): the soft-prompt attack (UnlearnDiffAtk's denoising objective with k free input
         vectors before the prompt) against the edited model on `robust_prompts` malicious prompts of the
         spec; the text encoder's state at the edited role ([EoT]) of [prefix; prompt] is the adversarial row;
    2. add those rows to the erase rows, each mapped to its pair's safe row e_s, and
    3. re-solve Eq. 5 with the unchanged preservation prior.

Adversarial inputs are found on prompts of the spec only (never an evaluation suite's), with seeds of their own.
The soft-prompt attack (`soft_attack`, `reference_latents_for`) also hardens stage V (`trce.methods.stage_v`), which
trains on the full conditioning of [prefix; prompt] rather than on its [EoT] row.
RECE itself (`--method rece`) is `trce.methods.uce`: UCE, then RECE's adversaries over every position of the concept
prompt with an absolute λ, as its authors' code computes them. The loop here around the [KEY] ablation (`trce-key`,
`robust=3, robust_attack=closed-form`) is what trce called RECE before: keyword rows, relative λ. The pooled path (SDXL, SD3, FLUX) is solved once, as without hardening: the attacks here act on token
states.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from trce.concepts import Pair
from trce.edit import Edit, resolve
from trce.errors import TrceError
from trce.families import family_of

log = logging.getLogger(__name__)

ADVERSARIES = ("closed-form", "soft", "closed-form+soft")

# The most hardening rounds a run may ask for. Each round searches adversaries against the edited model, then
# re-solves (stage T, RECE) or trains on them (stage V): seconds to about a minute a round, so 100 rounds is already
# an hour or more; a larger count is a typo (`--robust 1000000`: weeks), not a plan.
MAX_ROUNDS = 100


def check_rounds(rounds, where: str = "robust", field: str | None = None) -> None:
    """Refuse more than `MAX_ROUNDS` hardening rounds (`where` names the setting: "robust", "setting V.robust")."""
    if isinstance(rounds, int) and not isinstance(rounds, bool) and rounds > MAX_ROUNDS:
        raise TrceError(f"{where} must be at most {MAX_ROUNDS}, got {rounds}: each hardening round searches "
                        "adversaries against the edited model and re-solves or retrains on them, seconds to a minute "
                        f"a round ({MAX_ROUNDS} rounds is already an hour or more)", field=field)


def layer_gram(pipe, paths: Sequence[str], columns: tuple[int, int] | None = None) -> torch.Tensor:
    """G = Σ_l W_lᵀ W_l (D x D, float64) over the token input's layers (original weights)."""
    gram = None
    for path in paths:
        w = resolve(pipe, path).detach().to("cpu", torch.float64)  # (out, D)
        if columns is not None:
            w = w[:, columns[0]:columns[1]]
        g = w.T @ w
        gram = g if gram is None else gram + g
    return gram


def closed_form_adversaries(gram: torch.Tensor, t: torch.Tensor, em: torch.Tensor, reg: float) -> torch.Tensor:
    """RECE's adversarial states (n, D) for erase rows `em` (n, D) against W' = W T (see the module doc)."""
    width = gram.shape[0]
    a = t.T @ gram @ t  # (D, D) Tᵀ G T
    lam = reg * float(torch.trace(a)) / width
    rhs = t.T @ gram @ em.T  # (D, n)
    return torch.linalg.solve(a + lam * torch.eye(width, dtype=a.dtype), rhs).T  # (n, D)


def concept_distance(gram: torch.Tensor, t: torch.Tensor, rows: torch.Tensor, em: torch.Tensor,
                     es: torch.Tensor) -> float:
    """Σ_l ||W_l T e* − W_l e_c||² / Σ_l ||W_l e_s − W_l e_c||² over the rows: how much of the erased gap the
    adversarial rows leave open (0: the edited layers read them exactly as the concept; 1: as far as the safe
    prompt is)."""
    d = rows @ t.T - em  # (n, D)
    g = es - em
    num = torch.einsum("nd,de,ne->", d, gram, d)
    den = torch.einsum("nd,de,ne->", g, gram, g)
    return float(num / den) if den > 0 else 0.0


def pick_pairs(pairs: Sequence[Pair], n: int, seed: int, round_: int) -> list[int]:
    """`n` pair indices for one hardening round (seeded; different each round)."""
    rng = np.random.default_rng([seed, 60013, round_])
    return sorted(rng.choice(len(pairs), size=min(n, len(pairs)), replace=False).tolist())


def soft_attack(pipe, edit: Edit | None, prompts: Sequence[str], picked: Sequence[int], *, tokens: int, steps: int,
                samples: int, lr: float, seed: int, reference: dict, progress: bool, results: str | Path | None = None,
                size: int | None = None) -> list:
    """Soft-prompt attacks (UnlearnDiffAtk's denoising objective, k free input vectors before the prompt) against
    `pipe` with `edit` applied (None: `pipe` as it is) on `prompts[i]` for i in `picked`; `reference` maps i to the
    ORIGINAL model's latents of prompts[i] (`reference_for`). Returns the `TargetResult`s in `picked`'s order; each
    carries `embeds["prompt_embeds"]` (L(+1), D), the text encoder's full conditioning of [prefix; prompt] as the
    denoiser reads it. `results`: the attack's JSONL (resume, and the work split under `accelerate launch`)."""
    from trce.attacks import soft_prompt
    from trce.attacks.base import AttackConfig
    from trce.attacks.targets import Target

    targets = [Target(index=i, prompt=prompts[i], seed=int(seed) * 100003 + i) for i in picked]
    budget = soft_prompt.Budget(tokens=tokens, steps=steps, lr=lr, samples=samples)
    config = AttackConfig(budget=budget, seed=seed, results=results, size=size)
    with edit.applied(pipe, check_base=False) if edit is not None else contextlib.nullcontext():
        return soft_prompt.attack(pipe, targets, config, reference=reference, progress=progress)


def soft_adversaries(pipe, edit: Edit, pairs: Sequence[Pair], picked: Sequence[int], *, tokens: int, steps: int,
                     samples: int, lr: float, seed: int, reference: dict, progress: bool) -> tuple[torch.Tensor, list]:
    """Soft-prompt attacks against `pipe` with `edit` applied on the malicious prompts of `picked` pairs; returns
    ((n, D) text states at the [EoT] of [prefix; prompt], per-attack records)."""
    from trce.attacks.base import compose
    from trce.tokens import first_eos

    fam = family_of(pipe)
    tok = fam.tokenizer(pipe)
    prompts = [p.malicious for p in pairs]
    results = soft_attack(pipe, edit, prompts, picked, tokens=tokens, steps=steps, samples=samples, lr=lr, seed=seed,
                          reference=reference, progress=progress)
    rows, records = [], []
    for i, res in zip(picked, results):
        ids, _, _ = compose(tok, [tok.bos_token_id] * tokens, prompts[i])
        pos = int(first_eos(ids[None], tok.eos_token_id)[0])
        cond = res.embeds["prompt_embeds"][None]  # (1, L(+1), D) as the family conditions
        rows.append(fam.token_part(cond)[0, pos].double())
        records.append({"pair": i, "objective": res.objective, "objective_plain": res.objective_plain})
    return torch.stack(rows), records


def reference_for(pipe, pairs: Sequence[Pair], indices: Sequence[int], seed: int, steps: int,
                  guidance: float) -> dict[int, torch.Tensor]:
    """The ORIGINAL model's latents of each picked malicious prompt (what the soft prompts must bring back)."""
    return reference_latents_for(pipe, [p.malicious for p in pairs], indices, seed, steps, guidance)


def reference_latents_for(pipe, prompts: Sequence[str], indices: Sequence[int], seed: int, steps: int,
                          guidance: float, size: int | None = None) -> dict[int, torch.Tensor]:
    """{i: (1, C, h, w) latents `pipe` draws from prompts[i]} for i in `indices` (seeded by `seed` and i): pass the
    ORIGINAL model, whose images of the concept the soft prompts must bring back."""
    from trce.attacks.targets import Target
    from trce.attacks.unlearndiff import reference_latents

    targets = [Target(index=i, prompt=prompts[i], seed=int(seed) * 100003 + i) for i in indices]
    lat = reference_latents(pipe, targets, steps=steps, guidance=guidance, size=size)
    return {t.index: x for t, x in zip(targets, lat)}


def harden(pipe, *, pairs: Sequence[Pair], em: torch.Tensor, es: torch.Tensor, row_pair: torch.Tensor,
           cov: torch.Tensor, t: torch.Tensor, solve, make_edit, config, paths: Sequence[str], seed: int,
           progress: bool, gram: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """R rounds of find-adversaries / re-solve (the module doc); returns the final T and the rounds' record.

    em, es: (n, D) erase rows and their safe rows; row_pair: (n,) the pair of each row; solve(em, es) -> (T, diag);
    make_edit(T) -> the Edit of the token input's layers under T.
    """
    gram = layer_gram(pipe, paths) if gram is None else gram  # (D, D) Σ W_lᵀ W_l
    kinds = config.robust_attack.split("+")
    rounds = []
    reference = None
    for r in range(int(config.robust)):
        t0 = time.perf_counter()
        new_m, new_s, record = [], [], {"round": r + 1}
        if "closed-form" in kinds:
            adv = closed_form_adversaries(gram, t, em[: len(row_pair)], config.robust_reg)
            record["closed_form"] = {"rows": int(adv.shape[0]), "concept_distance": concept_distance(
                gram, t, adv, em[: len(row_pair)], es[: len(row_pair)])}
            new_m.append(adv)
            new_s.append(es[: len(row_pair)])
        if "soft" in kinds:
            picked = pick_pairs(pairs, config.robust_prompts, seed, r)
            if reference is None:
                every = sorted({i for q in range(int(config.robust)) for i in pick_pairs(pairs, config.robust_prompts,
                                                                                        seed, q)})
                reference = reference_for(pipe, pairs, every, seed, config.robust_reference_steps,
                                          config.robust_guidance)
            edit = make_edit(t)
            adv, recs = soft_adversaries(pipe, edit, pairs, picked, tokens=config.robust_tokens,
                                         steps=config.robust_steps, samples=config.robust_samples,
                                         lr=config.robust_lr, seed=seed + 7919 * (r + 1), reference=reference,
                                         progress=progress)
            safe = torch.stack([es[int((row_pair == i).nonzero()[0])] for i in picked])  # each pair's (first) safe row
            record["soft"] = {"rows": int(adv.shape[0]),
                              "objective": float(np.mean([x["objective"] for x in recs])),
                              "objective_plain": float(np.mean([x["objective_plain"] for x in recs]))}
            new_m.append(adv)
            new_s.append(safe)
        em = torch.cat([em, *new_m])
        es = torch.cat([es, *new_s])
        t, diag = solve(em, es)
        record.update({"embeddings": int(em.shape[0]), "erase_residual": diag["erase_residual"],
                       "preserve_drift": diag["preserve_drift"], "seconds": time.perf_counter() - t0})
        log.info("hardening round %d: %s", r + 1, record)
        rounds.append(record)
    return t, {"rounds": rounds, "attack": config.robust_attack}
