"""KPOP: erasing a concept with a learnable prompt (Bui et al., "Removing Undesirable Concepts in
Text-to-Image Diffusion Models with Learnable Prompts"; equations in METHOD_NOTES.md).

A prompt p (m_p tokens x text width) is injected into cross-attention (`trce.prompt_injection`)
and two objectives alternate, one Adam step each per iteration:

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

The pipeline is left as it was (weights, dtype, processors, requires_grad): the result is an
`Edit` whose weights are the trained tensors and whose extras hold the hidden prompt, which
`hidden_prompt_installed(pipe, edit)` puts back to recover the concept (paper Fig. 6).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trce.edit import Edit
from trce.errors import TrceError, choose
from trce.prompt_injection import MODES, SITES, Mode, Sites, injected, site_layers
from trce.utils import io

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

    def __post_init__(self) -> None:
        for name, kind in (("params", Group), ("mode", Mode), ("sites", Sites), ("latents", Latents),
                           ("prompt_init", PromptInit), ("neutral", Neutral), ("preserve_latents", PreserveLatents)):
            choose(f"KPOP {name}", getattr(self, name), get_args(kind))
        check_numbers(self, "KPOP", integers=("iterations", "batch_size", "ddim_steps", "cache_trajectories"),
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


def check_numbers(config: Any, what: str, integers: Sequence[str] = (), positive: Sequence[str] = (),
                  non_negative: Sequence[str] = ()) -> None:
    """Positive integers, positive finite numbers and finite numbers >= 0 among a config's fields, by name."""
    for name in integers:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TrceError(f"{what} {name} must be a positive integer, got {value!r}")
    for name, low_ok in [(n, False) for n in positive] + [(n, True) for n in non_negative]:
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                or value < 0 or (value == 0 and not low_ok):
            raise TrceError(f"{what} {name} must be a {'number >= 0' if low_ok else 'positive number'}, got {value!r}")


def trainable_parameters(unet, group: str) -> dict[str, torch.nn.Parameter]:
    """The UNet parameters of a group, by name inside the UNet (Sec. 5.1: objects cross-attn, nudity non-cross-attn)."""
    group = choose("KPOP parameter group", group, get_args(Group))
    out = {}
    for name, param in unet.named_parameters():
        cross = ".attn2." in f".{name}"
        keep = cross if group == "cross-attn" else not cross and not name.startswith(_NON_CROSS_EXCLUDED)
        if keep:
            out[name] = param
    if not out:
        raise TrceError(f"the UNet has no parameters in KPOP group {group!r}")
    return out


@torch.no_grad()
def _encode(pipe, prompts: Sequence[str], device: torch.device, chunk: int | None = None) -> torch.Tensor:
    """Text embeddings (n, m_c, d) in fp32, exactly as the pipeline conditions on them; `chunk` prompts at a time
    when given (long lists: the preservation captions, the other-concept prompts)."""
    prompts = list(prompts)
    step = chunk or max(1, len(prompts))
    return torch.cat([pipe.encode_prompt(prompts[i:i + step], device, 1, False)[0].float()
                      for i in range(0, len(prompts), step)])


