"""UnlearnDiffAtk (Zhang et al. 2024): a white-box attack through the model under test.

A prefix of k tokens is put before the target prompt P and optimised so that the model under
test, conditioned on [prefix; P], denoises images of the concept well again:

    min_prefix  (1/S) sum_s || eps_theta*( z_t_s , f([prefix; P]), t_s ) - eps_s ||^2,
    z_t_s = sqrt(abar_t_s) z0_s + sqrt(1 - abar_t_s) eps_s

(their Eq. 3; theta* is the erased model, f the text encoder). The images z0 are latents of the
concept drawn by the ORIGINAL model from P at the target's seed (`reference`: the original
pipeline, a callable target -> latents, or a mapping index -> latents (n, c, h, w)). S fixed
(image, t, noise) samples per target (`samples`, seeded) make the objective deterministic, so the
best prompt is well defined; t is uniform over the training timesteps.

Optimisation (PEZ, Wen et al. 2023, as UnlearnDiffAtk does): continuous prefix embeddings e; each
step projects e to the nearest candidate tokens (cosine), evaluates the objective and its gradient
*at the projection*, and applies that gradient to e (AdamW, `lr`, `weight_decay`). The returned
prefix is the best projected one seen, so the typed prompt is exactly what was scored. Candidates
are the real-token vocabulary minus the banned words (see `trce.attacks.base`).

`soft-prompt` (trce.attacks.soft_prompt) optimises the same objective with no projection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trce.attacks.base import (
    METRICS,
    AttackConfig,
    Target,
    TargetResult,
    Vocabulary,
    check_budget,
    compose,
    finite,
    frozen,
    project,
    restarts_of,
    run_targets,
    target_seed,
)
from trce.errors import TrceError, choose

log = logging.getLogger(__name__)

NAME = "unlearndiff"
LABEL = "typed prompt: white-box attack on the model under test"
TYPED = True
NEEDS_REFERENCE = True
_HINT = "lower the budget's lr"


@dataclass(frozen=True)
class Budget:
    tokens: int = 5  # k, the prefix length (UnlearnDiffAtk: 5)
    steps: int = 40  # (UnlearnDiffAtk: 40)
    lr: float = 0.01
    weight_decay: float = 0.1
    samples: int = 8  # fixed (image, t, noise) samples the objective averages over
    images: int = 1  # reference images per target
    reference_steps: int = 30  # DDIM steps of the reference images
    reference_guidance: float = 7.5  # for targets without their own guidance
    metric: str = "cosine"  # projection to the nearest token
    restarts: int = 1  # independent searches per target, seeded apart (trce.attacks.base)

    def __post_init__(self) -> None:
        check_budget(self, NAME, positive=("tokens", "lr", "samples", "images", "reference_steps"))
        choose(f"{NAME} metric", self.metric, METRICS)


# --------------------------------------------------------------------------- images of the concept
def image_seed(seed: int, k: int) -> int:
    """Seed of reference image k of a target: its own seed for k = 0 (the image `trce eval` makes)."""
    if k == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), k]).generate_state(1, dtype=np.uint32)[0])


@torch.no_grad()
def reference_latents(pipe, targets: Sequence[Target], *, steps: int = 30, guidance: float = 7.5, images: int = 1,
                      size: int | None = None) -> list[torch.Tensor]:
    """Per target, (images, c, h, w) fp32 latents the pipeline draws from its prompt (DDIM, seeded, with
    the target's own guidance where it has one, else `guidance`)."""
    from trce.families import family_of

    family = family_of(pipe)
    size = size or family.image_size(pipe)  # the model's native size (FluxPipeline's own default is another)
    out = []
    for t in targets:
        gens = [torch.Generator("cpu").manual_seed(image_seed(t.seed, k)) for k in range(images)]
        g = t.guidance if t.guidance is not None else guidance
        res = pipe(prompt=[t.prompt] * images, num_inference_steps=steps, guidance_scale=g, generator=gens,
                   height=size, width=size, output_type="latent", **family.draw_kwargs(pipe))
        out.append(family.latents_out(pipe, res.images, size).float().cpu())
    return out


def latents_for(reference, target: Target, budget, size: int | None) -> torch.Tensor:
    """The concept's latents (n, c, h, w) for one target from any accepted form of `reference`."""
    if reference is None:
        raise TrceError(f"{NAME} and soft-prompt need images of the concept made by the original model: pass "
                        "reference= (the original pipeline, a callable target -> latents, or index -> latents)")
    if hasattr(reference, "components"):  # a pipeline: the original model itself
        lat = reference_latents(reference, [target], steps=budget.reference_steps, guidance=budget.reference_guidance,
                                images=budget.images, size=size)[0]
    elif isinstance(reference, Mapping):
        if target.index not in reference:
            raise TrceError(f"no reference latents for target {target.index}")
        lat = reference[target.index]
    elif isinstance(reference, Callable):
        lat = reference(target)
    else:
        raise TrceError(f"reference must be a pipeline, a callable or a mapping, got {type(reference).__name__}")
    lat = torch.as_tensor(lat).float()
    return lat[None] if lat.dim() == 3 else lat


def per_target(reference, budget, size: int | None):
    """`reference` drawn once per target for all of its restarts (a one-target memo; a mapping is passed as it is)."""
    if reference is None or isinstance(reference, Mapping):
        return reference
    memo: dict = {}

    def draw(target: Target) -> torch.Tensor:
        key = (target.index, target.prompt, target.seed, target.guidance)
        if key not in memo:
            memo.clear()
            memo[key] = latents_for(reference, target, budget, size)
        return memo[key]

    return draw


class Denoising:
    """The objective on S fixed samples: mean || eps_theta(z_t, cond, t) - target ||^2 (Eq. 3).

    The regression target is the noise for epsilon-prediction models and the velocity for
    v-prediction ones (as the model was trained).
    """

    def __init__(self, pipe, latents: torch.Tensor, samples: int, gen: torch.Generator):
        from trce.families import family_of

        self.family = family_of(pipe)
        denoiser = self.family.denoiser(pipe)
        channels = self.family.latent_shape(pipe)[0]
        if latents.shape[1] != channels:
            raise TrceError(f"reference latents have {latents.shape[1]} channels, the denoiser takes {channels}")
        idx = torch.arange(samples) % len(latents)
        z0 = latents[idx]  # (S, c, h, w)
        t = torch.randint(pipe.scheduler.config.num_train_timesteps, (samples,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        zt, goal = self.family.noised(pipe, z0, eps, t)  # the regression target in the model's parameterisation
        dev, dt = denoiser.device, denoiser.dtype
        self.denoiser = denoiser
        self.zt, self.t, self.goal = zt.to(dev, dt), t.to(dev), goal.to(dev).float()

    def __call__(self, cond: torch.Tensor) -> torch.Tensor:
        """cond (1, L, D) -> scalar fp32 loss (differentiable in cond)."""
        pred = self.family.predict(self.denoiser, self.zt, self.t, cond.expand(len(self.zt), -1, -1))
        return F.mse_loss(pred.float(), self.goal)


class WhiteBox:
    """What unlearndiff and soft-prompt share per target: the prefix slots, the objective, the start."""

    def __init__(self, pipe, vocab: Vocabulary, table: torch.Tensor, config: AttackConfig, target: Target,
                 reference, attack: str):
        from trce.families import family_of
        from trce.tokens import tokenize

        fam = family_of(pipe)
        budget = config.budget
        self.pipe, self.vocab, self.table, self.target, self.attack = pipe, vocab, table, target, attack
        self.family, tokenizer = fam, fam.tokenizer(pipe)
        self.seed = target_seed(config, target)
        self.gen = torch.Generator().manual_seed(self.seed)
        latents = latents_for(reference, target, budget, config.size)
        self.objective = Denoising(pipe, latents, budget.samples, self.gen)
        self.rows = vocab.sample((budget.tokens,), self.gen)  # (k,) the starting prefix
        self.ids, self.slots, _ = compose(tokenizer, vocab.ids[self.rows].tolist(), target.prompt)
        with torch.no_grad():
            plain = fam.encode_ids(pipe, tokenize(tokenizer, [target.prompt]))
            self.plain = finite(self.objective(plain), attack, target, 0, _HINT)

    def cond(self, embeds: torch.Tensor) -> torch.Tensor:
        """(k, D) prefix embeddings -> (1, L, D) text encoding of [prefix; prompt]."""
        return self.family.encode_ids(self.pipe, self.ids[None], self.slots, embeds[None])

    def loss(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.objective(self.cond(embeds))


def candidate_table(pipe, vocab: Vocabulary) -> torch.Tensor:
    """(A, D) fp32 input embeddings of the candidate tokens."""
    from trce.families import family_of

    w = family_of(pipe).input_table(pipe).detach()
    return w[vocab.ids.to(w.device)].float()


def attack(pipe, targets: Sequence[Target | str], config: AttackConfig, *, reference=None,
           progress: bool = True) -> list[TargetResult]:
    """UnlearnDiffAtk against `pipe` (the model under test) for every target (see the module doc).

    `reference`: the original model's images of each target's concept (pipeline, callable or mapping).
    """
    config = config.with_budget(Budget, NAME)
    budget: Budget = config.budget
    from trce.families import family_of

    fam = family_of(pipe)
    tok = fam.tokenizer(pipe)
    vocab = Vocabulary.for_pipeline(pipe, config.banned)
    table = candidate_table(pipe, vocab)
    if restarts_of(budget) > 1:
        reference = per_target(reference, budget, config.size)

    def solve(target: Target) -> TargetResult:
        wb = WhiteBox(pipe, vocab, table, config, target, reference, NAME)
        cont = table[wb.rows].clone().requires_grad_(True)  # (k, D) continuous prefix
        opt = torch.optim.AdamW([cont], lr=budget.lr, weight_decay=budget.weight_decay)
        start = best = float("inf")
        best_rows = wb.rows
        bar = tqdm(range(budget.steps + 1), desc=f"{NAME} #{target.index}", leave=False, disable=not progress,
                   mininterval=1)
        for step in bar:
            rows = project(cont, table, budget.metric)  # (k,) nearest candidates
            point = table[rows].clone().requires_grad_(step < budget.steps)
            with torch.set_grad_enabled(step < budget.steps):
                loss = wb.loss(point)
            value = finite(loss, NAME, target, step, _HINT)
            if step == 0:
                start = value
            if value < best:
                best, best_rows = value, rows.clone()
            bar.set_postfix(loss=f"{best:.4g}")
            if step == budget.steps:  # the last update's projection is scored, not stepped from
                break
            (grad,) = torch.autograd.grad(loss, point)
            cont.grad = grad.to(cont.dtype)  # straight-through: the projection's gradient moves e
            opt.step()
            opt.zero_grad(set_to_none=True)
        tokens = vocab.ids[best_rows].tolist()
        _, _, content = compose(tok, tokens, target.prompt)
        return TargetResult(
            index=target.index, target=target.prompt, seed=target.seed, attack=NAME, attack_seed=wb.seed,
            prompt=f"{vocab.text(best_rows)} {target.prompt}", tokens=tokens, ids=content, objective=best,
            objective_start=start, objective_plain=wb.plain, steps=budget.steps, seconds=0.0,
            extra={"metric": budget.metric, "samples": budget.samples},
        )

    with frozen(*fam.text_encoders(pipe), fam.denoiser(pipe)):
        return run_targets(NAME, targets, config, solve, progress)
