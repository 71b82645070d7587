"""Cached DDIM trajectories and frozen reference targets for TRCE stage V (paper Sec. 4.2, Eq. 6, 7, 9).

Stage V's targets depend only on the frozen ORIGINAL model and on latents that model visits while
sampling, so everything the reference UNet contributes is computed here, once, batched:

- concept trajectories: DDIM (`ddim_steps`, classifier-free guidance `guidance`) from seeded noise
  with a malicious prompt; for each of the first `keep` steps we keep the latent z_t^m the UNet saw,
  its timestep t, and the guidance-enhanced targets (Eq. 6, 7)
      f_unsafe = ε(z,∅,t) + β (ε(z,c^m,t) − ε(z,∅,t)),   f_safe = ε(z,∅,t) + β (ε(z,c^s,t) − ε(z,∅,t)).
  ε(z,∅,t) and ε(z,c^m,t) are the two halves of the guided sampling step itself, so one extra
  UNet row (c^s) per step gives both targets: 3 rows per step, and only `keep` of the steps run.
- unconditional trajectories (prompt ""): for Eq. 9 with t uniform over the whole trajectory,
  trajectory i stops at a step k_i drawn uniformly from [0, ddim_steps) and keeps (z_{t_k}, t_k,
  ε(z_{t_k},∅,t_k)). With "" the guided prediction equals ε(z,∅,t), so the target is the
  sampling prediction itself: one UNet row per step, Σ(k_i + 1) ≈ N·S/2 rows in all, and 1/S of
  the storage of whole trajectories, while the stored set is still uniform in t.

Trajectory i depends only on (seed, i) (its noise, its prompt pair, its stop step), so a cache of N
trajectories extends to M > N by generating i = N..M-1. Files are safetensors written atomically,
named by a hash of everything the values depend on (base-model fingerprint, compute dtype,
scheduler, settings, prompts); the full key is stored inside and checked on load, so caches made
with other settings are never mixed in. Under `accelerate launch` the missing trajectories are split
over the processes and merged by the main process (`cache_dir` must be shared, i.e. one machine).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trce.errors import TrceError
from trce.methods.training import encode_prompts, guided_ddim
from trce.utils import cachefile, io

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def mix_seed(*parts) -> int:
    """A 63-bit seed that depends only on `parts` (stable across processes and runs)."""
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _scheduler_digest(ref: Reference) -> str:
    # Private entries such as `_use_default_values` are built from sets: their order changes from
    # one process to the next, so they must not enter a key that processes compare.
    return _digest({k: v for k, v in ref.scheduler_config.items() if not k.startswith("_")})


@dataclass
class Reference:
    """The frozen original model: denoiser, prompt encoder, sampler configuration, identity."""

    denoiser: torch.nn.Module
    encode_pipe: object  # the pipeline whose text encoder(s) make the conditionings
    scheduler_config: dict
    vae_scale_factor: int
    fingerprint: dict
    compute_dtype: torch.dtype | None  # autocast dtype while caching, None = the denoiser's own dtype
    family: object = None  # trce.families.ModelFamily

    @classmethod
    def from_pipe(cls, pipe, reference=None, autocast_dtype: torch.dtype | None = None) -> Reference:
        """`reference`: None (use `pipe` itself, unchanged by stage V), a pipeline, or a bare denoiser.

        A bare denoiser borrows the text encoder(s), tokenizer(s) and scheduler of `pipe` (TRCE never changes
        the text encoder, so they are the original's).
        """
        from trce.edit import fingerprint
        from trce.families import family_of

        fam = family_of(pipe)
        source = pipe if reference is None else reference
        if isinstance(source, torch.nn.Module) and hasattr(source, "config"):
            denoiser, encode_pipe = source, pipe
        elif getattr(source, fam.denoiser_name, None) is not None:
            denoiser, encode_pipe = fam.denoiser(source), source
        else:
            raise TrceError(f"stage V reference must be a pipeline or a denoiser, not {type(source).__name__}")
        fp = fingerprint(encode_pipe, denoiser=denoiser)
        scale = int(getattr(encode_pipe, "vae_scale_factor", 8))
        if autocast_dtype is not None and denoiser.dtype != torch.float32:
            autocast_dtype = None  # a half-precision reference already runs in half precision
        return cls(denoiser=denoiser, encode_pipe=encode_pipe, scheduler_config=dict(encode_pipe.scheduler.config),
                   vae_scale_factor=scale, fingerprint=fp, compute_dtype=autocast_dtype, family=fam)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def dtype_name(self) -> str:
        if self.compute_dtype is not None:
            return f"autocast-{str(self.compute_dtype).removeprefix('torch.')}"
        return str(self.denoiser.dtype).removeprefix("torch.")

    def scheduler(self, steps: int):
        """A fresh sampler of `steps` steps (the pipeline's own scheduler object is never touched)."""
        return self.family.sampler(self.scheduler_config, steps, device=self.device)

    def encode(self, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Conditionings (N, L, D) on the denoiser's device and in its dtype."""
        return encode_prompts(self.encode_pipe, prompts, chunk=batch_size, device=self.device,
                              dtype=self.denoiser.dtype)

    def unconditional(self) -> torch.Tensor:
        """(1, L, D): guidance's unconditional conditioning as the pipeline forms it, on the denoiser's device."""
        with torch.no_grad():
            return self.family.unconditional(self.encode_pipe).to(device=self.device, dtype=self.denoiser.dtype)

    def eps(self, z: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The prediction at (z, t) under emb, in float32; z (B, C, h, w), t scalar or (B,), emb (B, L, D)."""
        ctx = (torch.autocast(self.device.type, dtype=self.compute_dtype) if self.compute_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            out = self.family.predict(self.denoiser, z.to(self.denoiser.dtype), t, emb)
        return out.float()


@dataclass
class ConceptTrajectories:
    latents: torch.Tensor  # (N, K, C, h, w) z_t^m the UNet saw at step k (before the update)
    timesteps: torch.Tensor  # (K,) int64, the DDIM timestep of step k
    f_unsafe: torch.Tensor  # (N, K, C, h, w) Eq. 6
    f_safe: torch.Tensor  # (N, K, C, h, w) Eq. 7
    pair_index: torch.Tensor  # (N,) int64, which (malicious, safe) pair trajectory n used
    path: Path | None
    key: dict

    def __len__(self) -> int:
        return self.latents.shape[0]


@dataclass
class UncondTrajectories:
    latents: torch.Tensor  # (N, C, h, w) z_t^u at step k_n of the "" trajectory n
    timesteps: torch.Tensor  # (N,) int64
    target: torch.Tensor  # (N, C, h, w) ε(z,∅,t) of the original model (Eq. 9)
    step: torch.Tensor  # (N,) int64 step index k_n, uniform over [0, ddim_steps)
    path: Path | None
    key: dict

    def __len__(self) -> int:
        return self.latents.shape[0]


@dataclass
class CondTrajectories:
    """Points on the ORIGINAL model's guided trajectories of prompts that must be preserved (`cond_preserve`)."""

    latents: torch.Tensor  # (N, C, h, w) z_t^p at step k_n of trajectory n
    timesteps: torch.Tensor  # (N,) int64
    target: torch.Tensor  # (N, C, h, w) ε(z,c^p,t) of the original model: its conditional prediction there
    prompt_index: torch.Tensor  # (N,) int64 into the preservation prompts
    step: torch.Tensor  # (N,) int64 stop step k_n, uniform over [0, ddim_steps)
    path: Path | None
    key: dict

    def __len__(self) -> int:
        return self.latents.shape[0]


def latent_shape(ref: Reference, image_size: int | None) -> tuple[int, int, int]:
    size = image_size if image_size is not None else ref.family.image_size(ref.encode_pipe)  # None: the native size
    return ref.family.latent_shape(ref.denoiser, size, scale=ref.vae_scale_factor)


def initial_noise(kind: str, seed: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The starting noise of trajectory `index` (CPU generator: the same on every device)."""
    gen = torch.Generator("cpu").manual_seed(mix_seed(kind, seed, index))
    return torch.randn(shape, generator=gen)


def pair_order(seed: int, n_pairs: int) -> torch.Tensor:
    """Seeded permutation of the prompt pairs; trajectory i uses pair order[i % n_pairs]."""
    gen = torch.Generator("cpu").manual_seed(mix_seed("pairs", seed, n_pairs))
    return torch.randperm(n_pairs, generator=gen)


def uncond_stop(seed: int, index: int, steps: int) -> int:
    gen = torch.Generator("cpu").manual_seed(mix_seed("uncond-step", seed, index))
    return int(torch.randint(0, steps, (1,), generator=gen))


# --------------------------------------------------------------------------- generation
@torch.no_grad()
def _concept_rows(ref: Reference, indices: list[int], pairs, order, *, steps: int, keep: int, guidance: float,
                  beta: float, shape, seed: int, emb_null, emb_m, emb_s) -> dict[str, torch.Tensor]:
    sched = ref.scheduler(steps)
    dev = ref.device
    b = len(indices)
    pidx = torch.tensor([int(order[i % len(pairs)]) for i in indices], dtype=torch.long)
    z = torch.stack([initial_noise("concept-noise", seed, i, shape) for i in indices]).to(dev)  # (B, C, h, w)
    z = z * sched.init_noise_sigma
    e_m, e_s = emb_m[pidx.to(dev)], emb_s[pidx.to(dev)]  # (B, L, D)
    lat, fu, fs = [], [], []

    def targets(k, t, x, eps):
        e0, em, es = eps  # ε(z,∅,t), ε(z,c^m,t), ε(z,c^s,t): the sampling step's two halves and one row more
        lat.append(x.float().cpu())
        fu.append((e0 + beta * (em - e0)).cpu())  # Eq. 6
        fs.append((e0 + beta * (es - e0)).cpu())  # Eq. 7

    guided_ddim(sched, z, [emb_null.expand(b, -1, -1), e_m, e_s], guidance, keep, ref.eps, targets)
    return {"latents": torch.stack(lat, 1), "f_unsafe": torch.stack(fu, 1), "f_safe": torch.stack(fs, 1),
            "pair_index": pidx}


@torch.no_grad()
def _uncond_rows(ref: Reference, indices: list[int], *, steps: int, shape, seed: int,
                 emb_null) -> dict[str, torch.Tensor]:
    sched = ref.scheduler(steps)
    dev = ref.device
    stop = torch.tensor([uncond_stop(seed, i, steps) for i in indices])  # (B,)
    z = torch.stack([initial_noise("uncond-noise", seed, i, shape) for i in indices]).to(dev)
    z = z * sched.init_noise_sigma
    lat = torch.zeros((len(indices), *shape))
    tgt = torch.zeros((len(indices), *shape))
    ts = torch.zeros(len(indices), dtype=torch.long)
    active = torch.arange(len(indices))  # rows still sampling
    for k, t in enumerate(sched.timesteps):
        if not len(active):
            break
        za = z[active.to(dev)]  # (A, C, h, w)
        x = sched.scale_model_input(za, t)
        eps = ref.eps(x, t, emb_null.expand(len(active), -1, -1))  # with "" the guided prediction is ε(z,∅,t)
        done = stop[active] == k
        rows = active[done]
        lat[rows], tgt[rows], ts[rows] = x[done.to(dev)].float().cpu(), eps[done.to(dev)].cpu(), int(t)
        going = ~done
        # Rows that stop here need no update; the others take one DDIM step.
        z[active[going].to(dev)] = sched.step(eps[going.to(dev)], t, za[going.to(dev)]).prev_sample
        active = active[going]
    return {"latents": lat, "target": tgt, "timesteps": ts, "step": stop}


@torch.no_grad()
def _cond_rows(ref: Reference, indices: list[int], order, *, steps: int, guidance: float, shape, seed: int,
               emb_null, emb_p) -> dict[str, torch.Tensor]:
    """Guided sampling of each trajectory's preservation prompt until its stop step; keeps (z, t, ε(z,c^p,t))."""
    sched = ref.scheduler(steps)
    dev = ref.device
    b = len(indices)
    pidx = torch.tensor([int(order[i % len(order)]) for i in indices], dtype=torch.long)
    stop = torch.tensor([uncond_stop(mix_seed("cond", seed), i, steps) for i in indices])  # (B,)
    z = torch.stack([initial_noise("cond-noise", seed, i, shape) for i in indices]).to(dev) * sched.init_noise_sigma
    lat, tgt = torch.zeros((b, *shape)), torch.zeros((b, *shape))
    ts = torch.zeros(b, dtype=torch.long)

    def keep(k, t, x, eps):
        here = stop == k  # rows whose point is this step's model input
        if here.any():
            lat[here], tgt[here], ts[here] = x[here.to(dev)].float().cpu(), eps[1][here.to(dev)].cpu(), int(t)

    # the batch runs to its latest stop (the cache schedules trajectories with similar stops together)
    guided_ddim(sched, z, [emb_null.expand(b, -1, -1), emb_p[pidx.to(dev)]], guidance, int(stop.max()) + 1, ref.eps,
                keep)
    return {"latents": lat, "target": tgt, "timesteps": ts, "prompt_index": pidx, "step": stop}


# --------------------------------------------------------------------------- the on-disk cache
def _load(path: Path, key: dict) -> dict[str, torch.Tensor] | None:
    """The cache file's rows, or None when it is missing, corrupt or made for another key (it is rebuilt)."""
    return cachefile.load(path, key, "stage V trajectory")


def _save(path: Path, key: dict, tensors: dict[str, torch.Tensor]) -> None:
    n = next(iter(tensors.values())).shape[0]
    cachefile.save(path, tensors, key, count=str(n))


def _cat(a: dict | None, b: dict, shared: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    if a is None:
        return b
    return {k: (a[k] if k in shared else torch.cat([a[k], b[k]])) for k in b}


def cached(kind: str, key: dict, n: int, make: Callable[[list[int]], dict[str, torch.Tensor]], *,
           cache_dir: Path | None, dist=None, batch_size: int, progress: bool, shared: Sequence[str] = (),
           schedule: Callable[[int], int] | None = None) -> tuple[dict[str, torch.Tensor], Path | None]:
    """The first `n` rows of cache `kind`/`key`: loaded, extended with only the missing rows, or built.

    `make(indices)` returns the rows of trajectories `indices` stacked along dim 0; tensors named in
    `shared` (for example the timesteps common to all rows) are taken once. `schedule(i)` orders
    the work so that similar trajectories share a batch (rows are stored in index order whatever
    the schedule). With several processes (`dist`, an accelerate Accelerator) each builds a share
    and the main process merges them through `cache_dir`.
    """
    rank, world = (dist.process_index, dist.num_processes) if dist is not None else (0, 1)
    main = rank == 0
    path = Path(cache_dir) / f"{kind}-{_digest(key)[:16]}.safetensors" if cache_dir is not None else None
    have = _load(path, key) if path is not None else None
    n0 = 0 if have is None else next(v.shape[0] for k, v in have.items() if k not in shared)
    if n0 >= n:
        log.info("stage V: reusing %d of %d cached %s trajectories from %s", n, n0, kind, path)
        return {k: (v if k in shared else v[:n]) for k, v in have.items()}, path
    split = world > 1 and path is not None  # without a shared folder every process builds all rows
    shares = [list(range(n0, n))[r::world] for r in range(world)] if split else [list(range(n0, n))]
    mine = shares[rank] if split else shares[0]
    if n0:
        log.info("stage V: extending %s cache %s from %d to %d trajectories", kind, path, n0, n)
    rows = _build(kind, mine, make, batch_size=batch_size, progress=progress and main, shared=shared,
                  schedule=schedule)
    if not split:
        full = _cat(have, rows, shared)
        if path is not None:
            _save(path, key, full)
        return full, path
    parts = [path.with_name(f"{path.name}.part{r}-{n0}-{n}") for r in range(world)]
    if rows:
        _save(parts[rank], key, rows)
    dist.wait_for_everyone()
    if main:
        loaded = [io.load_tensors(parts[r]) for r in range(world) if shares[r]]
        position = torch.tensor([i for share in shares for i in share]) - n0
        merged = {k: (loaded[0][k] if k in shared else torch.cat([p[k] for p in loaded])[torch.argsort(position)])
                  for k in loaded[0]}
        _save(path, key, _cat(have, merged, shared))
        for part in parts:
            part.unlink(missing_ok=True)
    dist.wait_for_everyone()
    return {k: (v if k in shared else v[:n]) for k, v in io.load_tensors(path).items()}, path


def _build(kind: str, indices: list[int], make, *, batch_size: int, progress: bool, shared: Sequence[str],
           schedule: Callable[[int], int] | None) -> dict[str, torch.Tensor]:
    """Rows of `indices` (in that order), built in batches of `batch_size` trajectories."""
    if not indices:
        return {}
    work = sorted(indices, key=schedule) if schedule is not None else list(indices)
    rows: dict[str, torch.Tensor] | None = None
    bar = tqdm(total=len(work), desc=f"stage V {kind} trajectories", unit="traj", disable=not progress,
               mininterval=1)
    try:
        for start in range(0, len(work), batch_size):
            chunk = work[start:start + batch_size]
            part = make(chunk)
            bad = [k for k, v in part.items() if v.is_floating_point() and not torch.isfinite(v).all()]
            if bad:
                raise TrceError(f"the reference model produced non-finite {', '.join(bad)} while caching {kind} "
                                "trajectories; run it in fp32 (mixed_precision='no', dtype fp32)")
            rows = _cat(rows, part, shared)
            bar.update(len(chunk))
    finally:
        bar.close()
    assert rows is not None
    if work != indices:
        where = {i: pos for pos, i in enumerate(work)}
        back = torch.tensor([where[i] for i in indices])
        rows = {k: (v if k in shared else v[back]) for k, v in rows.items()}
    return rows


def concept_trajectories(ref: Reference, pairs: Sequence[tuple[str, str]], n: int, *, steps: int, keep: int,
                         guidance: float, beta: float, image_size: int | None, seed: int, batch_size: int,
                         cache_dir: Path | None = None, dist=None, progress: bool = True) -> ConceptTrajectories:
    """Concept trajectories with their Eq. 6/7 targets (see the module text)."""
    if not pairs:
        raise TrceError("stage V needs at least one (malicious, safe) prompt pair")
    shape = latent_shape(ref, image_size)
    pairs = [(str(m), str(s)) for m, s in pairs]
    key = {"kind": "trce-v-concept", "version": CACHE_VERSION, "base": ref.fingerprint["id"],
           "dtype": ref.dtype_name(), "scheduler": _scheduler_digest(ref), "ddim_steps": steps, "keep": keep,
           "guidance": float(guidance), "beta": float(beta), "latent_shape": list(shape), "seed": seed,
           "pairs": _digest(pairs), "n_pairs": len(pairs)}
    order = pair_order(seed, len(pairs))
    emb: dict[str, torch.Tensor] = {}

    def make(indices: list[int]) -> dict[str, torch.Tensor]:
        if not emb:  # encode lazily: a cache hit needs no text encoder
            emb["null"] = ref.unconditional()
            emb["m"] = ref.encode([m for m, _ in pairs])
            emb["s"] = ref.encode([s for _, s in pairs])
        rows = _concept_rows(ref, indices, pairs, order, steps=steps, keep=keep, guidance=guidance, beta=beta,
                             shape=shape, seed=seed, emb_null=emb["null"], emb_m=emb["m"], emb_s=emb["s"])
        rows["timesteps"] = ref.scheduler(steps).timesteps[:keep].cpu().long()
        return rows

    data, path = cached("concept", key, n, make, cache_dir=cache_dir, dist=dist, batch_size=batch_size,
                        progress=progress, shared=("timesteps",))
    return ConceptTrajectories(latents=data["latents"], timesteps=data["timesteps"], f_unsafe=data["f_unsafe"],
                               f_safe=data["f_safe"], pair_index=data["pair_index"], path=path, key=key)


def uncond_trajectories(ref: Reference, n: int, *, steps: int, image_size: int | None, seed: int, batch_size: int,
                        cache_dir: Path | None = None, dist=None, progress: bool = True) -> UncondTrajectories:
    """Unconditional ("") points uniform over the whole trajectory with their Eq. 9 targets."""
    shape = latent_shape(ref, image_size)
    key = {"kind": "trce-v-uncond", "version": CACHE_VERSION, "base": ref.fingerprint["id"],
           "dtype": ref.dtype_name(), "scheduler": _scheduler_digest(ref), "ddim_steps": steps,
           "latent_shape": list(shape), "seed": seed}
    emb: dict[str, torch.Tensor] = {}

    def make(indices: list[int]) -> dict[str, torch.Tensor]:
        if not emb:
            emb["null"] = ref.unconditional()
        return _uncond_rows(ref, indices, steps=steps, shape=shape, seed=seed, emb_null=emb["null"])

    # One UNet row per trajectory and step (3 for concepts), and trajectories that stop at similar
    # steps share a batch, so batches stay full while the cost is Σ(k_i + 1) rows.
    data, path = cached("uncond", key, n, make, cache_dir=cache_dir, dist=dist, batch_size=3 * batch_size,
                        progress=progress, schedule=lambda i: uncond_stop(seed, i, steps))
    return UncondTrajectories(latents=data["latents"], timesteps=data["timesteps"], target=data["target"],
                              step=data["step"], path=path, key=key)


def cond_trajectories(ref: Reference, prompts: Sequence[str], n: int, *, steps: int, guidance: float,
                      image_size: int | None, seed: int, batch_size: int, cache_dir: Path | None = None, dist=None,
                      progress: bool = True) -> CondTrajectories:
    """Points uniform over the ORIGINAL model's guided trajectories of preservation prompts, with its conditional
    prediction there (stage V's `cond_preserve` term; trajectory i uses prompt order[i % P] and stops at a step
    drawn uniformly from [0, steps))."""
    if not prompts:
        raise TrceError("stage V cond_preserve needs preservation prompts; the spec has none (preserve: none)")
    shape = latent_shape(ref, image_size)
    prompts = [str(p) for p in prompts]
    key = {"kind": "trce-v-cond", "version": CACHE_VERSION, "base": ref.fingerprint["id"],
           "dtype": ref.dtype_name(), "scheduler": _scheduler_digest(ref), "ddim_steps": steps,
           "guidance": float(guidance), "latent_shape": list(shape), "seed": seed, "prompts": _digest(prompts),
           "n_prompts": len(prompts)}
    order = pair_order(mix_seed("cond", seed), len(prompts))
    emb: dict[str, torch.Tensor] = {}

    def make(indices: list[int]) -> dict[str, torch.Tensor]:
        if not emb:
            emb["null"] = ref.unconditional()
            emb["p"] = ref.encode(prompts)
        return _cond_rows(ref, indices, order, steps=steps, guidance=guidance, shape=shape, seed=seed,
                          emb_null=emb["null"], emb_p=emb["p"])

    data, path = cached("cond", key, n, make, cache_dir=cache_dir, dist=dist, batch_size=batch_size,
                        progress=progress, schedule=lambda i: uncond_stop(mix_seed("cond", seed), i, steps))
    return CondTrajectories(latents=data["latents"], timesteps=data["timesteps"], target=data["target"],
                            prompt_index=data["prompt_index"], step=data["step"], path=path, key=key)
