"""TRCE stage V's training: the trained parameters, the batch order, accelerate, checkpoints and the loop.

The same code path runs in one process or under `accelerate launch` (data parallel: each process takes its slice of
every global batch, gradients are averaged). Batch order is a pure function of (seed, epoch), so a run killed at any
point and rerun resumes from its last checkpoint (trainable tensors + Adam state, safetensors; step and losses in
JSON, written last, folder renamed atomically) and ends bit for bit where an uninterrupted run ends (CPU, same seed).
A non-finite loss stops every process with a `TrceError`; the last good checkpoint is kept.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from trce.errors import TrceError, choose_parts
from trce.families import GROUPS, family_of
from trce.methods.stage_v_config import METHOD, OPERATIONAL, StageVConfig, settings_record
from trce.methods.stage_v_hardening import Hardening, adversary_draws
from trce.methods.stage_v_loss import LOSS_COLUMNS, named_losses, repelled_safe, stage_v_loss, triplet_loss
from trce.methods.training import Checkpoints, encode_prompts, finite_loss
from trce.methods.trajectories import (
    ConceptTrajectories,
    CondTrajectories,
    Reference,
    UncondTrajectories,
    mix_seed,
)
from trce.utils import io


def trainable_parameters(denoiser: torch.nn.Module, family, groups: str = "visual") -> dict[str, torch.nn.Parameter]:
    """The family's `visual` group (SD: every `attn1.*` and `attn2.to_q.*` parameter), or the union of the "+"-joined
    `groups`; freeze everything else."""
    chosen = {}
    for group in choose_parts("stage V parameter group", groups, GROUPS):
        chosen.update(family.trainable(denoiser, group))
    for name, param in denoiser.named_parameters():
        param.requires_grad_(name in chosen)
    stray = [n for n, p in denoiser.named_parameters() if p.requires_grad and n not in chosen]
    if stray:  # a tied or re-registered parameter would make this fire
        raise TrceError(f"stage V would also train {stray[:3]}; only the {groups} layers may change")
    return chosen


# --------------------------------------------------------------------------- batch order
@dataclass(frozen=True)
class EpochPlan:
    """Which samples each optimizer step uses: a pure function of (seed, epoch) and the sizes."""

    trajectory: torch.Tensor  # (S, A, W, B) index into the concept trajectories
    step: torch.Tensor  # (S, A, W, B) trajectory step in [0, keep)
    uncond: torch.Tensor  # (S, A, W, B·U) index into the unconditional points

    @property
    def steps(self) -> int:
        return self.trajectory.shape[0]


def epoch_plan(seed: int, epoch: int, n_trajectories: int, keep: int, n_uncond: int, *, batch_size: int,
               grad_accum: int, world: int, preserve_batch: int) -> EpochPlan:
    """Shuffle the trajectories (each once per epoch), draw a step uniform in [0, keep) for each and
    `preserve_batch` unconditional points per sample. The shuffled order is padded cyclically to a
    whole number of optimizer steps so that every process always has a full batch."""
    gen = torch.Generator("cpu").manual_seed(mix_seed("stage-v-plan", seed, epoch))
    per_step = batch_size * grad_accum * world
    steps = math.ceil(n_trajectories / per_step)
    order = torch.randperm(n_trajectories, generator=gen)
    order = order.repeat(math.ceil(steps * per_step / n_trajectories))[:steps * per_step]
    k = torch.randint(0, keep, (steps * per_step,), generator=gen)
    u = torch.randint(0, n_uncond, (steps * per_step, preserve_batch), generator=gen)
    shape = (steps, grad_accum, world, batch_size)
    return EpochPlan(trajectory=order.view(shape), step=k.view(shape),
                     uncond=u.view(steps, grad_accum, world, batch_size * preserve_batch))


def cond_draws(seed: int, epoch: int, shape: tuple[int, ...], n: int) -> torch.Tensor:
    """`shape` indices into the `cond_preserve` points for an epoch's samples: a pure function of (seed, epoch), drawn
    apart from the batch plan, so that the plan (and a run without the term) is unchanged."""
    gen = torch.Generator("cpu").manual_seed(mix_seed("stage-v-cond", seed, epoch))
    return torch.randint(0, n, shape, generator=gen)


# --------------------------------------------------------------------------- checkpoints
def weights_digest(unet: torch.nn.Module) -> str:
    """A digest of the starting weights, so that a checkpoint resumes only the run it came from
    (stage T changes attn2.to_k/to_v, which the fingerprint's coarse probe may not see)."""
    with torch.no_grad():
        sums = [f"{float(p.sum(dtype=torch.float64)):.9e}/{float(p.abs().sum(dtype=torch.float64)):.9e}"
                for p in unet.parameters()]
    return hashlib.sha256("|".join(sums).encode()).hexdigest()


def run_key(config: StageVConfig, pairs, ref: Reference, pipe, world: int, mp: str, cond=None) -> str:
    """The digest of everything that decides a run's result: its checkpoints resume only that run."""
    settings = {k: v for k, v in settings_record(config).items() if k not in OPERATIONAL}
    payload = {"method": METHOD, "settings": settings, "mixed_precision": mp, "world": world,
               "pairs": pairs, "reference": ref.fingerprint["id"], "start": weights_digest(family_of(pipe).denoiser(pipe))}
    if cond is not None:
        payload["cond"] = cond.key
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------- accelerate
def make_accelerator(config: StageVConfig, device: torch.device, accelerator):
    """(the accelerator, its mixed precision): `accelerator` checked against the config, or one made for it."""
    mp = config.mixed_precision
    if mp == "auto":
        mp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if mp != "no" and device.type != "cuda":
        raise TrceError(f"mixed_precision {mp!r} needs a CUDA GPU; use 'no' (fp32) on the {device.type}")
    if accelerator is not None:
        if accelerator.mixed_precision != mp:
            raise TrceError(f"the accelerator passed to stage V uses mixed precision "
                            f"{accelerator.mixed_precision!r} but the config asks for {mp!r}")
        return accelerator, mp
    from accelerate import Accelerator

    try:
        return Accelerator(mixed_precision=mp, cpu=device.type == "cpu"), mp
    except ValueError as exc:  # accelerate's process-wide state was set up differently
        raise TrceError(f"cannot set up accelerate for stage V with mixed_precision={mp!r}: {exc}") from exc


def train(pipe, family, pairs, concept: ConceptTrajectories, uncond: UncondTrajectories, config: StageVConfig,
          acc, mp: str, ckpt: Checkpoints | None, progress: bool, on_step, ref: Reference,
          cond: CondTrajectories | None = None, preserve_prompts: Sequence[str] = ()):
    """Train a float32 copy of `pipe`'s denoiser on the cached trajectories (Eq. 8, 9; hardened when robust > 0),
    resuming from and writing to `ckpt`; return (trained tensors, per-step losses, resumed step, robust record)."""
    device = acc.device
    rank, world = acc.process_index, acc.num_processes
    model = copy.deepcopy(family.denoiser(pipe)).to(device)
    if model.dtype != torch.float32:
        model = model.to(dtype=torch.float32)  # fp32 master weights: Adam steps of 1e-6 vanish in half precision
    model.train()
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    params = trainable_parameters(model, family, config.params)
    names = list(params)
    optimizer = torch.optim.Adam(list(params.values()), lr=config.lr)

    losses: list[list[float]] = []
    start, resumed, state, files = 0, None, None, {}
    found = ckpt.load() if ckpt is not None else None
    if found is not None:
        start, files, state, where = found
        saved, opt_tensors = files.get("params.safetensors", {}), files.get("optimizer.safetensors", {})
        if set(saved) != set(names):
            raise TrceError(f"checkpoint {where} holds other tensors than this denoiser trains; delete it")
        with torch.no_grad():
            for name in names:
                params[name].copy_(saved[name].to(device))
        io.load_optimizer_state(optimizer, {k: v.to(device) for k, v in opt_tensors.items()}, state["optimizer"])
        resumed, losses = start, [list(r) for r in state["losses"]]
    prepared, optimizer = acc.prepare(model, optimizer)
    if state is not None and acc.scaler is not None and state.get("scaler"):
        acc.scaler.load_state_dict(state["scaler"])
    optimizer.zero_grad(set_to_none=True)

    # Training data on the training device: cached latents, targets, text embeddings.
    lat, f_safe, f_unsafe = (x.to(device) for x in (concept.latents, concept.f_safe, concept.f_unsafe))
    f_safe = repelled_safe(f_safe, f_unsafe, config.repel)  # (N, K, C, h, w); the cache keeps Eq. 7's own
    t_concept, pair_index = concept.timesteps.to(device), concept.pair_index.to(device)
    u_lat, u_t, u_tgt = uncond.latents.to(device), uncond.timesteps.to(device), uncond.target.to(device)
    emb_m = encode_prompts(pipe, [m for m, _ in pairs], chunk=64, device=device)  # (P, L, D)
    emb_null = family.unconditional(pipe).to(device=device, dtype=torch.float32)  # (1, L, D)
    if cond is not None:  # the `cond_preserve` points, their prompts' conditionings and targets
        c_lat, c_t, c_tgt = cond.latents.to(device), cond.timesteps.to(device), cond.target.to(device)
        emb_p = encode_prompts(pipe, list(preserve_prompts), chunk=64, device=device)  # (P, L, D)
        c_prompt = cond.prompt_index.to(device)  # (N_c,)

    n_traj, keep = len(concept), concept.timesteps.shape[0]
    plan_args = {"batch_size": config.batch_size, "grad_accum": config.grad_accum, "world": world,
                 "preserve_batch": config.preserve_batch}
    per_epoch = epoch_plan(config.seed, 0, n_traj, keep, len(uncond), **plan_args).steps
    total = per_epoch * config.epochs
    hard = None
    if config.robust:
        hard = Hardening(pipe, family, pairs, emb_m, (lat, t_concept, f_safe, f_unsafe, pair_index), config, ref,
                          acc, ckpt, total, progress)
        if state is not None:
            hard.load(files, state, where)
    bar = tqdm(total=total, initial=start, desc="stage V training", unit="step",
               disable=not (progress and acc.is_main_process), mininterval=1)
    plan, plan_epoch, draws = None, -1, None
    try:
        for step in range(start, total):
            if hard is not None:
                hard.rounds_due(step, params, model)  # the adversaries of the current model (round r at s_r)
            epoch, pos = divmod(step, per_epoch)
            if epoch != plan_epoch:
                plan, plan_epoch = epoch_plan(config.seed, epoch, n_traj, keep, len(uncond), **plan_args), epoch
                if hard is not None:
                    draws = adversary_draws(config.seed, epoch, tuple(plan.trajectory.shape))  # (2, S, A, W, B)
                if cond is not None:
                    cond_plan = cond_draws(config.seed, epoch, tuple(plan.uncond.shape), len(cond))  # (S, A, W, B·U)
            sums = torch.zeros(len(LOSS_COLUMNS), device=device)
            for micro in range(config.grad_accum):
                ti = plan.trajectory[pos, micro, rank].to(device)  # (B,)
                ki = plan.step[pos, micro, rank].to(device)  # (B,)
                ui = plan.uncond[pos, micro, rank].to(device)  # (B·U,)
                b, bu = ti.shape[0], ui.shape[0]
                z = lat[ti, ki]  # (B, C, h, w)
                x = torch.cat([z, z, u_lat[ui]])  # (2B + B·U, C, h, w): c^m, ∅ at z_t^m; ∅ at z^u
                t = torch.cat([t_concept[ki], t_concept[ki], u_t[ui]])
                if cond is not None:  # (+ B·U): c^p at z^p
                    ci = cond_plan[pos, micro, rank].to(device)
                    x, t = torch.cat([x, c_lat[ci]]), torch.cat([t, c_t[ci]])
                e_m = e_c = emb_m[pair_index[ti]]  # (B, L, D) c^m of each sample's pair
                took = None
                if hard is not None:  # c^adv of the pair instead, with probability robust_mix
                    e_c, took = hard.mix(e_m, pair_index[ti], draws[0, pos, micro, rank].to(device),
                                         draws[1, pos, micro, rank].to(device))
                e = torch.cat([e_c, emb_null.expand(b + bu, -1, -1), *([emb_p[c_prompt[ci]]] if cond is not None else [])])
                adv = {}
                if took is not None and config.robust_consistency and bool(took.any()):
                    # the consistency target: the model's own prediction for the plain prompt c^m at the adversarial
                    # samples' points (detached: only the adversarial prediction is pulled, `stage_v_hardening` 3.)
                    with torch.no_grad(), acc.autocast():
                        plain = family.predict(prepared, z[took], t_concept[ki][took], e_m[took]).float()  # (A, C, h, w)
                    adv = {"target_adv": plain, "consistency": config.robust_consistency}
                sync = micro == config.grad_accum - 1
                with (acc.no_sync(prepared) if not sync else contextlib.nullcontext()):
                    with acc.autocast():
                        out = family.predict(prepared, x, t, e).float()
                    cp = {"pred_cp": out[2 * b + bu:], "target_cp": c_tgt[ci]} if cond is not None else {}
                    if adv:
                        cp.update(adv, pred_adv=out[:b][took])
                    parts = stage_v_loss(out[:b], out[b:2 * b], out[2 * b:2 * b + bu], f_safe[ti, ki],
                                         f_unsafe[ti, ki], u_tgt[ui], margin=config.margin,
                                         lambda_preserve=config.lambda_preserve, **cp)
                    values = acc.reduce(torch.stack([parts[c].detach() for c in LOSS_COLUMNS]), reduction="mean")
                    finite_loss(values[0], "stage V", step + 1, total, ckpt,
                                f"lower lr (now {config.lr:g}) or use mixed_precision='no'")
                    acc.backward(parts["total"] / config.grad_accum)
                if hard is not None:
                    hard.tally(took, triplet_loss(out[:b].detach(), f_safe[ti, ki], f_unsafe[ti, ki], config.margin))
                sums += values
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # every step (the authors' code never zeroed them)
            row = (sums / config.grad_accum).tolist()
            losses.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row[0]:.4g}", erase=f"{row[1]:.3g}", preserve=f"{row[2]:.3g}")
            done = step + 1
            if ckpt is not None and done % config.checkpoint_every == 0 and done < total and acc.is_main_process:
                    opt_tensors, opt_scalars = io.optimizer_state(optimizer)
                    ckpt_files = {"params.safetensors": {n: params[n] for n in names},
                                  "optimizer.safetensors": opt_tensors}
                    ckpt_state = {"optimizer": opt_scalars, "losses": losses,
                                  "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                                  "batch_order": "pure function of (seed, epoch): nothing else to restore"}
                    if hard is not None:  # the adversaries found so far: a resumed run trains on the very same
                        ckpt_files.update(hard.files())
                        ckpt_state["robust"] = hard.records
                    ckpt.save(done, ckpt_files, ckpt_state)
            if on_step is not None:
                on_step(done, named_losses(row))
    finally:
        bar.close()
    acc.wait_for_everyone()
    robust = hard.summary(model) if hard is not None else None
    weights = {n: params[n].detach().float().cpu().clone() for n in names}
    if ckpt is not None and acc.is_main_process:
        ckpt.finish()  # finished: the Edit holds the result
    return weights, losses, resumed, robust
