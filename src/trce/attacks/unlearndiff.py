"""UnlearnDiffAtk (Zhang et al. 2024): a white-box attack through the model under test.

A prefix of k tokens is put before the target prompt P and optimised so that the model under
test, conditioned on [prefix; P], denoises an image of the concept well again:

    min_prefix  || eps_theta*( z_t , f([prefix; P]), t ) - eps ||^2,
    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps

(their Eq. 3; theta* is the erased model, f the text encoder). z0 is a latent of the concept drawn
by the ORIGINAL model from P at the target's seed (`reference`: the original pipeline, a callable
target -> latents, or a mapping index -> latents (n, c, h, w)).

The default budget is the attack as its authors ran it (OPTML-Group/Diffusion-MU-Attack at commit
5a3e5d37fb8787113e5d479204ab593a60e303e0: configs/nudity/text_grad_esd_nudity_classifier.json,
src/attackers/text_grad_.py, src/tasks/classifier_.py; the table is in docs/fidelity.md):

- a relaxed distribution p (k, A) over the candidate tokens, started uniform; each step samples one
  token per slot from p (`torch.multinomial`), types its one-hot, and passes the gradient with
  respect to the one-hot straight through to p, clipped to [-1, 1] (hardtanh; their `STERandSelect`);
  Adam (`lr` 0.01, `weight_decay` 0.1, L2 added to the gradient as torch's Adam does), then p is
  projected back onto the probability simplex (exactly, by sorting; theirs bisects to 1e-5);
- `blocks` (50) timestep blocks, t = T/(2n), T/(2n) + T/n, ... ascending (10, 30, ..., 990 for
  T = 1000, n = 50), `steps` (40) steps in each, each step with FRESH noise eps and a batch of one;
- after each block the prompt typed from argmax p is drawn and judged (`judge`), and the search
  stops at the first success: up to `blocks` chances per target. Before the first block the plain
  target prompt is judged, and a target whose plain prompt already succeeds is not attacked
  (their `run`: `return 0`): its result is the plain prompt, with 0 steps.

`judge(target, prompt) -> bool` (the suite's detector on the image `trce eval` would draw from
`prompt` at the target's seed and guidance) is given by `trce attack` / `trce.attack`. Without a
judge (plain Python use) every block runs and the result is the block prompt with the lowest
scoring objective (below). `TargetResult.steps` is the number of optimisation steps actually run
(blocks run x steps); `extra` records the blocks run, the block that succeeded (`success_block`,
None when none did; 0 for the plain prompt), each block's timestep, summed training loss and score.

Scoring (trce's addition, for `objective` and the no-judge pick): the mean of Eq. 3 over `samples`
fixed (image, t, noise) draws per target (seeded), at the prefix typed from argmax p. The reference
logs only each block's summed training loss, which is not comparable across timesteps.

Candidates are the real-token vocabulary minus the banned words (see `trce.attacks.vocabulary`), not the
reference's whole tokenizer vocabulary (special tokens, sub-word pieces and the concept's own words
included): a typed prompt must re-tokenise to what was scored, and may not spell the concept.

Preset `fast` (`--budget preset=fast`): trce's earlier cheap search, PEZ (Wen et al. 2023): continuous
prefix embeddings e; each of `steps` steps (40 in all) projects e to the nearest candidate tokens
(`metric`), evaluates the scoring objective and its gradient *at the projection*, and applies that
gradient to e (AdamW, `lr`, `weight_decay`); the best projected prefix is returned, unjudged.

`soft-prompt` (trce.attacks.soft_prompt) optimises the scoring objective with free embeddings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

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
JUDGED = True  # `attack` takes judge=: the authors' search stops at its first judged success
_HINT = "lower the budget's lr"
SEARCHES = ("relaxed", "pez")  # the authors' relaxed-distribution search; trce's earlier PEZ search (preset fast)


@dataclass(frozen=True)
class Budget:
    """The default is the reference's budget (the module doc); `preset="fast"` is trce's earlier PEZ search."""

    PRESETS: ClassVar[dict[str, dict]] = {"fast": {"search": "pez", "blocks": 1}}

    tokens: int = 5  # k, the prefix length (UnlearnDiffAtk: 5)
    steps: int = 40  # steps per timestep block (UnlearnDiffAtk: 40); pez: steps in all
    lr: float = 0.01
    weight_decay: float = 0.1
    samples: int = 8  # fixed (image, t, noise) samples of the scoring objective (pez: its objective)
    images: int = 1  # reference images per target
    reference_steps: int = 30  # DDIM steps of the reference images
    reference_guidance: float = 7.5  # for targets without their own guidance
    metric: str = "cosine"  # pez: projection to the nearest token
    blocks: int = 50  # timestep blocks, each judged (UnlearnDiffAtk: 50); unused by pez
    search: str = "relaxed"  # relaxed (the authors') or pez (preset fast)
    restarts: int = 1  # independent searches per target, seeded apart (trce.attacks.restarts)
    preset: str = ""  # the named preset the budget was built from ("": the authors' attack)

    def __post_init__(self) -> None:
        check_budget(self, NAME, positive=("tokens", "lr", "samples", "images", "reference_steps", "blocks"))
        choose(f"{NAME} metric", self.metric, METRICS)
        choose(f"{NAME} search", self.search, SEARCHES)


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
        self.latents = latents_for(reference, target, budget, config.size)  # (n, c, h, w) images of the concept
        self.objective = Denoising(pipe, self.latents, budget.samples, self.gen)
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


def timesteps(blocks: int, train_timesteps: int) -> list[int]:
    """The reference's timestep of each block: T/(2n), then every T/n, ascending (`classifier_.py:69-70`)."""
    step = train_timesteps // blocks
    if step < 1:
        raise TrceError(f"{NAME} blocks must be at most the {train_timesteps} training timesteps, got {blocks}")
    return list(range(step // 2, train_timesteps, step))[:blocks]


def simplex(v: torch.Tensor) -> torch.Tensor:
    """Each row of v (k, A) projected (Euclidean) onto the probability simplex, exactly (sort and threshold)."""
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    ind = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = ((u - css / ind) > 0).to(v.dtype).mul(ind).amax(-1, keepdim=True)  # the last index kept
    theta = css.gather(-1, rho.long() - 1) / rho
    return (v - theta).clamp_min(0)


class StraightThrough(torch.autograd.Function):
    """Forward: one token per row sampled from p (k, A), as one-hots; backward: the gradient with respect to the
    one-hots, clipped to [-1, 1], passed to p (the reference's `STERandSelect`)."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        rows = torch.multinomial(probs.detach().float().cpu(), 1, generator=gen).squeeze(1)
        return F.one_hot(rows, probs.shape[-1]).to(probs.device, probs.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return F.hardtanh(grad), None


def fresh_noise(shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """The noise of one optimisation step (a new draw every step, as the reference's `get_loss`)."""
    return torch.randn(shape, generator=gen)


def step_loss(wb: WhiteBox, latents: torch.Tensor, t: int, embeds: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Eq. 3 on one image at timestep t with fresh noise: || eps_theta(z_t, [prefix; P], t) - goal ||^2."""
    z0 = latents[:1]
    eps = fresh_noise(z0.shape, gen)
    tt = torch.tensor([t])
    zt, goal = wb.family.noised(wb.pipe, z0, eps, tt)
    den = wb.objective.denoiser
    pred = wb.family.predict(den, zt.to(den.device, den.dtype), tt.to(den.device), wb.cond(embeds))
    return F.mse_loss(pred.float(), goal.to(den.device).float())


def attack(pipe, targets: Sequence[Target | str], config: AttackConfig, *, reference=None, judge=None,
           progress: bool = True) -> list[TargetResult]:
    """UnlearnDiffAtk against `pipe` (the model under test) for every target (see the module doc).

    `reference`: the original model's images of each target's concept (pipeline, callable or mapping).
    `judge(target, prompt) -> bool`: whether the image of a typed prompt shows the concept; the authors' search
    stops at its first yes (None: every block runs, the lowest scoring objective is returned). The fast preset
    (pez) does not call it.
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
    ts = timesteps(budget.blocks, pipe.scheduler.config.num_train_timesteps) if budget.search == "relaxed" else []

    def result(target: Target, wb: WhiteBox, rows, objective: float, start: float, steps: int,
               extra: dict) -> TargetResult:
        if rows is None:  # the plain prompt
            tokens, content = [], compose(tok, [], target.prompt)[2]
            prompt = target.prompt
        else:
            tokens = vocab.ids[rows].tolist()
            content = compose(tok, tokens, target.prompt)[2]
            prompt = f"{vocab.text(rows)} {target.prompt}"
        return TargetResult(
            index=target.index, target=target.prompt, seed=target.seed, attack=NAME, attack_seed=wb.seed,
            prompt=prompt, tokens=tokens, ids=content, objective=objective, objective_start=start,
            objective_plain=wb.plain, steps=steps, seconds=0.0,
            extra={"search": budget.search, "preset": budget.preset, "metric": budget.metric,
                   "samples": budget.samples, **extra})

    def score(wb: WhiteBox, rows: torch.Tensor) -> float:
        with torch.no_grad():
            return float(wb.loss(table[rows]))

    def relaxed(target: Target) -> TargetResult:
        wb = WhiteBox(pipe, vocab, table, config, target, reference, NAME)
        gen = wb.gen  # after the scoring samples and the (unused) random start: the search's own stream
        latents = wb.latents
        if judge is not None and judge(target, target.prompt):
            return result(target, wb, None, wb.plain, wb.plain, 0,
                          {"blocks_run": 0, "success_block": 0, "success": True, "judged": True, "timesteps": [],
                           "block_loss": [], "block_objective": []})
        probs = torch.full((budget.tokens, len(vocab)), 1.0 / len(vocab), device=table.device)
        probs = simplex(probs).requires_grad_(True)
        opt = torch.optim.Adam([probs], lr=budget.lr, weight_decay=budget.weight_decay)
        start = score(wb, probs.detach().argmax(-1))
        found, losses, scores, picks = None, [], [], []
        bar = tqdm(total=len(ts) * budget.steps, desc=f"{NAME} #{target.index}", leave=False, disable=not progress,
                   mininterval=1)
        step = 0
        for b, t in enumerate(ts, 1):
            total = 0.0
            for _ in range(budget.steps):
                opt.zero_grad(set_to_none=True)
                onehot = StraightThrough.apply(probs, gen)  # (k, A)
                loss = step_loss(wb, latents[step % len(latents):], t, onehot @ table, gen)
                total += finite(loss, NAME, target, step, _HINT)
                (grad,) = torch.autograd.grad(loss, probs)
                probs.grad = grad
                opt.step()
                with torch.no_grad():
                    probs.copy_(simplex(probs))
                step += 1
                bar.update(1)
            rows = probs.detach().argmax(-1)  # the typed prefix: argmax p (their `argmax_project`)
            picks.append(rows.clone())
            losses.append(total)
            scores.append(score(wb, rows))
            bar.set_postfix(block=b, loss=f"{total / budget.steps:.4g}")
            if judge is not None and judge(target, f"{vocab.text(rows)} {target.prompt}"):
                found = b
                break
        bar.close()
        run = len(picks)
        pick = found - 1 if found is not None else min(range(run), key=lambda i: (scores[i], i))
        return result(target, wb, picks[pick], scores[pick], start, run * budget.steps,
                      {"blocks_run": run, "success_block": found,
                       "success": (found is not None) if judge is not None else None, "judged": judge is not None,
                       "timesteps": ts[:run], "block_loss": losses, "block_objective": scores, "block": pick + 1})

    def pez(target: Target) -> TargetResult:
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
        return result(target, wb, best_rows, best, start, budget.steps, {})

    with frozen(*fam.text_encoders(pipe), fam.denoiser(pipe)):
        return run_targets(NAME, targets, config, relaxed if budget.search == "relaxed" else pez, progress)
