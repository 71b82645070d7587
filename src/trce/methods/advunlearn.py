"""AdvUnlearn, the adversarial-training baseline (Zhang et al., NeurIPS 2024, "Defensive Unlearning with Adversarial
Training for Robust Concept Erasure in Diffusion Models", arXiv:2405.15234).

ESD (`trce.methods.esd`) erases a concept for the prompts it trains on, and an attacker who optimises a few input
tokens (UnlearnDiffAtk, a soft prompt) brings it back. AdvUnlearn trains against that attacker: a bi-level min-max
over the trained parameters phi and an adversarial prefix delta of k continuous input-token embeddings (k x E, the
width E of the text encoder's token table) put before the erase prompt c_e:

    min_phi   E_{c_e} [ l_u(phi, [delta*(phi); c_e]) ]  +  gamma E_{c_k} [ l_r(phi, c_k) ]
    s.t.      delta*(phi) = argmin_delta  l_atk(phi, delta)

on noisy latents z_t of the concept (t their timestep), with theta the frozen original model (text encoder tau_theta,
denoiser eps_theta) and phi the one being erased (tau_phi, eps_phi; one of the two trains, the other stays theta):

    l_atk(phi, delta) = || eps_phi(z_t, tau_phi([delta; c_e])) - eps_theta(z_t, tau_theta(c_e)) ||^2
        the attack (inner): with delta before it, the CURRENT model draws for c_e what the ORIGINAL model draws
        for c_e: the concept is back (the paper's attack objective, UnlearnDiffAtk's with the original model's
        prediction as the target). Lowering it raises the erasure loss l_u at [delta; c_e].
    l_u(phi, c)       = || eps_phi(z_t, tau_phi(c)) - [ eps_n - eta (eps_e - eps_n) ] ||^2,
                        eps_e = eps_theta(z_t, tau_theta(c_e)),  eps_n = eps_theta(z_t, tau_theta(c_n))
        ESD's unlearning loss (Gandikota et al. 2023) at the adversarial prompt c = [delta*; c_e]: the model
        predicts the original's noise negatively guided (eta, `negative_guidance`) away from c_e towards the
        neutral prompt c_n (`neutral_prompt`, "").
    l_r(phi, c_k)     = || eps_phi(z_k, tau_phi(c_k)) - eps_theta(z_k, tau_theta(c_k)) ||^2
        the utility-retaining regulariser (gamma, `preserve_weight`) on preservation prompts c_k (the paper: COCO
        captions, gamma 0.3; here the concept spec's `preserve:` prompts) at their own latents z_k (`own`, the
        released `reg` mode) or the erase prompts' (`erase`).

||.||^2 is the mean squared error over the batch. It is solved by alternation, as the paper and its released code
do: each outer iteration draws `batch_size` erase prompts and their (z_t, t), then

    1. inner maximisation of the erasure loss: delta_0 = the input embeddings of k random real tokens
       (`attack_init: random`, as the README's published commands) or the last iteration's delta (`latest`, the
       released code's default); then `attack_steps` Adam steps (`attack_lr`) on l_atk with phi fixed, each after
       the first on fresh (z_t, t) of the same prompts (`attack_latents: fresh`, as the released code) or all on the
       iteration's own (`batch`: PGD on the minibatch, one denoising per step less with `latents: current`);
    2. outer minimisation: one Adam step (`lr`) on phi for l_u(phi, [delta*; c_e]) + gamma l_r(phi, c_k), with
       delta* fixed (no gradient flows through the inner solution).

The first `warmup` iterations skip step 1 and train on the plain c_e (ESD plus the utility term), as the released
code does (200 of 1000). `attack_steps: 0` is that without an end: ESD on the chosen module with the utility term.
Published settings (the defaults): lr 1e-5, 1000 iterations, 30 attack steps with Adam at 1e-3, prefix attack,
utility weight 0.3 with retain batch 5, eta 1, ESD's sampling (50 DDIM steps, guidance 3), and a prefix of k = 1
token (`attack_tokens`: the released script's `adv_prompt_num` default, which its published command keeps; 5 is
UnlearnDiffAtk's prefix length, a variant to set by hand).

Which module (`module`). The paper's key finding: optimise the TEXT ENCODER (the default). Adversarial training of
the UNet erases robustly but costs image quality much more, while the text encoder trained so keeps utility and
carries its robustness to other models built on the same encoder (transferability). Trained there: every
parameter of the text encoder(s) except the input embeddings (token and position tables), the released
`text_encoder_full`, and of those only the ones the conditioning depends on (found by one backward pass at the
start): SD 1.x/2.x: the CLIP encoder; SDXL: both CLIP encoders (the first's last layer and final norm are not read,
SDXL conditions on penultimate states; the second's are, through its pooled embedding); SD3: both CLIP encoders
(token-id encoding does not support T5: load it with text_encoder_3=None); FLUX: T5 only (the family encodes the
CLIP-L pooled vector from the prompt's text without gradients; T5's own tokenizer has no start token to put the
prefix after, so there only `attack_steps: 0` runs). `module: unet` trains the denoiser's parameter group
`unet_params` instead (of the transformer on SD3 and FLUX): `cross-attn`, every cross-attention parameter as
ESD-x, or `non-cross-attn` as ESD-u; the paper's UNet ablation. The noisy latents follow ESD (`latents`,
`trce.methods.training.NoisyLatents`): the erase prompts' conditioning is the ORIGINAL text encoder's, so with the
text encoder trained they are the original model's samples.

The result is an `Edit` of the trained tensors by exact path (component, then the name inside it as the installed
transformers gives it: `text_encoder.encoder.layers.0.mlp.fc1.weight`, `text_encoder_2....`; or `unet....`), so
apply, revert, `trce eval --patch` and `trce attack --patch` work as for any patch. Training runs in fp32 with the
pipeline restored bit for bit; checkpoints resume a killed run (`trce.methods.training.Checkpoints`); a non-finite
loss stops training naming the step.

Reference: OPTML-Group/AdvUnlearn at 9d231249 (train-scripts/AdvUnlearn.py with its README command, utils/
attack_util.py, utils/get_loss.py, utils/util.py). Documented differences (docs/fidelity.md): the prefix length (5,
the script's default 1); the attack's Adam clears its gradient every step (the reference never calls
`attack_opt.zero_grad()`, so its steps use the running sum of every gradient so far); delta_0 from real tokens
(the reference: any id); the outer step reuses the iteration's (z_t, t), the attack's first (the reference draws
fresh ones); the prompt's tokens are all kept after the prefix (the reference splits the ids by the prompt's WORD
count and drops k tokens after them); z_t is paired with its own timestep (as in ESD, `trce.methods.esd`).
`tests/test_esd_advunlearn_parity.py` checks the targets and the trained set against the reference's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trce.edit import Edit
from trce.errors import TrceError, choose
from trce.families import family_of
from trce.methods.kpop import Group, Latents, PreserveLatents
from trce.methods.training import (
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
from trce.registry import Context

log = logging.getLogger(__name__)

Module = Literal["text-encoder", "unet"]
AttackInit = Literal["random", "latest"]
AttackLatents = Literal["fresh", "batch"]
ADVERSARY = "adversary"  # the checkpoint name of the warm-started prefix (`attack_init: latest`)


@dataclass(frozen=True)
class AdvUnlearnConfig:
    """Every AdvUnlearn setting; recorded in the patch's `settings`. Defaults: the paper's (see the module doc)."""

    iterations: int = 1000
    lr: float = 1e-5  # Adam on phi
    module: Module = "text-encoder"  # what phi is: the text encoder(s) (the paper's choice) or the denoiser
    unet_params: Group = "cross-attn"  # the denoiser's group with module: unet (ESD-x; non-cross-attn: ESD-u)
    negative_guidance: float = 1.0  # eta of ESD's target
    neutral_prompt: str = ""  # c_n
    attack_steps: int = 30  # inner Adam steps per outer iteration (0: no adversary)
    attack_tokens: int = 1  # k, the adversarial prefix length (the released script's adv_prompt_num default)
    attack_lr: float = 1e-3  # Adam on delta
    attack_init: AttackInit = "random"  # delta_0: random tokens' embeddings, or the last iteration's delta
    attack_latents: AttackLatents = "fresh"  # each attack step on fresh (z_t, t), or all on the iteration's own
    warmup: int = 200  # outer iterations on the plain prompts before the adversary starts
    preserve_weight: float = 0.3  # gamma, the utility term (0: off)
    preserve_batch: int = 5  # preservation prompts per iteration
    preserve_latents: PreserveLatents = "own"  # z_k: the preservation prompts' own latents, or the erase prompts'
    batch_size: int = 1  # erase prompts per iteration
    seed: int = 0
    latents: Latents = "current"  # ESD's: denoised by the current model; cached: the original's trajectories
    ddim_steps: int = 50
    sample_guidance: float = 3.0
    cache_trajectories: int = 4
    checkpoint_every: int = 100  # iterations between checkpoints (operational: not part of the run's key)

    def __post_init__(self) -> None:
        for name, kind in (("module", Module), ("unet_params", Group), ("attack_init", AttackInit),
                           ("attack_latents", AttackLatents), ("preserve_latents", PreserveLatents),
                           ("latents", Latents)):
            choose(f"AdvUnlearn {name}", getattr(self, name), get_args(kind))
        check_numbers(self, "AdvUnlearn",
                      integers=("iterations", "attack_tokens", "preserve_batch", "batch_size", "ddim_steps",
                                "cache_trajectories", "checkpoint_every"),
                      non_negative_integers=("attack_steps", "warmup"),
                      positive=("lr", "attack_lr"),
                      non_negative=("negative_guidance", "preserve_weight", "sample_guidance"))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TrceError(f"AdvUnlearn seed must be an integer, got {self.seed!r}")
        if not isinstance(self.neutral_prompt, str):
            raise TrceError(f"AdvUnlearn neutral_prompt must be a string, got {self.neutral_prompt!r}")

    @property
    def adversarial(self) -> bool:
        """Whether any iteration runs the attack."""
        return self.attack_steps > 0 and self.warmup < self.iterations


# --------------------------------------------------------------------------- what trains
def _component_name(pipe, family, module: torch.nn.Module) -> str:
    for name, value in family.components(pipe).items():
        if value is module:
            return name
    raise TrceError(f"the text encoder {type(module).__name__} is not a component of the pipeline")


def text_candidates(pipe) -> dict[str, dict[str, torch.nn.Parameter]]:
    """Per text-encoder component name, its parameters but the input embeddings (token and position tables):
    the released `text_encoder_full`."""
    family = family_of(pipe)
    out = {}
    for te in family.text_encoders(pipe):
        tables = {id(m.weight) for m in te.modules() if isinstance(m, torch.nn.Embedding)}
        out[_component_name(pipe, family, te)] = {n: p for n, p in te.named_parameters() if id(p) not in tables}
    return out


def _reached(pipe, family, ids: torch.Tensor, candidates: dict[str, dict[str, torch.nn.Parameter]],
             ) -> dict[str, torch.nn.Parameter]:
    """The candidates the conditioning of `ids` (1, L) depends on, by `Edit` path (one backward pass; the others
    stop requiring grad)."""
    flat = [(f"{comp}.{name}", p) for comp, params in candidates.items() for name, p in params.items()]
    cond = family.encode_ids(pipe, ids)  # (1, L', D), through every text encoder the family reads
    grads = torch.autograd.grad(cond.float().sum(), [p for _, p in flat], allow_unused=True)
    out = {}
    for (path, p), g in zip(flat, grads):
        if g is None:
            p.requires_grad_(False)
        else:
            out[path] = p
    if not out:
        raise TrceError("AdvUnlearn: the conditioning does not depend on any text-encoder parameter it could train "
                        "here; use module=unet")
    return out


# --------------------------------------------------------------------------- the run
def erase_advunlearn(pipe, erase_prompts: list[str], config: AdvUnlearnConfig = AdvUnlearnConfig(), *,
                     preserve_prompts: Sequence[str] | None = None, spec: dict | None = None, progress: bool = True,
                     checkpoint_dir: str | Path | None = None, checkpoint_every: int | None = None,
                     cache_dir: str | Path | None = None) -> Edit:
    """Erase the concept of `erase_prompts` with AdvUnlearn; returns the Edit (the pipeline is left unchanged).

    `preserve_prompts` are the utility term's prompts c_k (required when config.preserve_weight > 0). The state is
    saved every `checkpoint_every` iterations in `checkpoint_dir` (or, without one, in `<cache_dir>/runs/
    advunlearn-<key>`; neither: no checkpoints) and a rerun with the same settings continues from there; a
    finished run removes its checkpoints.
    """
    if isinstance(erase_prompts, str) or not erase_prompts or not all(isinstance(p, str) and p.strip()
                                                                       for p in erase_prompts):
        raise TrceError(f"AdvUnlearn needs a non-empty list of non-empty erase prompts, got {erase_prompts!r}")
    checkpoint_every = config.checkpoint_every if checkpoint_every is None else checkpoint_every
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise TrceError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    erase_prompts = list(erase_prompts)
    if config.attack_steps and not config.adversarial:
        log.warning("AdvUnlearn warmup=%d covers all %d iterations: no iteration is attacked (ESD with the utility "
                    "term)", config.warmup, config.iterations)
    keep: list[str] = []
    if config.preserve_weight > 0:
        keep = [p for p in (preserve_prompts or []) if isinstance(p, str) and p.strip()]
        if not keep:
            raise TrceError(f"AdvUnlearn preserve_weight={config.preserve_weight} needs preservation prompts (the "
                            "concept spec's `preserve:` section gives them); none were given. Set "
                            "advunlearn.preserve_weight=0 to train without the utility term")
    from trce.attacks.base import compose
    from trce.attacks.unlearndiff import candidate_table
    from trce.attacks.vocabulary import Vocabulary
    from trce.edit import fingerprint
    from trce.tokens import tokenize

    t_start = time.time()
    base = fingerprint(pipe)
    family = family_of(pipe)
    unet = family.denoiser(pipe)
    device = unet.device
    tok = family.tokenizer(pipe)
    k = config.attack_tokens
    if config.adversarial and tok.bos_token_id is None:
        raise TrceError("AdvUnlearn puts its adversarial tokens right after the start token, and this model's "
                        "tokenizer has none; use attack_steps=0 (no adversary)")
    if keep and config.preserve_latents == "own" and config.latents == "cached":
        # a seeded subset, as many as the erase prompts (at least a batch): the trajectory cache stays small
        n = min(len(keep), max(len(erase_prompts), config.preserve_batch))
        pick = torch.randperm(len(keep), generator=torch.Generator("cpu").manual_seed(config.seed + 2))[:n]
        keep = [keep[i] for i in pick.sort().values.tolist()]

    # the ORIGINAL model's conditionings (tau_theta), fp32
    erase_emb = encode_prompts(pipe, erase_prompts, device=device)  # (n, L, D)
    neutral_emb = encode_prompts(pipe, [config.neutral_prompt], device=device)  # (1, L, D)
    uncond = family.unconditional(pipe).to(device=device, dtype=torch.float32)  # (1, L, D): CFG's unconditional half
    keep_emb = encode_prompts(pipe, keep, chunk=256, device=device) if keep else None  # (n_k, L, D)
    # token ids the CURRENT text encoder reads: plain prompts, and [start; k slots; prompt; end] for delta
    plain_ids = tokenize(tok, erase_prompts)  # (n, L_tok)
    slots = slice(1, 1 + k)
    adv_ids = None
    if config.adversarial:
        adv_ids = torch.stack([compose(tok, [tok.bos_token_id] * k, p)[0] for p in erase_prompts])  # (n, L_tok)
    keep_ids = tokenize(tok, keep) if keep else None  # (n_k, L_tok)
    vocab = table = None
    if config.adversarial:
        vocab = Vocabulary.for_pipeline(pipe)  # delta_0's random tokens: any real token
        table = candidate_table(pipe, vocab).to(device)  # (A, E) their input embeddings (never trained)

    te_mode = config.module == "text-encoder"
    candidates = text_candidates(pipe)
    encoders = family.text_encoders(pipe)
    with contextlib.ExitStack() as stack:
        # fp32 throughout, only phi requiring grad; everything restored bit for bit on exit
        for te, comp in zip(encoders, candidates):
            stack.enter_context(training_state(te, candidates[comp] if te_mode else {}))
        unet_trainable = {} if te_mode else family.trainable(unet, config.unet_params)
        originals = stack.enter_context(training_state(unet, unet_trainable))
        if te_mode:
            trainable = _reached(pipe, family, plain_ids[:1], candidates)  # Edit path -> parameter
            group = "text-encoder"
        else:
            trainable = {f"{family.denoiser_name}.{n}": p for n, p in unet_trainable.items()}
            group = config.unet_params
        settings = {
            **dataclasses.asdict(config),
            "erase_prompts": erase_prompts,
            **({"preserve_prompts": {"n": len(keep), "sha256": _digest(keep)}} if keep else {}),
            "trainable": {"module": config.module, "group": group, "tensors": len(trainable),
                          "parameters": sum(p.numel() for p in trainable.values()),
                          "components": sorted({path.split(".", 1)[0] for path in trainable})},
        }
        gen = torch.Generator("cpu").manual_seed(config.seed)
        ckpt = run_checkpoints("advunlearn", settings, base, checkpoint_dir, cache_dir)
        names, train = list(trainable), list(trainable.values())
        opt = torch.optim.Adam(train, lr=config.lr)
        # the warm-started prefix travels with the checkpoint as one more tensor (set from the first attack on)
        warm = config.adversarial and config.attack_init == "latest"
        last = torch.zeros(config.batch_size, k, table.shape[1], device=device) if warm else None  # (b, k, E)
        saved_names, saved_tensors = (names + [ADVERSARY], train + [last]) if warm else (names, train)
        start, saved = restore_state(ckpt, saved_names, saved_tensors, opt, gen)
        history: dict[str, list[float]] = saved or {"loss": [], "unlearn": [], "retain": [], "attack_start": [],
                                                    "attack": [], "plain": []}
        params_orig = originals if not te_mode else None  # eps_theta: the denoiser with its original tensors
        t_cache = time.time()
        latents = NoisyLatents(pipe, unet, config, erase_emb, uncond, gen, params_orig)
        keep_latents = None
        if keep_emb is not None and config.preserve_latents == "own":
            keep_latents = NoisyLatents(pipe, unet, config, keep_emb, uncond, gen, params_orig, cache_seed=2)
        t_cache = time.time() - t_cache
        step = _Step(pipe, family, unet, config, latents, keep_latents, erase_emb, neutral_emb, keep_emb, plain_ids,
                     adv_ids, keep_ids, slots, table, vocab, params_orig, te_mode, train, opt, gen, ckpt)
        t_loop = time.time()
        with tqdm(total=config.iterations, initial=start, desc="advunlearn", disable=not progress,
                  mininterval=1) as bar:
            for it in range(start, config.iterations):
                values = step(it, last if warm and it > config.warmup else None)
                delta = values.pop("delta", None)  # (b, k, E) delta* of this iteration
                if warm and delta is not None:
                    last.copy_(delta)
                for key, value in values.items():
                    history[key].append(value)
                bar.update(1)
                bar.set_postfix(loss=f"{values['loss']:.4f}",
                                **({"attack": f"{values['attack']:.4f}"} if "attack" in values else {}), refresh=False)
                if ckpt is not None and (it + 1) % checkpoint_every == 0 and it + 1 < config.iterations:
                    save_state(ckpt, it + 1, saved_names, saved_tensors, opt, gen, history)
        t_loop = time.time() - t_loop
        weights = {path: p.detach().cpu().clone() for path, p in trainable.items()}  # fp32
    done = config.iterations - start
    attacked = len(history["attack"])
    info: dict[str, Any] = {
        "iterations": config.iterations, "resumed_from": start, "loss": endpoints(history),
        "history": {key: v[:: max(1, len(v) // 100)] for key, v in history.items()},
        "history_every": max(1, len(history["loss"]) // 100),
        "attacked_iterations": attacked,
        # on each attacked iteration's own batch: how often the adversary's prefix brought the concept back
        # closer than the plain prompt does (l_atk at delta* below l_atk at c_e)
        "adversary_beats_plain": (sum(a < p for a, p in zip(history["attack"], history["plain"])) / attacked
                                  if attacked else None),
        "seconds": round(time.time() - t_start, 3), "seconds_cache": round(t_cache, 3),
        "seconds_per_iteration": round(t_loop / max(1, done), 5), "device": str(device),
    }
    log.info("AdvUnlearn: %d iterations (%d attacked) in %.1f s; loss %s", done, attacked, info["seconds"],
             info["loss"]["loss"])
    if ckpt is not None:
        ckpt.finish()
    return Edit(weights=weights, method="advunlearn", spec=spec or {"erase": erase_prompts}, settings=settings,
                base=base, info=info)


@dataclass
class _Step:
    """One outer iteration (inner attack, then the outer step); returns its losses (and delta* as `delta`)."""

    pipe: Any
    family: Any
    unet: torch.nn.Module
    config: AdvUnlearnConfig
    latents: NoisyLatents
    keep_latents: NoisyLatents | None
    erase_emb: torch.Tensor  # (n, L, D) tau_theta(c_e)
    neutral_emb: torch.Tensor  # (1, L, D) tau_theta(c_n)
    keep_emb: torch.Tensor | None  # (n_k, L, D) tau_theta(c_k)
    plain_ids: torch.Tensor  # (n, L_tok)
    adv_ids: torch.Tensor | None  # (n, L_tok): [start; k slots; prompt; end]
    keep_ids: torch.Tensor | None  # (n_k, L_tok)
    slots: slice
    table: torch.Tensor | None  # (A, E) real tokens' input embeddings
    vocab: Any
    params_orig: dict[str, torch.Tensor] | None  # the denoiser's original tensors (None: it does not train)
    te_mode: bool
    train: list[torch.Tensor]
    opt: torch.optim.Optimizer
    gen: torch.Generator
    ckpt: Any

    def encode(self, ids: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        """(b, L_tok) ids [+ (b, k, E) delta at the slots] -> (b, L, D) fp32 conditioning by the CURRENT text
        encoder (differentiable in phi when it trains, and in delta)."""
        cond = self.family.encode_ids(self.pipe, ids, self.slots if delta is not None else None, delta)
        return cond.to(device=self.unet.device, dtype=torch.float32)

    @torch.no_grad()
    def original(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """eps_theta(z, t, cond): the frozen original denoiser."""
        return self.family.predict(self.unet, z, t, cond, self.params_orig)

    def current(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """eps_phi(z, t, cond): the denoiser being erased (the original one when the text encoder trains)."""
        return self.family.predict(self.unet, z, t, cond)

    def attack(self, it: int, idx: torch.Tensor, z: torch.Tensor, t: torch.Tensor, eps_e: torch.Tensor,
               delta0: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        """delta* (b, k, E) after `attack_steps` Adam steps on l_atk from delta0 (None: random tokens), and l_atk
        at the start."""
        cfg = self.config
        if delta0 is None:
            rows = self.vocab.sample((len(idx), cfg.attack_tokens), self.gen)  # (b, k) random real tokens
            delta0 = self.table[rows]  # (b, k, E)
        delta = delta0.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([delta], lr=cfg.attack_lr)
        ids = self.adv_ids[idx]  # (b, L_tok)
        c_e = self.erase_emb[idx]  # (b, L, D)
        first = float("nan")
        for s in range(cfg.attack_steps):
            if cfg.attack_latents == "fresh" and s:
                z, t = self.latents.sample(idx)  # (b, c, h, w), (b,)
                eps_e = self.original(z, t, c_e)
            loss = F.mse_loss(self.current(z, t, self.encode(ids, delta)), eps_e)  # l_atk
            value = finite_loss(loss, "AdvUnlearn (attack)", it + 1, cfg.iterations, self.ckpt,
                                f"lower attack_lr ({cfg.attack_lr})")
            if s == 0:
                first = value
            (grad,) = torch.autograd.grad(loss, [delta])
            delta.grad = grad
            opt.step()
            opt.zero_grad(set_to_none=True)
        return delta.detach(), first

    def __call__(self, it: int, delta0: torch.Tensor | None) -> dict[str, Any]:
        cfg = self.config
        idx = torch.randint(len(self.erase_emb), (cfg.batch_size,), generator=self.gen)  # (b,) erase prompts
        z, t = self.latents.sample(idx)  # (b, c, h, w), (b,)
        c_e = self.erase_emb[idx]  # (b, L, D) tau_theta(c_e)
        c_n = self.neutral_emb.expand(len(idx), -1, -1)  # (b, L, D)
        both = self.original(torch.cat([z, z]), torch.cat([t, t]), torch.cat([c_e, c_n]))
        eps_e, eps_n = both.chunk(2)  # (b, c, h, w) each
        target = eps_n - cfg.negative_guidance * (eps_e - eps_n)  # ESD's negatively guided target
        out: dict[str, Any] = {}
        delta = None
        if cfg.attack_steps and it >= cfg.warmup:  # 1. inner: the adversarial prefix on the current model
            delta, out["attack_start"] = self.attack(it, idx, z, t, eps_e, delta0)
            out["delta"] = delta
        # 2. outer: one step on phi at [delta*; c_e] (the plain c_e during warmup)
        if delta is not None:
            cond = self.encode(self.adv_ids[idx], delta)  # tau_phi([delta*; c_e])
        else:
            cond = self.encode(self.plain_ids[idx], None) if self.te_mode else c_e  # tau_phi(c_e)
        pred = self.current(z, t, cond)  # (b, c, h, w)
        unlearn = F.mse_loss(pred, target)  # l_u
        retain = torch.zeros((), device=pred.device)
        if self.keep_emb is not None:  # l_r: the preservation prompts keep the original predictions
            kidx = torch.randint(len(self.keep_emb), (cfg.preserve_batch,), generator=self.gen)  # (b_k,)
            if self.keep_latents is not None:
                z_k, t_k = self.keep_latents.sample(kidx)  # (b_k, c, h, w), (b_k,)
            else:
                pos = torch.arange(cfg.preserve_batch) % len(idx)  # the erase prompts' latents, cycled
                z_k, t_k = z[pos.to(z.device)], t[pos.to(t.device)]
            c_k = self.keep_emb[kidx]  # (b_k, L, D) tau_theta(c_k)
            target_k = self.original(z_k, t_k, c_k)
            cond_k = self.encode(self.keep_ids[kidx], None) if self.te_mode else c_k  # tau_phi(c_k)
            retain = F.mse_loss(self.current(z_k, t_k, cond_k), target_k)
        loss = unlearn + cfg.preserve_weight * retain
        out["loss"] = finite_loss(loss, "AdvUnlearn", it + 1, cfg.iterations, self.ckpt, f"lower lr ({cfg.lr})")
        grads = torch.autograd.grad(loss, self.train, allow_unused=True)
        for p, g in zip(self.train, grads):
            p.grad = g
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        out["unlearn"] = float(unlearn.detach())
        out["retain"] = float(retain.detach())
        if delta is not None:  # l_atk on this batch at delta* and at the plain prompt (before the step)
            out["attack"] = float(F.mse_loss(pred.detach(), eps_e))
            with torch.no_grad():
                out["plain"] = float(F.mse_loss(self.current(z, t, self.encode(self.plain_ids[idx], None)), eps_e))
        return out


def _digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def run(pipe, specs, config: AdvUnlearnConfig, context: Context) -> Edit:
    """AdvUnlearn (the registry's stage function): the specs' malicious prompts are the erase prompts c_e, their
    preservation prompts the utility term's c_k; checkpoints go under the context's cache (a killed run resumes)."""
    from trce.concepts import preservation_prompts_of, spec_record
    from trce.methods.prior import cache_dir

    prompts = list(dict.fromkeys(p.malicious for s in specs for p in s.pairs()))
    keep = None
    if config.preserve_weight > 0:  # read only when used: COCO captions need the data folder
        keep = preservation_prompts_of(specs, context.data_dir)
    return erase_advunlearn(pipe, prompts, config, preserve_prompts=keep, spec=spec_record(specs),
                            progress=context.progress, checkpoint_dir=context.checkpoint_dir,
                            cache_dir=cache_dir(context.cache_dir) if context.use_cache else None)
