"""What every training stage shares (TRCE stage V, KPOP, ESD): prompt encoding in chunks, the frozen original,
guided DDIM trajectories, the seeded noisy latents z_t, checkpoints that resume, and the stop on a non-finite loss.

All of it goes through the pipeline's model family (`trce.families`), so a stage is written once for
every architecture.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from trce.errors import TrceError
from trce.utils import io

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- settings and records
def check_numbers(config: Any, what: str, integers: Sequence[str] = (), positive: Sequence[str] = (),
                  non_negative: Sequence[str] = (), non_negative_integers: Sequence[str] = ()) -> None:
    """Positive integers, integers >= 0, positive finite numbers and finite numbers >= 0 among a config's fields."""
    for name in integers:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TrceError(f"{what} {name} must be a positive integer, got {value!r}")
    for name in non_negative_integers:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TrceError(f"{what} {name} must be an integer >= 0, got {value!r}")
    for name, low_ok in [(n, False) for n in positive] + [(n, True) for n in non_negative]:
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                or value < 0 or (value == 0 and not low_ok):
            raise TrceError(f"{what} {name} must be a {'number >= 0' if low_ok else 'positive number'}, got {value!r}")


def endpoints(history: dict[str, list[float]], window: int = 10) -> dict[str, dict[str, float | None]]:
    """Mean of each loss over the first and the last `window` iterations."""
    out = {}
    for key, values in history.items():
        w = min(window, len(values))
        out[key] = {"first": sum(values[:w]) / w if w else None, "last": sum(values[-w:]) / w if w else None}
    return out


# --------------------------------------------------------------------------- prompts
@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], *, chunk: int | None = None, device=None,
                   dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """(N, L, D) conditionings exactly as the pipeline conditions on them, `chunk` prompts a call (None: all at
    once), moved to `device` (None: where they are) in `dtype` (None: as encoded)."""
    from trce.families import family_of

    fam = family_of(pipe)
    prompts = list(prompts)
    step = chunk or max(1, len(prompts))
    parts = [fam.encode(pipe, prompts[i:i + step]) for i in range(0, len(prompts), step)]
    out = torch.cat(parts)
    return out.to(device=device if device is not None else out.device, dtype=dtype if dtype is not None else out.dtype)


# --------------------------------------------------------------------------- the model being trained
@contextlib.contextmanager
def training_state(denoiser, trainable: dict[str, torch.nn.Parameter]) -> Iterator[dict[str, torch.Tensor]]:
    """fp32 denoiser with only `trainable` requiring grad; yields the original values of the trained tensors (the
    frozen original for `family.predict(..., params=originals)`); restores everything after, even on error.

    fp16/bf16 -> fp32 -> fp16/bf16 is exact, so untouched tensors come back bit for bit.
    """
    if getattr(denoiser, "is_quantized", False):
        raise TrceError("trce cannot train a quantized denoiser; load the model in fp32, fp16 or bf16")
    flags = {name: p.requires_grad for name, p in denoiser.named_parameters()}
    # Adam steps of 1e-5 vanish in half precision: train in fp32, tensor by tensor (as Module.to
    # does), remembering each tensor's dtype so that mixed-precision models come back as they were
    half = {t: t.dtype for t in [*denoiser.parameters(), *denoiser.buffers()]
            if t.is_floating_point() and t.dtype != torch.float32}
    params = dict(denoiser.named_parameters())
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


# --------------------------------------------------------------------------- trajectories
def guided_ddim(sched, z: torch.Tensor, conds: Sequence[torch.Tensor], guidance: float, steps: int,
                predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                on_step: Callable[[int, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]], None] | None = None,
                ) -> torch.Tensor:
    """Sample `steps` steps from z with classifier-free guidance; returns the latent after them.

    conds: [unconditional (B, L, D), conditional (B, L, D), *more]; every condition is predicted in one
    call on the same latents, the update uses eps_u + guidance (eps_c - eps_u) of the first two, and
    `on_step(k, t, x, eps)` sees each step's model input x and every condition's prediction before
    the update (stage V's targets come from the extra conditions).
    """
    n = len(conds)
    cond = torch.cat(list(conds))  # (n B, L, D)
    for k, t in enumerate(sched.timesteps[:steps]):
        x = sched.scale_model_input(z, t)
        eps = predict(torch.cat([x] * n), t, cond).chunk(n)  # n x (B, C, h, w)
        if on_step is not None:
            on_step(k, t, x, eps)
        z = sched.step(eps[0] + guidance * (eps[1] - eps[0]), t, z).prev_sample
    return z