def _initial_prompt(config: KPOPConfig, erase_emb: torch.Tensor, m_p: int, gen: torch.Generator) -> torch.Tensor:
    """p_0, (m_p, d)."""
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
        return mean.repeat(-(-m_p // m_c), 1)[:m_p].clone()
    return torch.randn(m_p, d, generator=gen) * erase_emb.std().item()  # random, at the embeddings' scale


class _Latents:
    """Seeded noisy latents z_t and timesteps t for a batch of indices into `emb` (see module doc):
    the erase prompts, or the preservation prompts with `preserve_latents: own`."""

    def __init__(self, pipe, unet, config: KPOPConfig, emb: torch.Tensor, uncond: torch.Tensor,
                 gen: torch.Generator, originals: dict[str, torch.Tensor], cache_seed: int = 1):
        # gen draws the per-iteration samples (its state is checkpointed); the cache has its own
        # seed, so a resumed run rebuilds the very same cache
        from diffusers import DDIMScheduler

        self.unet, self.config, self.gen = unet, config, gen
        self.emb, self.uncond = emb, uncond  # (n, m_c, d), (1, m_c, d)
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(config.ddim_steps)
        self.device = emb.device
        size = unet.config.sample_size
        self.shape = (unet.config.in_channels, size, size)
        self.cache: torch.Tensor | None = None
        if config.latents == "cached":
            self.cache = self._trajectories(originals, torch.Generator("cpu").manual_seed(config.seed + cache_seed))

    def _denoise(self, idx: torch.Tensor, steps: int, params: dict | None, gen: torch.Generator, keep: bool = False):
        """DDIM from fresh noise for `steps` steps with CFG; params: tensors to substitute (the original model)."""
        z = (torch.randn((len(idx), *self.shape), generator=gen) * self.scheduler.init_noise_sigma).to(self.device)
        cond = torch.cat([self.uncond.expand(len(idx), -1, -1), self.emb[idx]])  # (2b, m_c, d)
        g = self.config.sample_guidance
        kept = []
        for t in self.scheduler.timesteps[:steps]:
            if keep:
                kept.append(z)
            x = self.scheduler.scale_model_input(torch.cat([z, z]), t)
            eps = _unet_out(self.unet, x, t, cond, params)
            e_u, e_c = eps.chunk(2)
            z = self.scheduler.step(e_u + g * (e_c - e_u), t, z).prev_sample
        return torch.stack(kept, 1) if keep else z  # (b, steps, c, h, w) or (b, c, h, w)

    @torch.no_grad()
    def _trajectories(self, originals: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        """(n, trajectories, ddim_steps, c, h, w): the latent before each DDIM step, original model."""
        n, k = len(self.emb), self.config.cache_trajectories
        idx = torch.arange(n).repeat_interleave(k)
        traj = self._denoise(idx, self.config.ddim_steps, originals, gen, keep=True)
        return traj.view(n, k, self.config.ddim_steps, *self.shape)

    @torch.no_grad()
    def sample(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_t (b, c, h, w), t (b,)) for prompt indices idx (b,)."""
        steps = self.config.ddim_steps
        timesteps = self.scheduler.timesteps
        if self.cache is not None:
            traj = torch.randint(self.config.cache_trajectories, (len(idx),), generator=self.gen)
            k = torch.randint(steps, (len(idx),), generator=self.gen)
            return self.cache[idx, traj, k], timesteps[k].to(self.device)
        k = int(torch.randint(steps, (1,), generator=self.gen))
        z = self._denoise(idx, k, None, self.gen)  # the current model, no prompt: what the erased model would draw
        return z, timesteps[k].repeat(len(idx)).to(self.device)


def _unet_out(unet, z: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, params: dict | None = None) -> torch.Tensor:
    """The UNet's output; with `params`, with those tensors substituted (the frozen original theta)."""
    if params is None:
        return unet(z, t, encoder_hidden_states=emb).sample
    return torch.func.functional_call(unet, params, (z, t), {"encoder_hidden_states": emb}).sample


def _finite(value: torch.Tensor, what: str, iteration: int, config: KPOPConfig) -> float:
    number = float(value.detach())
    if not math.isfinite(number):
        raise TrceError(f"KPOP diverged at iteration {iteration}: the {what} loss is {number}; "
                        f"lower lr ({config.lr}) or prompt_lr ({config.prompt_lr})")
    return number


@contextlib.contextmanager
def _training_state(unet, trainable: dict[str, torch.nn.Parameter]) -> Iterator[dict[str, torch.Tensor]]:
    """fp32 UNet with only `trainable` requiring grad; yields the original values; restores everything after.

    fp16/bf16 -> fp32 -> fp16/bf16 is exact, so untouched tensors come back bit for bit.
    """
    if getattr(unet, "is_quantized", False):
        raise TrceError("KPOP cannot train a quantized UNet; load the model in fp32, fp16 or bf16")
    flags = {name: p.requires_grad for name, p in unet.named_parameters()}
    # Adam steps of 1e-5 vanish in half precision: train in fp32, tensor by tensor (as Module.to
    # does), remembering each tensor's dtype so that mixed-precision models come back as they were
    half = {t: t.dtype for t in [*unet.parameters(), *unet.buffers()] if t.is_floating_point() and t.dtype != torch.float32}
    params = dict(unet.named_parameters())
    originals: dict[str, torch.Tensor] = {}
    try:
        for t in half:
            t.data = t.data.float()
        originals.update({name: params[name].detach().clone() for name in trainable})
        for name, p in params.items():
            p.requires_grad_(name in trainable)
        yield originals
    finally:
        with torch.no_grad():
            for name, value in originals.items():
                params[name].copy_(value)
        for name, p in params.items():
            p.requires_grad_(flags[name])
        for t, dtype in half.items():
            t.data = t.data.to(dtype)


def erase_kpop(pipe, erase_prompts: list[str], config: KPOPConfig = KPOPConfig(), *, neutral_prompt: str | None = None,
               safe_prompts: list[str] | None = None, preserve_prompts: Sequence[str] | None = None,
               other_prompts: Sequence[Sequence[str]] | None = None, spec: dict | None = None, progress: bool = True, checkpoint_dir: str | Path | None = None,
               checkpoint_every: int = 100) -> Edit:
    """Erase the concept of `erase_prompts` with KPOP; returns the Edit (the pipeline is left unchanged).

    neutral_prompt overrides config.neutral_prompt (c_n); with config.neutral == "safe", c_n of erase
    prompt i is safe_prompts[i] (required then). With config.preserve_weight > 0, `preserve_prompts` are the
    prompts c_k whose outputs the preservation term keeps (required then). With config.negative_others > 0,
    other_prompts[i] are erase prompt i with each other erased concept in its place (the same number for every
    prompt; `trce.concepts.other_concept_prompts`). With `checkpoint_dir`, the state is saved
    every `checkpoint_every` iterations and a rerun with the same settings continues from there.
    """
    if isinstance(erase_prompts, str) or not erase_prompts or not all(isinstance(p, str) and p.strip()
                                                                       for p in erase_prompts):
        raise TrceError(f"KPOP needs a non-empty list of non-empty erase prompts, got {erase_prompts!r}")
    if checkpoint_every < 1:
        raise TrceError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    erase_prompts = list(erase_prompts)
    if neutral_prompt is not None:
        config = dataclasses.replace(config, neutral_prompt=neutral_prompt)
    from trce.loading import fingerprint

    t_start = time.time()
    base = fingerprint(pipe)
    unet = pipe.unet
    device = unet.device
    layers = site_layers(unet, config.sites)
    erase_emb = _encode(pipe, erase_prompts, device)  # (n, m_c, d)
    if config.neutral == "safe":
        if safe_prompts is None or len(safe_prompts) != len(erase_prompts):
            raise TrceError("KPOP neutral=safe needs one safe prompt per erase prompt (a concept spec gives them)")
        neutral_emb = _encode(pipe, list(safe_prompts), device)  # (n, m_c, d), row i for erase prompt i
    else:
        neutral_emb = _encode(pipe, [config.neutral_prompt], device)  # (1, m_c, d)
    uncond = _encode(pipe, [""], device)  # (1, m_c, d): CFG's unconditional branch when drawing z_t
    keep_emb = None
    if config.preserve_weight > 0:
        keep = [p for p in (preserve_prompts or []) if isinstance(p, str) and p.strip()]
        if not keep:
            raise TrceError(f"KPOP preserve_weight={config.preserve_weight} needs preservation prompts (the concept "
                            "spec's `preserve:` section gives them); none were given")
        keep_emb = _encode(pipe, keep, device, chunk=256)  # (n_k, m_c, d)
    other_emb = _other_concepts(pipe, config, erase_prompts, other_prompts, device)  # (n, J-1, m_c, d) or None
    _, m_c, d = erase_emb.shape
    m_p = config.prompt_shape_tokens(m_c)
    trainable = trainable_parameters(unet, config.params)
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
    with _training_state(unet, trainable) as originals, injected(unet, None, config.mode, config.sites) as slot:
        params = dict(unet.named_parameters())
        train = [params[name] for name in trainable]
        prompt = torch.nn.Parameter(_initial_prompt(config, erase_emb, m_p, gen).to(device))  # (m_p, d)
        opt_p = torch.optim.Adam([prompt], lr=config.prompt_lr)
        opt = torch.optim.Adam(train, lr=config.lr)
        history: dict[str, list[float]] = {"transfer": [], "removal": [], "l1": [], "l2": [], "l3": []}
        start = 0
        ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
        if ckpt is not None and (ckpt / "state.json").exists():
            start, history = resume(ckpt, settings, base, train, prompt, opt, opt_p, gen, list(trainable))
        t_cache = time.time()
        latents = _Latents(pipe, unet, config, erase_emb, uncond, gen, originals)
        keep_latents = None
        if keep_emb is not None and config.preserve_latents == "own":
            if config.latents == "cached":  # a seeded subset, as many as the erase prompts: the cache stays small
                pick = torch.randperm(len(keep_emb), generator=torch.Generator("cpu").manual_seed(config.seed + 2))
                keep_emb = keep_emb[pick[: len(erase_emb)].sort().values.to(device)]
            keep_latents = _Latents(pipe, unet, config, keep_emb, uncond, gen, originals, cache_seed=2)
        t_cache = time.time() - t_cache
        t_loop = time.time()
        with tqdm(total=config.iterations, initial=start, desc="kpop", disable=not progress, mininterval=1) as bar:
            for it in range(start, config.iterations):
                values = _iteration(unet, slot, latents, keep_latents, erase_emb, neutral_emb, keep_emb, other_emb,
                                    originals, prompt, train, opt_p, opt, config, gen, it)
                for key, value in values.items():
                    history[key].append(value)
                bar.update(1)
                bar.set_postfix(transfer=f"{values['transfer']:.4f}", removal=f"{values['removal']:.4f}", refresh=False)
                if ckpt is not None and (it + 1) % checkpoint_every == 0 and it + 1 < config.iterations:
                    save_checkpoint(ckpt, it + 1, settings, base, train, prompt, opt, opt_p, gen, history,
                                     list(trainable))
        t_loop = time.time() - t_loop
        weights = {f"unet.{name}": params[name].detach().cpu().clone() for name in trainable}  # fp32
        hidden = prompt.detach().cpu().float().clone()  # (m_p, d)
    done = config.iterations - start
    info = {
        "iterations": config.iterations,
        "resumed_from": start,
        "loss": _endpoints(history),
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
    emb = _encode(pipe, [q for qs in other_prompts for q in qs], device, chunk=256)  # (n (J-1), m_c, d)
    return emb.view(len(erase_prompts), counts[0], *emb.shape[1:])


def _iteration(unet, slot, latents: _Latents, keep_latents: _Latents | None, erase_emb, neutral_emb, keep_emb,
               other_emb, originals, prompt, train, opt_p, opt, config: KPOPConfig, gen: torch.Generator,
               it: int) -> dict[str, float]:
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
        target = _unet_out(unet, torch.cat(zs), torch.cat(ts), torch.cat(conds), originals).split(
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
    loss_t = F.mse_loss(_unet_out(unet, z, t, c_e), eps_e)
    transfer = _finite(loss_t, "transfer", it + 1, config)
    (grad,) = torch.autograd.grad(loss_t, [prompt])
    prompt.grad = grad
    opt_p.step()
    opt_p.zero_grad(set_to_none=True)

    # knowledge removal, Eq. 7: one step on theta' with p_{k+1} fixed
    slot.prompt = None
    l3 = torch.zeros(())
    if keep_emb is not None:  # Ours*: the kept concepts' outputs stay the original model's
        # both terms without p in one UNet call: on a small UNet a call costs about as much at batch 2b as at b
        out_e, out_k = _unet_out(unet, torch.cat([z, zs[2]]), torch.cat([t, ts[2]]),
                                 torch.cat([c_e, conds[2]])).split([len(z), len(zs[2])])
        l1 = F.mse_loss(out_e, eps_n)
        l3 = F.mse_loss(out_k, target[2])
    else:
        l1 = F.mse_loss(_unet_out(unet, z, t, c_e), eps_n)
    slot.prompt = prompt.detach()
    l2 = F.mse_loss(_unet_out(unet, z, t, c_e), eps_e)
    slot.prompt = None
    loss_r = l1 + config.lam * l2 + config.preserve_weight * l3
    removal = _finite(loss_r, "removal", it + 1, config)
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


def _endpoints(history: dict[str, list[float]], window: int = 10) -> dict[str, dict[str, float | None]]:
    """Mean of each loss over the first and the last `window` iterations."""
    out = {}
    for key, values in history.items():
        w = min(window, len(values))
        out[key] = {"first": sum(values[:w]) / w if w else None, "last": sum(values[-w:]) / w if w else None}
    return out


# --------------------------------------------------------------------------- checkpoints
def _checkpoint_key(settings: dict, base: dict) -> dict:
    return json.loads(json.dumps({"settings": settings, "base": base["id"]}, default=str))


def save_checkpoint(folder: Path, iteration: int, settings: dict, base: dict, train, prompt, opt, opt_p, gen,
                     history: dict, names: list[str]) -> None:
    tensors = {f"param.{name}": p.detach() for name, p in zip(names, train)}
    tensors["rng"] = gen.get_state()
    opt_t, opt_s = io.optimizer_state(opt)
    tensors.update({f"opt.{k}": v for k, v in opt_t.items()})
    optp_s = None
    if prompt is not None:  # KPOP's prompt and its optimizer (ESD trains no prompt)
        tensors["prompt"] = prompt.detach()
        optp_t, optp_s = io.optimizer_state(opt_p)
        tensors.update({f"opt_p.{k}": v for k, v in optp_t.items()})
    with io.atomic_dir(folder) as tmp:
        io.save_tensors(tmp / "state.safetensors", tensors)
        io.write_json(tmp / "state.json", {"iteration": iteration, "key": _checkpoint_key(settings, base),
                                           "opt": opt_s, "opt_p": optp_s, "history": history})
    log.debug("KPOP checkpoint at iteration %d in %s", iteration, folder)


def resume(folder: Path, settings: dict, base: dict, train, prompt, opt, opt_p, gen, names: list[str]):
    state = io.read_json(folder / "state.json")
    key = _checkpoint_key(settings, base)
    if state.get("key") != key:
        old = (state.get("key") or {}).get("settings", {})
        diff = sorted(k for k in set(old) | set(key["settings"]) if old.get(k) != key["settings"].get(k))
        raise TrceError(f"the checkpoint in {folder} was made with other settings or another base model "
                        f"(differs in: {', '.join(diff) or 'base model'}); use another folder or delete it")
    tensors = io.load_tensors(folder / "state.safetensors")
    with torch.no_grad():
        for name, p in zip(names, train):
            p.copy_(tensors[f"param.{name}"])
        if prompt is not None:
            prompt.copy_(tensors["prompt"])
    gen.set_state(tensors["rng"])
    io.load_optimizer_state(opt, {k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}, state["opt"])
    if prompt is not None:
        io.load_optimizer_state(opt_p, {k[6:]: v for k, v in tensors.items() if k.startswith("opt_p.")},
                                state["opt_p"])
    log.info("resuming from iteration %d (%s)", state["iteration"], folder)
    return int(state["iteration"]), {k: list(v) for k, v in state["history"].items()}


# --------------------------------------------------------------------------- the hidden prompt
def hidden_prompt(edit: Edit) -> tuple[torch.Tensor, dict]:
    """The hidden prompt of a KPOP edit (also inside combined edits) and its injection settings."""
    settings = edit.settings
    if "injection" not in settings and isinstance(settings.get("kpop"), dict):
        settings = settings["kpop"]  # Edit.combine nests each method's settings under its name
    if "hidden_prompt" not in edit.extras or "injection" not in settings:
        raise TrceError(f"this {edit.method} patch has no hidden prompt; only KPOP patches carry one")
    injection = settings["injection"]
    mode = choose("prompt injection mode", str(injection.get("mode")), MODES)
    sites = choose("prompt injection site", str(injection.get("sites")), SITES)
    return edit.extras["hidden_prompt"], {**injection, "mode": mode, "sites": sites}


@contextlib.contextmanager
def hidden_prompt_installed(pipe, edit: Edit, apply: bool = False) -> Iterator[Any]:
    """`with hidden_prompt_installed(pipe, edit): pipe(...)` draws with the KPOP hidden prompt injected.

    The edit's weights are expected to be applied already (`load_pipeline(..., patch=DIR)`); with
    `apply=True` they are applied here and reverted on exit. The prompt recovers the erased
    concept (paper Sec. 5.6.4, Fig. 6).
    """
    prompt, injection = hidden_prompt(edit)
    width = pipe.text_encoder.config.hidden_size
    if prompt.ndim != 2 or prompt.shape[-1] != width:
        raise TrceError(f"the hidden prompt has shape {tuple(prompt.shape)}, which does not fit this model's text "
                        f"width {width}")
    prompt = prompt.to(device=pipe.unet.device, dtype=pipe.unet.dtype)
    with contextlib.ExitStack() as stack:
        if apply:
            stack.enter_context(edit.applied(pipe))
        stack.enter_context(injected(pipe, prompt, injection["mode"], injection["sites"]))
        yield pipe


def generate_with_hidden_prompt(pipe, edit: Edit, prompts: Sequence[str], seeds: Sequence[int], settings=None,
                                progress: bool = True, apply: bool = False):
    """`trce.generate.generate` with the edit's hidden prompt injected: uint8 (N, H, W, 3)."""
    from trce.generate import GenSettings, generate

    with hidden_prompt_installed(pipe, edit, apply=apply):
        return generate(pipe, prompts, seeds, settings or GenSettings(), progress=progress)
