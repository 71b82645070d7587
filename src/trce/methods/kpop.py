"""KPOP: erasing a concept with a learnable prompt (Bui et al., "Removing Undesirable Concepts in
Text-to-Image Diffusion Models with Learnable Prompts"; equations in METHOD_NOTES.md).

A prompt p (m_p tokens x width d) is injected into the attention layers that read the text
(`trce.prompt_injection`: cross-attention, or the joint attention of an MMDiT, where p joins the
context rows) and two objectives alternate, one Adam step each per iteration:

- knowledge transfer (Eq. 5-6): p <- p - eta_p grad_p || eps_theta'(z_t, c_e, p) - eps_theta(z_t, c_e) ||^2
  (the current model plus p must still draw the concept: its knowledge moves into p);
- knowledge removal (Eq. 7): theta' <- theta' - eta grad_theta' [ || eps_theta'(z_t, c_e) - eps_theta(z_t, c_n) ||^2
  + lam || eps_theta'(z_t, c_e, p) - eps_theta(z_t, c_e) ||^2 ]
  (without p the erase prompt c_e behaves like the neutral prompt c_n; with p it keeps the original output).

Two optional terms, both off by default (Eq. 7 as the paper writes it):
- `negative_guidance` eta_n: the removal target becomes ESD's negatively guided
  eps_theta(c_n) - eta_n (eps_theta(c_e) - eps_theta(c_n)) instead of eps_theta(c_n). KPOP's removal loss is ESD's
  with the prompt added, and ESD trains against this target (eta_n = 1). It matters when the neutral prompt can
  itself draw the concept: in ShapeWorld "a red shape" draws a circle one time in six, so mapping "a red
  circle" onto it can never erase circles more than ~5 times in 6.
  With several concepts erased at once, `negative_others` eta_o also pushes the target away from the *other*
  erased concepts: - eta_o sum_{j != own} (eps_theta(c_e^j) - eps_theta(c_n)), c_e^j the erase prompt with concept
  j in its slot (`trce.concepts.other_concept_prompts`). Otherwise the neutral direction is free to land on
  another erased concept: erasing circle, star and triangle with the own-concept target, a circle prompt draws
  a star or a triangle about half of the time.
- `preserve_weight` mu: + mu || eps_theta'(z_t, c_k) - eps_theta(z_t, c_k) ||^2 over prompts c_k of concepts to keep
  (the concept spec's preservation prompts), the variant the paper marks with a star ("Ours*", Sec. 5.2: the
  same setting with knowledge of the to-be-preserved concepts). Its z_t are the erase prompts' latents of the
  same step (`preserve_latents: erase`, free) or the preservation prompts' own (`own`: what the model draws
  for them, which keeps their other attributes better).

theta is the frozen original UNet, theta' the one being erased; ||.||^2 is the mean squared error.
Only one parameter group of the UNet trains: `cross-attn` (every `attn2.*`: objects, styles) or
`non-cross-attn` (everything but `attn2.*`, the time embedding and the output layers, as ESD's
"noxattn": nudity). The original outputs eps_theta come from the same module through
`torch.func.functional_call` with the saved original values of the trained tensors, so no second
UNet is held in memory for the cross-attention group.

Noisy latents z_t (`latents`):
- `current` (default, ESD's recipe that KPOP's training follows): each iteration, fresh seeded
  noise is denoised with the *current* model (no p), the erase prompts and classifier-free
  guidance `sample_guidance` for a random number k of the `ddim_steps` DDIM steps; z_t is the
  latent after k steps and t its timestep. The latents follow what the erased model would draw.
- `cached`: `cache_trajectories` DDIM trajectories per erase prompt are drawn once with the
  original model and kept; each iteration takes a random (prompt, trajectory, step). About 8x
  cheaper per iteration; z_t always shows the concept as the original model draws it.

The prompt's width d and the rows it is sized by (m_p = k m_c) and initialised from are the model
family's (`injection_width`, `injection_rows`): the text states for cross-attention, the context
stream at the joint attention for MMDiTs (SD3, FLUX), whose width is the transformer's, not the
text encoder's.

The pipeline is left as it was (weights, dtype, processors, requires_grad): the result is an
`Edit` whose weights are the trained tensors and whose extras hold the hidden prompt, which
`trce.prompt_injection.hidden_prompt_installed(pipe, edit)` puts back to recover the concept (paper Fig. 6).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trce.edit import Edit
from trce.errors import TrceError, choose
from trce.families import family_of
from trce.families.injection import Mode, Sites
from trce.methods.training import (
    Checkpoints,
    NoisyLatents,
    check_numbers,
    encode_prompts,
    endpoints,
    finite_loss,
    restore_state,
    run_checkpoints,
    save_state,
    training_state,
)
from trce.prompt_injection import hidden_prompt_installed, injected, site_layers
from trce.registry import Context

log = logging.getLogger(__name__)

Group = Literal["cross-attn", "non-cross-attn"]
Latents = Literal["current", "cached"]
PromptInit = Literal["auto", "erase", "zeros", "random"]
Neutral = Literal["prompt", "safe"]
PreserveLatents = Literal["erase", "own"]
DEFAULT_K = 10  # the paper's prompt size: m_p = k * m_c (Sec. 4.3, Sec. 5.1)
# ESD's "noxattn" leaves these out too: the time embedding and the final output layers.
_NON_CROSS_EXCLUDED = ("time_embedding.", "conv_norm_out.", "conv_out.")


@dataclass(frozen=True)
class KPOPConfig:
    """Every KPOP setting; recorded in the patch's `settings`.

    prompt_size is k (m_p = k * m_c text tokens, paper default 10) for `concat`; prompt_tokens
    gives m_p directly instead. The additive mode takes neither k nor a free m_p: its prompt has
    m_c tokens (added position by position) or, with prompt_tokens=1, one vector added to all.
    """

    ALTERNATIVES: ClassVar[tuple[tuple[str, ...], ...]] = (("prompt_size", "prompt_tokens"),)  # one sizes m_p

    iterations: int = 1000
    lr: float = 1e-5  # eta, Adam, model parameters (paper Sec. 5.1)
    prompt_lr: float = 1e-3  # eta_p, Adam, the prompt (not given by the paper; embeddings have unit scale)
    lam: float = 0.1  # lambda of Eq. 7 (paper default 0.1; must be > 0)
    params: Group = "cross-attn"
    mode: Mode = "concat"
    sites: Sites = "mid"
    prompt_size: int | None = None
    prompt_tokens: int | None = None
    prompt_init: PromptInit = "auto"  # auto: concat -> erase (exact no-op for one prompt), add -> zeros (no-op)
    batch_size: int = 1
    neutral_prompt: str = ""
    # c_n of Eq. 7: "prompt" = neutral_prompt for every erase prompt (the paper); "safe" = each erase
    # prompt's safe counterpart from the concept spec ("a red circle" -> "a red shape"), so only the
    # erased words lose their effect and the rest of the prompt keeps its meaning.
    neutral: Neutral = "prompt"
    seed: int = 0
    latents: Latents = "current"
    ddim_steps: int = 50
    sample_guidance: float = 3.0
    cache_trajectories: int = 4
    negative_guidance: float = 0.0  # eta_n: ESD's target eps(c_n) - eta_n (eps(c_e) - eps(c_n)); 0 = Eq. 7 as written
    # eta_o: the target also moves away from the spec's other erased concepts, weight eta_o each (one more UNet call
    # per other concept, without gradients); 0 = only the prompt's own concept (ESD's target)
    negative_others: float = 0.0
    preserve_weight: float = 0.0  # mu: weight of the preservation term on the spec's preservation prompts (Ours*)
    # z_t of the preservation term: "erase" = the erase prompts' latents of the same step (no extra work); "own" =
    # latents of the preservation prompts themselves (cached: trajectories of as many of them as there are erase
    # prompts, drawn once; current: one more denoising per iteration)
    preserve_latents: PreserveLatents = "erase"
    checkpoint_every: int = 100  # iterations between checkpoints (operational: not part of the run's key)
    # erase prompts used (a seeded subset of the spec's; 0 = all): with `latents: cached` the cache holds as many
    # trajectories as prompts, so a short run need not draw trajectories it will never sample
    max_prompts: int = 0

    def __post_init__(self) -> None:
        for name, kind in (("params", Group), ("mode", Mode), ("sites", Sites), ("latents", Latents),
                           ("prompt_init", PromptInit), ("neutral", Neutral), ("preserve_latents", PreserveLatents)):
            choose(f"KPOP {name}", getattr(self, name), get_args(kind))
        check_numbers(self, "KPOP", integers=("iterations", "batch_size", "ddim_steps", "cache_trajectories",
                                              "checkpoint_every"),
                      non_negative_integers=("max_prompts",),
                      positive=("lr", "prompt_lr", "lam"),
                      non_negative=("sample_guidance", "negative_guidance", "negative_others", "preserve_weight"))
        for name in ("prompt_size", "prompt_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise TrceError(f"KPOP {name} must be a positive integer, got {value!r}")
        if self.prompt_size is not None and self.prompt_tokens is not None:
            raise TrceError(f"give KPOP prompt_size ({self.prompt_size}) or prompt_tokens ({self.prompt_tokens}), "
                            "not both")
        if self.mode == "add" and self.prompt_size is not None:
            raise TrceError(f"KPOP prompt_size (k={self.prompt_size}) is for mode 'concat'; an additive prompt has as "
                            "many tokens as the text (or prompt_tokens=1 for one vector added to every token)")
        if not isinstance(self.neutral_prompt, str):
            raise TrceError(f"KPOP neutral_prompt must be a string, got {self.neutral_prompt!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> KPOPConfig:
        """A config from a mapping (a spec's `kpop:` section, CLI options); unknown keys are refused."""
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            choose("KPOP setting", key, fields)
        return cls(**values)

    def prompt_shape_tokens(self, text_tokens: int) -> int:
        """m_p for text embeddings of `text_tokens` tokens (m_c)."""
        if self.mode == "add":
            m_p = self.prompt_tokens or text_tokens
            if m_p not in (1, text_tokens):
                raise TrceError(f"an additive KPOP prompt has 1 token or as many as the text ({text_tokens}), "
                                f"got prompt_tokens={m_p}")
            return m_p
        return self.prompt_tokens or (self.prompt_size or DEFAULT_K) * text_tokens


def _initial_prompt(config: KPOPConfig, erase_emb: torch.Tensor, m_p: int, gen: torch.Generator) -> torch.Tensor:
    """p_0, (m_p, d), from the erase prompts' context rows erase_emb (n, m_c, d) (the family's `injection_rows`)."""
    init = config.prompt_init
    if init == "auto":
        init = "erase" if config.mode == "concat" else "zeros"
    m_c, d = erase_emb.shape[1:]
    if init == "zeros":
        return torch.zeros(m_p, d)
    mean = erase_emb.mean(0).cpu()  # (m_c, d): the erase prompts' embeddings, averaged
    if init == "erase":
        if config.mode == "add":
            return (mean if m_p == m_c else mean.mean(0, keepdim=True)).clone()
        # concat: the text's own tokens repeated k times; for one erase prompt, softmax over the
        # duplicated keys gives back the original output, so the transfer starts from a no-op
        # (cross-attention; in joint attention the copies raise the text's logits by log(k+1) instead)
        return mean.repeat(-(-m_p // m_c), 1)[:m_p].clone()
    return torch.randn(m_p, d, generator=gen) * erase_emb.std().item()  # random, at the embeddings' scale


def erase_kpop(pipe, erase_prompts: list[str], config: KPOPConfig = KPOPConfig(), *, neutral_prompt: str | None = None,
               safe_prompts: list[str] | None = None, preserve_prompts: Sequence[str] | None = None,
               other_prompts: Sequence[Sequence[str]] | None = None, spec: dict | None = None, progress: bool = True,
               checkpoint_dir: str | Path | None = None, checkpoint_every: int | None = None,
               cache_dir: str | Path | None = None) -> Edit:
    """Erase the concept of `erase_prompts` with KPOP; returns the Edit (the pipeline is left unchanged).

    neutral_prompt overrides config.neutral_prompt (c_n); with config.neutral == "safe", c_n of erase
    prompt i is safe_prompts[i] (required then). With config.preserve_weight > 0, `preserve_prompts` are the
    prompts c_k whose outputs the preservation term keeps (required then). With config.negative_others > 0,
    other_prompts[i] are erase prompt i with each other erased concept in its place (the same number for every
    prompt; `trce.concepts.other_concept_prompts`). The state is saved every `checkpoint_every` iterations in
    `checkpoint_dir` (or, without one, in `<cache_dir>/runs/kpop-<key>`; neither: no checkpoints) and a rerun
    with the same settings continues from there; a finished run removes its checkpoints.
    """
    if isinstance(erase_prompts, str) or not erase_prompts or not all(isinstance(p, str) and p.strip()
                                                                       for p in erase_prompts):
        raise TrceError(f"KPOP needs a non-empty list of non-empty erase prompts, got {erase_prompts!r}")
    checkpoint_every = config.checkpoint_every if checkpoint_every is None else checkpoint_every
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise TrceError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    erase_prompts = list(erase_prompts)
    if neutral_prompt is not None:
        config = dataclasses.replace(config, neutral_prompt=neutral_prompt)
    from trce.edit import fingerprint

    t_start = time.time()
    base = fingerprint(pipe)
    family = family_of(pipe)
    unet = family.denoiser(pipe)
    device = unet.device
    layers = site_layers(pipe, config.sites)
    erase_emb = encode_prompts(pipe, erase_prompts, device=device)  # (n, m_c, d)
    if config.neutral == "safe":
        if safe_prompts is None or len(safe_prompts) != len(erase_prompts):
            raise TrceError("KPOP neutral=safe needs one safe prompt per erase prompt (a concept spec gives them)")
        neutral_emb = encode_prompts(pipe, list(safe_prompts), device=device)  # (n, m_c, d), row i for prompt i
    else:
        neutral_emb = encode_prompts(pipe, [config.neutral_prompt], device=device)  # (1, m_c, d)
    uncond = family.unconditional(pipe).to(device=device, dtype=torch.float32)  # (1, m_c, d): CFG's unconditional half
    keep_emb = None
    if config.preserve_weight > 0:
        keep = [p for p in (preserve_prompts or []) if isinstance(p, str) and p.strip()]
        if not keep:
            raise TrceError(f"KPOP preserve_weight={config.preserve_weight} needs preservation prompts (the concept "
                            "spec's `preserve:` section gives them); none were given")
        keep_emb = encode_prompts(pipe, keep, chunk=256, device=device)  # (n_k, m_c, d)
    other_emb = _other_concepts(pipe, config, erase_prompts, other_prompts, device)  # (n, J-1, m_c, d) or None
    erase_rows = family.injection_rows(pipe, erase_emb)  # (n, m_c, d): the context rows the prompt sits beside
    _, m_c, d = erase_rows.shape
    m_p = config.prompt_shape_tokens(m_c)
    trainable = family.trainable(unet, config.params)
    settings = {
        **dataclasses.asdict(config),
        "erase_prompts": erase_prompts,
        **({"safe_prompts": list(safe_prompts)} if config.neutral == "safe" else {}),
        **({"preserve_prompts": {"n": len(keep), "sha256": _digest(keep)}} if keep_emb is not None else {}),
        **({"other_concept_prompts": {"per_prompt": other_emb.shape[1],
                                      "sha256": _digest([q for qs in other_prompts for q in qs])}}
           if other_emb is not None else {}),
        "injection": {"mode": config.mode, "sites": config.sites, "layers": layers, "prompt_tokens": m_p,
                      "text_tokens": m_c, "width": d},
        "trainable": {"group": config.params, "tensors": len(trainable),
                      "parameters": sum(p.numel() for p in trainable.values())},
    }
    gen = torch.Generator("cpu").manual_seed(config.seed)
    ckpt = run_checkpoints("kpop", settings, base, checkpoint_dir, cache_dir)
    with training_state(unet, trainable) as originals, injected(pipe, None, config.mode, config.sites) as slot:
        params = dict(unet.named_parameters())
        train = [params[name] for name in trainable]
        prompt = torch.nn.Parameter(_initial_prompt(config, erase_rows, m_p, gen).to(device))
        opt_p = torch.optim.Adam([prompt], lr=config.prompt_lr)
        opt = torch.optim.Adam(train, lr=config.lr)
        history: dict[str, list[float]] = {"transfer": [], "removal": [], "l1": [], "l2": [], "l3": []}
        start, saved = restore_state(ckpt, list(trainable), train, opt, gen, prompt, opt_p)
        history = saved or history
        t_cache = time.time()
        latents = NoisyLatents(pipe, unet, config, erase_emb, uncond, gen, originals)
        keep_latents = None
        if keep_emb is not None and config.preserve_latents == "own":
            if config.latents == "cached":  # a seeded subset, as many as the erase prompts: the cache stays small
                pick = torch.randperm(len(keep_emb), generator=torch.Generator("cpu").manual_seed(config.seed + 2))
                keep_emb = keep_emb[pick[: len(erase_emb)].sort().values.to(device)]
            keep_latents = NoisyLatents(pipe, unet, config, keep_emb, uncond, gen, originals, cache_seed=2)
        t_cache = time.time() - t_cache
        t_loop = time.time()
        with tqdm(total=config.iterations, initial=start, desc="kpop", disable=not progress, mininterval=1) as bar:
            for it in range(start, config.iterations):
                values = _iteration(family, unet, slot, latents, keep_latents, erase_emb, neutral_emb, keep_emb,
                                    other_emb, originals, prompt, train, opt_p, opt, config, gen, it, ckpt)
                for key, value in values.items():
                    history[key].append(value)
                bar.update(1)
                bar.set_postfix(transfer=f"{values['transfer']:.4f}", removal=f"{values['removal']:.4f}", refresh=False)
                if ckpt is not None and (it + 1) % checkpoint_every == 0 and it + 1 < config.iterations:
                    save_state(ckpt, it + 1, list(trainable), train, opt, gen, history, prompt, opt_p)
        t_loop = time.time() - t_loop
        prefix = family.denoiser_name
        weights = {f"{prefix}.{name}": params[name].detach().cpu().clone() for name in trainable}  # fp32
        hidden = prompt.detach().cpu().float().clone()  # (m_p, d)
    done = config.iterations - start
    info = {
        "iterations": config.iterations,
        "resumed_from": start,
        "loss": endpoints(history),
        "history": {k: v[:: max(1, len(v) // 100)] for k, v in history.items()},
        "history_every": max(1, len(history["transfer"]) // 100),
        "seconds": round(time.time() - t_start, 3),
        "seconds_cache": round(t_cache, 3),
        "seconds_per_iteration": round(t_loop / max(1, done), 5),
        "device": str(device),
        "hidden_prompt_norm": float(hidden.norm()),
    }
    log.info("KPOP: %d iterations in %.1f s; transfer loss %s, removal loss %s", done, info["seconds"],
             info["loss"]["transfer"], info["loss"]["removal"])
    if ckpt is not None:
        ckpt.finish()
    return Edit(weights=weights, method="kpop", spec=spec or {"erase": erase_prompts, "neutral": config.neutral_prompt},
                settings=settings, base=base, extras={"hidden_prompt": hidden}, info=info)


def _other_concepts(pipe, config: KPOPConfig, erase_prompts: list[str], other_prompts, device) -> torch.Tensor | None:
    """(n, J-1, m_c, d): erase prompt i with each other erased concept in its slot; None unless they are used."""
    if config.negative_others == 0:
        return None
    if other_prompts is None or len(other_prompts) != len(erase_prompts):
        raise TrceError("KPOP negative_others > 0 needs, for every erase prompt, the prompts that name the other "
                        "erased concepts in its place (a concept spec gives them)")
    counts = sorted({len(qs) for qs in other_prompts})
    if len(counts) != 1:
        raise TrceError(f"KPOP negative_others > 0 needs as many other-concept prompts for every erase prompt; "
                        f"got {', '.join(map(str, counts))}")
    if counts[0] == 0:
        log.warning("KPOP negative_others: the spec erases one concept, so there are no others to move away from")
        return None
    emb = encode_prompts(pipe, [q for qs in other_prompts for q in qs], chunk=256, device=device)  # (n (J-1), m_c, d)
    return emb.view(len(erase_prompts), counts[0], *emb.shape[1:])


def _iteration(family, unet, slot, latents: NoisyLatents, keep_latents: NoisyLatents | None, erase_emb, neutral_emb, keep_emb,
               other_emb, originals, prompt, train, opt_p, opt, config: KPOPConfig, gen: torch.Generator,
               it: int, ckpt: Checkpoints | None) -> dict[str, float]:
    """One KPOP iteration: a transfer step on p, then a removal step on theta'; returns the losses."""
    idx = torch.randint(len(erase_emb), (config.batch_size,), generator=gen)  # (b,) erase prompts of this step
    z, t = latents.sample(idx)  # (b, c, h, w), (b,)
    c_e = erase_emb[idx]  # (b, m_c, d)
    c_n = neutral_emb[idx] if len(neutral_emb) > 1 else neutral_emb.expand(len(idx), -1, -1)  # (b, m_c, d)
    conds, zs, ts = [c_e, c_n], [z, z], [t, t]
    if keep_emb is not None:  # the preservation prompts c_k of this step, on the erase z_t or on their own
        kidx = torch.randint(len(keep_emb), (config.batch_size,), generator=gen)  # (b,)
        z_k, t_k = keep_latents.sample(kidx) if keep_latents is not None else (z, t)
        conds.append(keep_emb[kidx])  # (b, m_c, d)
        zs.append(z_k)
        ts.append(t_k)
    if other_emb is not None:  # the erase prompts with the other erased concepts in their slot, on the same z_t
        j = other_emb.shape[1]
        conds.append(other_emb[idx].flatten(0, 1))  # (b (J-1), m_c, d)
        zs.append(z.repeat_interleave(j, 0))
        ts.append(t.repeat_interleave(j, 0))
    with torch.no_grad():
        slot.prompt = None
        # the frozen original theta on every condition at once:
        # eps_theta(z_t, c_e), eps_theta(z_t, c_n)[, eps_theta(z_k, c_k)][, eps_theta(z_t, c_e^j) for the other j]
        target = family.predict(unet, torch.cat(zs), torch.cat(ts), torch.cat(conds), originals).split(
            [len(c) for c in conds])
        eps_e, eps_n = target[0], target[1]  # (b, c, h, w) each
        # ESD's negatively guided neutral target (eta_n = 0: Eq. 7's eps_theta(c_n) itself), away from the prompt's
        # own concept and, with negative_others eta_o, from each other erased concept too
        away = config.negative_guidance * (eps_e - eps_n)
        if other_emb is not None:
            eps_o = target[-1].view(len(idx), other_emb.shape[1], *eps_n.shape[1:])  # (b, J-1, c, h, w)
            away = away + config.negative_others * (eps_o - eps_n[:, None]).sum(1)
        eps_n = eps_n - away

    # knowledge transfer, Eq. 5-6: one step on p only (theta' fixed)
    slot.prompt = prompt
    loss_t = F.mse_loss(family.predict(unet, z, t, c_e), eps_e)
    hint = f"lower lr ({config.lr}) or prompt_lr ({config.prompt_lr})"
    transfer = finite_loss(loss_t, "KPOP (transfer)", it + 1, config.iterations, ckpt, hint)
    (grad,) = torch.autograd.grad(loss_t, [prompt])
    prompt.grad = grad
    opt_p.step()
    opt_p.zero_grad(set_to_none=True)

    # knowledge removal, Eq. 7: one step on theta' with p_{k+1} fixed
    slot.prompt = None
    l3 = torch.zeros(())
    if keep_emb is not None:  # Ours*: the kept concepts' outputs stay the original model's
        # both terms without p in one UNet call: on a small UNet a call costs about as much at batch 2b as at b
        out_e, out_k = family.predict(unet, torch.cat([z, zs[2]]), torch.cat([t, ts[2]]),
                                 torch.cat([c_e, conds[2]])).split([len(z), len(zs[2])])
        l1 = F.mse_loss(out_e, eps_n)
        l3 = F.mse_loss(out_k, target[2])
    else:
        l1 = F.mse_loss(family.predict(unet, z, t, c_e), eps_n)
    slot.prompt = prompt.detach()
    l2 = F.mse_loss(family.predict(unet, z, t, c_e), eps_e)
    slot.prompt = None
    loss_r = l1 + config.lam * l2 + config.preserve_weight * l3
    removal = finite_loss(loss_r, "KPOP (removal)", it + 1, config.iterations, ckpt, hint)
    grads = torch.autograd.grad(loss_r, train)
    for p, g in zip(train, grads):
        p.grad = g
    opt.step()
    opt.zero_grad(set_to_none=True)
    if not torch.isfinite(prompt).all():
        raise TrceError(f"KPOP diverged at iteration {it + 1}: the prompt holds NaN/inf; "
                        f"lower prompt_lr ({config.prompt_lr})")
    return {"transfer": transfer, "removal": removal, "l1": float(l1.detach()), "l2": float(l2.detach()),
            "l3": float(l3.detach())}


def _digest(prompts: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def run(pipe, specs, config: KPOPConfig, context: Context) -> Edit:
    """KPOP (the registry's stage function): the specs' malicious prompts are the erase prompts c_e, their safe
    counterparts the neutral prompts of `neutral: safe`, their preservation prompts those of `preserve_weight`,
    and the same prompts naming the other erased concepts those of `negative_others`. Checkpoints go under the
    context's cache (a killed run resumes)."""
    from trce.concepts import other_concept_prompts, preservation_prompts_of, spec_record
    from trce.methods.prior import cache_dir

    safe = {p.malicious: p.safe for s in specs for p in s.pairs()}  # each erase prompt's safe counterpart
    prompts = list(safe)
    if config.max_prompts and len(prompts) > config.max_prompts:
        rng = np.random.default_rng([config.seed, 7331])
        prompts = [prompts[i] for i in sorted(rng.choice(len(prompts), config.max_prompts, replace=False))]
    keep = None
    if config.preserve_weight > 0:  # read only when used: COCO captions need the data folder
        keep = preservation_prompts_of(specs, context.data_dir)
    others = None
    if config.negative_others > 0:  # each erase prompt with the spec's other erased concepts in its slot
        table = other_concept_prompts(specs)
        others = [table[m] for m in prompts]
    return erase_kpop(pipe, prompts, config, spec=spec_record(specs), safe_prompts=[safe[m] for m in prompts],
                      preserve_prompts=keep, other_prompts=others, progress=context.progress,
                      checkpoint_dir=context.checkpoint_dir,
                      cache_dir=cache_dir(context.cache_dir) if context.use_cache else None)


def generate_with_hidden_prompt(pipe, edit: Edit, prompts: Sequence[str], seeds: Sequence[int], settings=None,
                                progress: bool = True, apply: bool = False):
    """`trce.generate.generate` with the edit's hidden prompt injected: uint8 (N, H, W, 3)."""
    from trce.generate import GenSettings, generate

    with hidden_prompt_installed(pipe, edit, apply=apply):
        return generate(pipe, prompts, seeds, settings or GenSettings(), progress=progress)