class NoisyLatents:
    """Seeded noisy latents z_t and timesteps t for batches of indices into `emb` (KPOP, ESD).

    `current` (ESD's recipe): each call denoises fresh seeded noise with the CURRENT model (guidance
    `sample_guidance`, no KPOP prompt) for a random number k of the `ddim_steps` steps; z_t is the latent after
    k steps and t its timestep. `cached`: `cache_trajectories` trajectories per prompt drawn once with the
    ORIGINAL model (`originals`), each call a random (prompt, trajectory, step). `gen` draws the samples (its
    state is checkpointed); the cache has its own seed, so a resumed run rebuilds the very same cache.
    """

    def __init__(self, pipe, denoiser, config, emb: torch.Tensor, uncond: torch.Tensor, gen: torch.Generator,
                 originals: dict[str, torch.Tensor], cache_seed: int = 1):
        from trce.families import family_of

        self.family = family_of(pipe)
        self.denoiser, self.config, self.gen = denoiser, config, gen
        self.emb, self.uncond = emb, uncond  # (n, m_c, d), (1, m_c, d)
        self.scheduler = self.family.sampler(pipe.scheduler.config, config.ddim_steps)
        self.device = emb.device
        self.shape = self.family.latent_shape(pipe)  # the pipeline's native size (a FLUX transformer has none)
        self.cache: torch.Tensor | None = None
        if config.latents == "cached":
            self.cache = self._trajectories(originals, torch.Generator("cpu").manual_seed(config.seed + cache_seed))

    def _denoise(self, idx: torch.Tensor, steps: int, params: dict | None, gen: torch.Generator, keep: bool = False):
        """DDIM from fresh noise for `steps` steps with CFG; params: tensors to substitute (the original model)."""
        z = (torch.randn((len(idx), *self.shape), generator=gen) * self.scheduler.init_noise_sigma).to(self.device)
        kept: list[torch.Tensor] = []

        def predict(x, t, cond):
            return self.family.predict(self.denoiser, x, t, cond, params)

        z = guided_ddim(self.scheduler, z, [self.uncond.expand(len(idx), -1, -1), self.emb[idx]],
                        self.config.sample_guidance, steps, predict,
                        on_step=(lambda k, t, x, eps: kept.append(x)) if keep else None)
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


