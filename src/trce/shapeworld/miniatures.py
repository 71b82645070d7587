"""ShapeWorld miniatures of the other model families: ShapeWorld-XL (a `StableDiffusionXLPipeline`) and
ShapeWorld-DiT (a `StableDiffusion3Pipeline`), each a new denoiser trained on ShapeWorld around the shipped
SD 1.x-style model's parts.

What each reuses, and why:
- the VAE (32x32x3 <-> 8x8x4) and the attribute detector: the denoiser is what differs between families;
- the text encoder: ShapeWorld's CLIP text tower (trained on the open caption language, weights v3) serves as
  BOTH of SDXL's encoders and both of SD3's CLIP encoders, with its trained text projection giving the pooled
  vectors. One trained tower is what this world has; the two-encoder interface (concatenated penultimate
  states, the pooled path, SDXL's size ids, SD3's context embedder) is what the miniature exercises, and the
  halves being equal changes nothing a method does (stage T solves on the concatenated states with a ridge);
- SD3's T5 is omitted (`text_encoder_3=None`, as SD3 allows): the pipeline then feeds 256 zero rows after the
  CLIP rows, and the transformer is trained as if with exactly those, so it draws as the pipeline conditions it.
  Training feeds ONE zero row standing for the 256 (`trce.families.sd3.CollapsedRowsJointProcessor`, which trce
  also draws and predicts with): identical context rows stay identical through every joint block (same
  modulation, same attention query, same feed-forward), so 256 of them act in attention as one key with its
  logit raised by log 256. That is the same function (tested equal) at a sixth of the joint sequence (16 image
  + 32 CLIP + 1 rows instead of 16 + 32 + 256).

Training: the render pool and its captions (in the world's grammar and the open language, as v3 was trained),
latents from the shipped VAE, text states cached once, then the denoiser alone — epsilon prediction with
Min-SNR weighting under SD's DDPM schedule for SDXL; rectified flow (x_t = (1-σ) x0 + σ ε, target ε − x0,
logit-normal σ as SD3 trains) for the DiT. EMA weights are exported; every stage resumes.

Shipped: only the denoiser and its record (`weights-xl/`, `weights-dit/`); `trce.load_pipeline("shapeworld-xl")`
assembles the pipeline from them and the shipped ShapeWorld parts (`trce.shapeworld.pipelines`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from trce.errors import TrceError, choose
from trce.families.sd3 import T5_FREE_ROWS, CollapsedRowsJointProcessor
from trce.shapeworld import pipelines, world
from trce.shapeworld.pipelines import MINIATURES, denoiser_model, load_miniature, text_encoder
from trce.shapeworld.settings import check_training
from trce.utils import folders, io

log = logging.getLogger(__name__)

TIME_IDS = (32.0, 32.0, 0.0, 0.0, 32.0, 32.0)  # SDXL's size ids at ShapeWorld's 32 px: original, crop, target


# --------------------------------------------------------------------------- training
@dataclass
class MiniatureConfig:
    family: str = "sdxl"
    seed: int = 0
    pool_size: int = 80_000
    captions_per_image: int = 2
    steps: int = 3000
    batch: int = 128
    lr: float = 3e-4
    warmup: int = 200
    ema: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    checkpoint_every: int = 250
    device: str = "auto"
    base: str = "shapeworld"  # the exported ShapeWorld pipeline whose parts are reused
    # a finished run of the same family whose EMA denoiser starts this one (a second cosine cycle: fresh optimizer,
    # warmup, the data stream going on after the steps that run drew); its cache is reused when it is the same
    warm_start: str = ""

    def __post_init__(self) -> None:
        choose("model family of a ShapeWorld miniature", self.family, MINIATURES)

    @classmethod
    def tiny(cls, family: str, seed: int = 0) -> MiniatureConfig:
        return cls(family=family, seed=seed, pool_size=64, captions_per_image=1, steps=4, batch=8, warmup=2,
                   checkpoint_every=2)


class MiniatureTrainer:
    STAGES = ("cache", "denoiser", "export")

    def __init__(self, out: str | Path, config: MiniatureConfig):
        from trce.shapeworld import weights_dir
        from trce.shapeworld.training import torch_device

        check_training(config)  # every number in range before anything is made
        self.out, self.cfg = Path(out), config
        self.device = torch_device(config.device)
        self.base = weights_dir() if config.base == "shapeworld" else Path(config.base).expanduser()
        if not (self.base / "clip_text_projection.safetensors").exists():
            raise TrceError(f"--base {self.base} is not an exported ShapeWorld pipeline (no clip_text_projection)")
        folders.check(self.out, "training")  # never trained into another run's results
        self.warm = self._warm_source(config.warm_start) if config.warm_start else None
        self.out.mkdir(parents=True, exist_ok=True)
        record = self.out / "train.json"
        if record.exists():
            previous = {"warm_start": "", **io.read_json(record)["config"]}
            if previous != asdict(config):
                changed = sorted(k for k in previous if previous.get(k) != asdict(config).get(k))
                raise TrceError(f"{self.out} holds a run with other settings ({', '.join(changed)}); use a new --out "
                                "or the same settings")
        else:
            io.write_json(record, io.run_record(asdict(config), {"seed": config.seed}, device=str(self.device),
                                                base=io.read_json(self.base / "made.json").get("exported")))

    def _done(self, stage: str) -> bool:
        return (self.out / stage / "DONE").exists()

    def _warm_source(self, path: str) -> tuple[Path, dict]:
        """(folder, its config) of the finished run `--warm-start` names; refused unless it is one of this family."""
        src = Path(path).expanduser()
        if not ((src / "train.json").exists() and (src / "denoiser" / "DONE").exists()):
            raise TrceError(f"--warm-start {src} is not a finished ShapeWorld {self.cfg.family} run (no train.json or "
                            "denoiser/DONE)")
        theirs = io.read_json(src / "train.json")["config"]
        if theirs.get("family") != self.cfg.family:
            raise TrceError(f"--warm-start {src} trained a {theirs.get('family')} denoiser, not {self.cfg.family}")
        return src, theirs

    def _data_offset(self) -> int:
        """Steps of data the warm-start chain already drew: this run's batches and noise go on after them."""
        offset, src = 0, self.warm
        while src is not None:
            theirs = src[1]
            offset += int(theirs["steps"])
            src = self._warm_source(theirs["warm_start"]) if theirs.get("warm_start") else None
        return offset

    def _reuse_warm_cache(self) -> bool:
        import shutil

        if self.warm is None:
            return False
        folder, theirs = self.warm
        same = ("seed", "pool_size", "captions_per_image", "base")
        if any(theirs.get(k) != getattr(self.cfg, k) for k in same) or not (folder / "cache" / "DONE").exists():
            return False
        with io.atomic_dir(self.out / "cache") as tmp:
            shutil.copytree(folder / "cache", tmp, dirs_exist_ok=True)
        log.info("stage cache reused from warm start %s (same pool and captions)", folder)
        return True

    def run(self) -> Path:
        for stage in self.STAGES:
            if self._done(stage):
                log.info("stage %s already done, skipping", stage)
                continue
            t0 = time.time()
            getattr(self, f"stage_{stage}")()
            log.info("stage %s took %.1f s", stage, time.time() - t0)
        return self.out / "export"

    @torch.no_grad()
    def stage_cache(self) -> None:
        """Render the pool, encode latents with the shipped VAE and captions with the shipped text tower."""
        if self._reuse_warm_cache():
            return
        from diffusers import AutoencoderKL
        from transformers import CLIPTokenizer

        from trce.shapeworld.language import training_caption
        from trce.shapeworld.training import to_float

        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 31])
        scenes = [world.sample_scene(rng) for _ in range(cfg.pool_size)]
        images = np.stack([world.render(s) for s in tqdm(scenes, desc="render pool", mininterval=2)])
        vae = AutoencoderKL.from_pretrained(self.base / "vae", dtype=torch.float32).to(self.device).eval()
        lat = [vae.encode(to_float(images[s:s + 256], self.device)).latent_dist.mean.cpu()
               for s in tqdm(range(0, len(images), 256), desc="encode latents", mininterval=2)]
        latents = torch.cat(lat) * float(vae.config.scaling_factor)  # (N, 4, 8, 8), as the pipeline scales them
        tok = CLIPTokenizer.from_pretrained(self.base / "tokenizer")
        text = text_encoder(self.base, True).to(self.device)
        k = cfg.captions_per_image
        captions = [training_caption(scenes[i % len(scenes)], rng)[0] for i in range(len(scenes) * k)]
        n, length, width = len(captions), tok.model_max_length, text.config.hidden_size
        states = np.zeros((n, length, width), np.float16)  # penultimate states, what both pipelines read
        pooled = np.zeros((n, text.config.projection_dim), np.float16)
        for s in tqdm(range(0, n, 512), desc="encode captions", mininterval=2):
            ids = tok(captions[s:s + 512], padding="max_length", truncation=True, return_tensors="pt").input_ids
            out = text(ids.to(self.device), output_hidden_states=True)
            states[s:s + 512] = out.hidden_states[-2].cpu().numpy().astype(np.float16)
            pooled[s:s + 512] = out.text_embeds.cpu().numpy().astype(np.float16)
        d = self.out / "cache"
        d.mkdir(exist_ok=True)
        io.save_tensors(d / "latents.safetensors", {"latents": latents, "pooled": torch.from_numpy(pooled)})
        with io.atomic_path(d / "states.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, states)
        io.write_json(d / "DONE", {"images": len(scenes), "captions": n})

    # -- the two objectives ---------------------------------------------------------------------------
    def _condition(self, states: torch.Tensor, pooled: torch.Tensor, drop: torch.Tensor):
        """(B, 32, 256) penultimate states, (B, 128) pooled, (B,) caption dropout -> the denoiser's text inputs,
        exactly as the pipeline forms them (dropped captions: SDXL's zeros, SD3's empty prompt's encoding)."""
        tokens = torch.cat([states, states], -1)  # (B, 32, 512) both encoders
        if self.cfg.family == "sdxl":
            keep = (~drop).float()
            return tokens * keep[:, None, None], pooled * keep[:, None]
        pooled2 = torch.cat([pooled, pooled], -1)  # (B, 256)
        tokens = torch.where(drop[:, None, None], self._empty[0].expand_as(tokens), tokens)
        pooled2 = torch.where(drop[:, None], self._empty[1].expand_as(pooled2), pooled2)
        zero = torch.zeros(len(tokens), 1, tokens.shape[-1], device=tokens.device)  # stands for T5_FREE_ROWS rows
        return torch.cat([tokens, zero], 1), pooled2  # (B, 32 + 1, 512), (B, 256)

    @torch.no_grad()
    def _empty_prompt(self):
        from transformers import CLIPTokenizer

        tok = CLIPTokenizer.from_pretrained(self.base / "tokenizer")
        text = text_encoder(self.base, True).to(self.device)
        out = text(tok([""], padding="max_length", return_tensors="pt").input_ids.to(self.device),
                   output_hidden_states=True)
        pen = out.hidden_states[-2]
        return torch.cat([pen, pen], -1), torch.cat([out.text_embeds, out.text_embeds], -1)

    def _loss(self, model, x0: torch.Tensor, tokens, pooled, step: int) -> torch.Tensor:
        cfg = self.cfg
        g = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + step)
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        b = len(x0)
        if cfg.family == "sdxl":
            t = torch.randint(0, 1000, (b,), generator=g).to(self.device)
            xt = self._ddpm.add_noise(x0, noise, t)
            ids = torch.tensor(TIME_IDS, device=self.device).expand(b, -1)
            pred = model(xt, t, tokens, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
            snr = self._alphas[t] / (1 - self._alphas[t])
            weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr  # Min-SNR-γ for ε prediction
            return (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        sigma = torch.sigmoid(torch.randn(b, generator=g)).to(self.device)  # logit-normal, as SD3 trains
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        pred = model(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=tokens,
                     pooled_projections=pooled,
                     joint_attention_kwargs={"repeated_row": (tokens.shape[1] - 1, T5_FREE_ROWS)}).sample
        return ((pred - (noise - x0)) ** 2).mean()

    def stage_denoiser(self) -> None:
        from trce.shapeworld.training import denoiser_loop

        cfg = self.cfg
        cache = io.load_tensors(self.out / "cache" / "latents.safetensors")
        latents, pooled_all = cache["latents"], cache["pooled"]
        states = np.load(self.out / "cache" / "states.npy", mmap_mode="r")
        n_img, k = len(latents), cfg.captions_per_image
        if cfg.family == "sdxl":
            from diffusers import DDPMScheduler

            from trce.shapeworld.models import scheduler

            self._ddpm = DDPMScheduler.from_config(scheduler().config)
            self._alphas = self._ddpm.alphas_cumprod.to(self.device)
        else:
            self._empty = self._empty_prompt()
        model = denoiser_model(cfg.family, cfg.seed).to(self.device)
        if cfg.family == "sd3":
            model.set_attn_processor(CollapsedRowsJointProcessor())  # one zero row for the pipeline's 256
        if self.warm is not None:  # start from the warm run's EMA weights (the exported denoiser)
            model.load_state_dict(io.load_tensors(self.warm[0] / "denoiser" / "ema.safetensors"))
        offset = self._data_offset()
        ema = denoiser_model(cfg.family, cfg.seed).to(self.device)
        ema.load_state_dict(model.state_dict())
        ema.requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)

        def loss_at(step: int) -> torch.Tensor:
            step += offset  # a warm-started run draws the batches after those its warm start drew
            rng = np.random.default_rng([cfg.seed, 4242, step])  # the step's batch: the same after a resume
            cap = rng.choice(n_img * k, size=cfg.batch, replace=False)
            order = np.argsort(cap)
            st = torch.from_numpy(states[cap[order]].astype(np.float32))[np.argsort(order)].to(self.device)
            po = pooled_all[torch.from_numpy(cap)].float().to(self.device)
            drop = torch.from_numpy(rng.random(cfg.batch) < cfg.caption_dropout).to(self.device)
            tokens, pooled = self._condition(st, po, drop)
            x0 = latents[torch.from_numpy(cap % n_img)].to(self.device)
            return self._loss(model, x0, tokens, pooled, step)

        ckdir = self.out / "denoiser"
        denoiser_loop(model, ema, opt, loss_at, steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, ema_decay=cfg.ema,
                      ckdir=ckdir, model_file="model.safetensors", checkpoint_every=cfg.checkpoint_every,
                      desc=f"{cfg.family} denoiser")
        io.write_json(ckdir / "DONE", {"steps": cfg.steps, "final_loss": io.read_json(ckdir / "last.json")["loss"]})

    def stage_export(self) -> None:
        model = denoiser_model(self.cfg.family, self.cfg.seed)
        model.load_state_dict(io.load_tensors(self.out / "denoiser" / "ema.safetensors"))
        record = io.read_json(self.out / "train.json")
        record["stages"] = {s: io.read_json(self.out / s / "DONE") for s in ("cache", "denoiser")}
        record["exported"] = io.run_record()["date"]
        with io.atomic_dir(self.out / "export") as tmp:
            model.to(torch.float16).save_pretrained(tmp / MINIATURES[self.cfg.family][2], safe_serialization=True)
            io.write_json(tmp / "made.json", record)
        io.write_json(self.out / "export" / "DONE", {"path": str(self.out / "export")})


def ship(family: str, export: Path, *, device: str = "auto", n: int | None = None, dest: Path | None = None):
    """Install an exported miniature denoiser as the package's shipped one, once it passes the ShapeWorld quality
    bar (assembled with the shipped parts, judged by the shipped detector); the folder it replaces is kept beside it
    (`trce.shapeworld.ship.install`). Returns a `trce.shapeworld.ship.Shipped`."""
    from trce.loading import resolve_device
    from trce.shapeworld.ship import check_ship_args, recorded_config, recorded_tiny, ship_checked

    export = Path(export)
    dest = Path(dest) if dest is not None else pipelines.miniature_dir(family)
    config = recorded_config(export, dest)
    tiny = recorded_tiny(config, asdict(MiniatureConfig.tiny(family)), ("pool_size", "steps", "batch"))
    check_ship_args(tiny=tiny, dest=dest)
    if config and config.get("family", family) != family:
        raise TrceError(f"--ship: {export} holds a {config.get('family')} denoiser, not {family}", field="ship")

    def load():
        return load_miniature(MINIATURES[family][0], folder=export).to(resolve_device(device))

    return ship_checked(export, dest, load, n=n)


def train_miniature(out: str | Path, family: str, *, seed: int = 0, device: str = "auto", tiny: bool = False,
                    ship_it: bool = False, **overrides) -> tuple[Path, object]:
    """`trce shapeworld train --family sdxl|sd3`: train (or resume) the miniature's denoiser into `out`; returns
    (the exported folder, a `Shipped` record of where it was installed and where the replaced weights were kept,
    when `ship_it`). A ship is refused before training with `tiny` or another `base`, and after it when the model
    fails the quality bar."""
    from dataclasses import fields, replace

    known = {f.name for f in fields(MiniatureConfig)}
    for name in overrides:
        choose(f"ShapeWorld {family} training setting", name, known)
    cfg = MiniatureConfig.tiny(family, seed) if tiny else MiniatureConfig(family=family, seed=seed)
    cfg = replace(cfg, device=device, **overrides)
    if ship_it:
        from trce.shapeworld.ship import check_ship_args

        check_ship_args(tiny=tiny, dest=pipelines.miniature_dir(family))
        if cfg.base != "shapeworld":
            raise TrceError(f"--ship refuses a denoiser trained around {cfg.base}: the shipped one works with the "
                            "shipped ShapeWorld parts", field="ship")
    export = MiniatureTrainer(out, cfg).run()
    return export, (ship(family, export, device=device) if ship_it else None)