# --------------------------------------------------------------------------- checkpoints
def run_digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class Checkpoints:
    """A training run's checkpoints: `folder/step-NNNNNNNN/` holding the run's safetensors files and `state.json`
    (written last: a folder without it is not a checkpoint), each renamed into place atomically; only the
    latest is kept. `key` (JSON-able) says which run they belong to: a folder of another run is refused,
    naming the settings that differ."""

    def __init__(self, folder: str | Path, key: Any, what: str):
        self.folder = Path(folder)
        self.key = json.loads(json.dumps(key, default=str))
        self.what = what

    def _steps(self) -> list[Path]:
        found = [p for p in self.folder.glob("step-*") if (p / "state.json").exists()] if self.folder.is_dir() else []
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def save(self, step: int, files: dict[str, dict[str, torch.Tensor]], state: dict) -> Path:
        """Write checkpoint `step`: `files` maps a safetensors file name to its tensors; `state` is JSON."""
        target = self.folder / f"step-{step:08d}"
        with io.atomic_dir(target) as tmp:
            for name, tensors in files.items():
                io.save_tensors(tmp / name, tensors)
            io.write_json(tmp / "state.json", {"key": self.key, "step": step, **state})
        for old in self._steps():
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
        log.debug("%s checkpoint at step %d in %s", self.what, step, target)
        return target

    def load(self) -> tuple[int, dict[str, dict[str, torch.Tensor]], dict, Path] | None:
        """(step, tensors by file name, state, folder) of the latest checkpoint, or None."""
        if self.folder.is_dir():
            for stale in self.folder.glob(".step-*"):  # temporary folders of a run killed while saving
                shutil.rmtree(stale, ignore_errors=True)
        found = self._steps()
        if not found:
            return None
        last = found[-1]
        state = io.read_json(last / "state.json")
        if state.get("key") != self.key:
            differ = [d.removeprefix("settings.") for d in _differences(state.get("key"), self.key)]
            raise TrceError(f"checkpoint {last} belongs to another {self.what} run (differs in: "
                            f"{', '.join(differ) or 'its inputs'}); delete it or choose another checkpoint folder")
        files = {p.name: io.load_tensors(p) for p in sorted(last.glob("*.safetensors"))}
        log.info("%s: resuming from %s (step %d)", self.what, last, state["step"])
        return int(state["step"]), files, state, last

    def last_step(self) -> int | None:
        found = self._steps()
        return int(found[-1].name.split("-")[1]) if found else None

    def finish(self) -> None:
        """The run is done (its Edit holds the result): remove the checkpoints."""
        shutil.rmtree(self.folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.folder.parent.rmdir()  # the shared runs folder, when no other run is in it


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out.extend(_differences(old.get(k), new.get(k), f"{prefix}{k}."))
        return out
    return [prefix.rstrip(".")] if old != new else []


# --------------------------------------------------------------------------- stopping on NaN
def finite_loss(value: torch.Tensor | float, what: str, step: int, total: int, checkpoints: Checkpoints | None,
                hint: str) -> float:
    """The loss as a float; a NaN/inf stops training with one message naming the step and what was kept."""
    number = float(value.detach() if isinstance(value, torch.Tensor) else value)
    if math.isfinite(number):
        return number
    last = checkpoints.last_step() if checkpoints is not None else None
    if last is not None:
        kept = f"the last good checkpoint (step {last}) is kept in {checkpoints.folder}"
    else:
        kept = "no checkpoint was written before it"
    raise TrceError(f"{what} diverged: the loss is {number} (not finite) at step {step} of {total}; training stopped "
                    f"and {kept}; {hint}")


# --------------------------------------------------------------------------- KPOP / ESD training state
def save_state(ckpt: Checkpoints, step: int, names: Sequence[str], train: Sequence[torch.Tensor], opt, gen,
               history: dict, prompt: torch.Tensor | None = None, opt_p=None) -> None:
    """Checkpoint the trained tensors, their Adam state, the sampling generator and the loss history (and KPOP's
    prompt with its optimizer)."""
    tensors = {f"param.{name}": p.detach() for name, p in zip(names, train)}
    tensors["rng"] = gen.get_state()
    opt_t, opt_s = io.optimizer_state(opt)
    tensors.update({f"opt.{k}": v for k, v in opt_t.items()})
    optp_s = None
    if prompt is not None:
        tensors["prompt"] = prompt.detach()
        optp_t, optp_s = io.optimizer_state(opt_p)
        tensors.update({f"opt_p.{k}": v for k, v in optp_t.items()})
    ckpt.save(step, {"state.safetensors": tensors}, {"opt": opt_s, "opt_p": optp_s, "history": history})


def restore_state(ckpt: Checkpoints | None, names: Sequence[str], train: Sequence[torch.Tensor], opt, gen,
                  prompt: torch.Tensor | None = None, opt_p=None) -> tuple[int, dict | None]:
    """(step, history) of the latest checkpoint, written back into the given objects; (0, None) without one."""
    found = ckpt.load() if ckpt is not None else None
    if found is None:
        return 0, None
    step, files, state, where = found
    tensors = files.get("state.safetensors", {})
    missing = [n for n in names if f"param.{n}" not in tensors]
    if missing:
        raise TrceError(f"checkpoint {where} does not hold the tensors this run trains ({missing[0]}, ...); delete it")
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
    return step, {k: list(v) for k, v in state["history"].items()}


def run_checkpoints(what: str, settings: dict, base: dict, checkpoint_dir: str | Path | None,
                    cache_dir: str | Path | None) -> Checkpoints | None:
    """The checkpoints of a KPOP / ESD run keyed by its settings and base model: in `checkpoint_dir` when given,
    else in `<cache_dir>/runs/<what>-<digest>` (None: no cache, no checkpoints)."""
    key = {"settings": {k: v for k, v in settings.items() if k != "checkpoint_every"}, "base": base["id"]}
    if checkpoint_dir is not None:
        return Checkpoints(checkpoint_dir, key, what)
    if cache_dir is None:
        return None
    return Checkpoints(Path(cache_dir) / "runs" / f"{what}-{run_digest(key)[:16]}", key, what)
