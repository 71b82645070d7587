"""Train every ShapeWorld component from scratch: seeded, logged, resumable.

Stages run in order and each writes its result atomically into the output folder, so a rerun
skips finished stages and the UNet resumes from its last checkpoint:

    pool      render N scenes (uint8 images + attribute labels)
    clip      contrastive CLIP on (render, caption) pairs -> the frozen text encoder + vision tower
    vae       AutoencoderKL, 32x32x3 -> 8x8x4
    detector  attribute classifier (shape, color, pattern, background), checked on held-out renders
    cache     latents of the pool and text embeddings of K captions per image, computed once
    unet      UNet2DConditionModel on the cached latents/embeddings, caption dropout for CFG
    export    a StableDiffusionPipeline folder + vision tower + detector + made.json

The pieces shared with the miniatures' trainer are in `trce.shapeworld.training`, the warm start, exclusion and
export in `trce.shapeworld.train_io`, `--ship` in `trce.shapeworld.ship`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trce.errors import TrceError
from trce.shapeworld import models, world
from trce.shapeworld.language import training_caption
from trce.shapeworld.settings import check_training
from trce.shapeworld.ship import Shipped, check_ship_args, ship_weights
from trce.shapeworld.tokenizer import build_tokenizer
from trce.shapeworld.train_io import excluded_value, export_pipeline, warm_clip, warm_source
from trce.shapeworld.training import (
    STAGES,
    TrainConfig,
    cosine_lr,
    denoiser_loop,
    detector_accuracy,
    to_float,
    torch_device,
)
from trce.utils import folders, io

log = logging.getLogger(__name__)


def _step_rng(seed: int, stage: str, step: int) -> np.random.Generator:
    """A generator that depends only on (seed, stage, step), so a resumed run draws the same batches."""
    return np.random.default_rng([seed, STAGES.index(stage), step])


class Trainer:
    def __init__(self, out: str | Path, config: TrainConfig):
        check_training(config)  # every number in range before anything is made
        self.out = Path(out)
        self.cfg = config
        self.device = torch_device(config.device)
        self.tokenizer = build_tokenizer()
        self.warm = warm_source(config.warm_start) if config.warm_start else None
        self.excluded = excluded_value(config.exclude)  # checked before any stage runs
        folders.check(self.out, "training")  # never trained into another run's results
        self.out.mkdir(parents=True, exist_ok=True)
        record_path = self.out / "train.json"
        if record_path.exists():
            record = io.read_json(record_path)
            # Runs recorded before these settings existed trained without them.
            previous = {"clip_aux_weight": 0.0, "warm_start": "", "exclude": "", **record["config"]}
            if previous != asdict(config):
                changed = sorted(k for k in previous if previous.get(k) != asdict(config).get(k))
                if changed == ["unet_steps"] and config.unet_steps > previous["unet_steps"]:
                    # Training longer is the one change a finished run can take: the UNet resumes from its
                    # last checkpoint and follows the cosine schedule of the new length from there on.
                    log.info("extending UNet training from %d to %d steps", previous["unet_steps"], config.unet_steps)
                    for stage in ("unet", "export"):
                        (self.out / stage / "DONE").unlink(missing_ok=True)
                    record["config"] = asdict(config)
                    record.setdefault("extended", []).append({"from": previous["unet_steps"], "to": config.unet_steps})
                    io.write_json(record_path, record)
                else:
                    raise TrceError(
                        f"{self.out} holds a run with other settings ({', '.join(changed)}); use a new --out or the "
                        "same settings (only --unet-steps may grow, to train longer)"
                    )
        else:
            io.write_json(record_path, io.run_record(asdict(config), {"seed": config.seed}, device=str(self.device)))

    # ------------------------------------------------------------------ helpers
    def _done(self, stage: str) -> bool:
        return (self.out / stage / "DONE").exists()

    def _mark(self, stage: str, info: dict) -> None:
        io.write_json(self.out / stage / "DONE", info)
        log.info("stage %s done: %s", stage, info)

    def _pool(self) -> tuple[np.ndarray, np.ndarray]:
        data = np.load(self.out / "pool" / "pool.npz")
        return data["images"], data["labels"]

    def run(self, stages: tuple[str, ...] = STAGES) -> Path:
        for stage in STAGES:
            if stage not in stages:
                continue
            if self._done(stage):
                log.info("stage %s already done, skipping", stage)
                continue
            if self._reuse_warm_start(stage):
                continue
            t0 = time.time()
            getattr(self, f"stage_{stage}")()
            log.info("stage %s took %.1f s", stage, time.time() - t0)
        return self.out / "export"

    def _reuse_warm_start(self, stage: str) -> bool:
        """Copy a stage from the warm-start run when every setting it depends on is the same."""
        import shutil

        keys = {"pool": ("seed", "pool_size"), "vae": ("seed", "pool_size", "vae_steps", "vae_batch", "vae_lr", "vae_kl_weight")}
        keys["detector"] = ("seed", "pool_size", "detector_steps", "detector_batch", "detector_lr")
        if self.warm is None or stage not in keys:
            return False
        kind, src = self.warm
        theirs = io.read_json(src / ("train.json" if kind == "run" else "made.json"))["config"]
        if any(theirs.get(k) != asdict(self.cfg)[k] for k in keys[stage]):
            return False
        if kind == "run":
            if not (src / stage / "DONE").exists():
                return False
            with io.atomic_dir(self.out / stage) as tmp:
                shutil.copytree(src / stage, tmp, dirs_exist_ok=True)
        elif stage == "vae":  # an exported pipeline: its VAE (fp16 there) back in fp32
            from diffusers import AutoencoderKL

            with io.atomic_dir(self.out / "vae") as tmp:
                AutoencoderKL.from_pretrained(src / "vae", dtype=torch.float32).save_pretrained(tmp)
            self._mark("vae", {"warm_start": str(src)})
        elif stage == "detector":
            with io.atomic_dir(self.out / "detector") as tmp:
                shutil.copytree(src / "detector", tmp, dirs_exist_ok=True)
            self._mark("detector", {"warm_start": str(src), **io.read_json(src / "detector" / "detector.json")})
        else:
            return False  # the render pool is not in an export: it is drawn again (same seed, same pool)
        log.info("stage %s reused from warm start %s (same settings)", stage, src)
        return True

    # ------------------------------------------------------------------ stages
    def stage_pool(self) -> None:
        rng = np.random.default_rng([self.cfg.seed, 0])
        n = self.cfg.pool_size
        size = world.vocab().image_size
        images = np.zeros((n, size, size, 3), dtype=np.uint8)
        labels = np.zeros((n, len(world.ATTRIBUTES)), dtype=np.int16)
        values = {a: world.vocab().values(a) for a in world.ATTRIBUTES}
        for i in tqdm(range(n), desc="render pool", mininterval=2):
            scene = world.sample_scene(rng)
            images[i] = world.render(scene)
            labels[i] = [values[a].index(scene.attribute(a)) for a in world.ATTRIBUTES]
        (self.out / "pool").mkdir(exist_ok=True)
        with io.atomic_path(self.out / "pool" / "pool.npz") as tmp, open(tmp, "wb") as fh:
            np.savez(fh, images=images, labels=labels)
        self._mark("pool", {"n": n})

    def _scene(self, labels_row: np.ndarray) -> world.Scene:
        values = {a: world.vocab().values(a) for a in world.ATTRIBUTES}
        attrs = {a: values[a][int(labels_row[k])] for k, a in enumerate(world.ATTRIBUTES)}
        return world.Scene(radius=10.0, cx=16.0, cy=16.0, tint=(0, 0, 0), **attrs)

    def stage_clip(self) -> None:
        cfg = self.cfg
        images, labels = self._pool()
        if self.warm is not None:
            model = warm_clip(*self.warm, self.tokenizer, seed=cfg.seed)
            log.info("CLIP warm start from %s", self.warm[1])
        else:
            model = models.clip_model(self.tokenizer, seed=cfg.seed)
        model = model.to(self.device)
        values = {a: world.vocab().values(a) for a in world.ATTRIBUTES}
        torch.manual_seed(cfg.seed + 17)
        # The image head reads the image embedding at the scale the logits see it; the text head reads the
        # first-[EoT] hidden state, the one the UNet cross-attends to.
        dims = {"image": model.config.projection_dim, "text": model.config.text_config.hidden_size}
        heads = torch.nn.ModuleDict(
            {f"{side}_{a}": torch.nn.Linear(dims[side], len(values[a])) for side in dims for a in world.ATTRIBUTES}
        ).to(self.device)
        params = list(model.parameters()) + (list(heads.parameters()) if cfg.clip_aux_weight > 0 else [])
        opt = torch.optim.AdamW(params, lr=cfg.clip_lr, weight_decay=0.1)
        bar = tqdm(range(cfg.clip_steps), desc="clip", mininterval=2)
        loss = None  # --clip-steps 0: the warm-start (or initial) CLIP as it is
        for step in bar:
            rng = _step_rng(cfg.seed, "clip", step)
            idx = rng.choice(len(images), size=cfg.clip_batch, replace=False)
            texts, named = zip(*(training_caption(self._scene(labels[i]), rng) for i in idx))
            # Causal attention: positions before the padding do not depend on it, so a batch padded
            # to its own longest caption gives the same [EoT] outputs as padding to MAX_LENGTH.
            tok = self.tokenizer(list(texts), padding="longest", truncation=True, return_tensors="pt").to(self.device)
            pix = to_float(images[idx], self.device)
            out = model(input_ids=tok.input_ids, attention_mask=None, pixel_values=pix)
            logits = out.logits_per_text  # (B_text, B_image), already scaled
            # Soft targets: caption i matches every image whose named attributes agree with it, so
            # "a red star" is not pushed away from the other red stars in the batch.
            lab = torch.from_numpy(labels[idx].astype(np.int64)).to(self.device)  # (B, 4)
            match = torch.ones(len(idx), len(idx), dtype=torch.bool, device=self.device)
            for k, attribute in enumerate(world.ATTRIBUTES):
                mentioned = torch.tensor([attribute in n for n in named], device=self.device)
                agree = lab[:, k][:, None] == lab[:, k][None, :]
                match &= agree | ~mentioned[:, None]
            target = match.float()
            loss_t = -(target / target.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
            loss_i = -(target.T / target.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
            loss = (loss_t + loss_i) / 2
            if cfg.clip_aux_weight > 0:
                # Images are labelled with every attribute; a caption only with those it names.
                aux = 0.0
                image_pooled = out.image_embeds * model.logit_scale.exp().sqrt()  # (B, proj), scaled as in the logits
                eot = (tok.input_ids == self.tokenizer.eos_token_id).int().argmax(1)  # first [EoT] per caption
                text_hidden = out.text_model_output.last_hidden_state  # (B, L, text width)
                text_pooled = text_hidden[torch.arange(len(eot), device=self.device), eot]  # the state the UNet sees
                for k, attribute in enumerate(world.ATTRIBUTES):
                    aux = aux + F.cross_entropy(heads[f"image_{attribute}"](image_pooled), lab[:, k])
                    mentioned = torch.tensor([attribute in n for n in named], device=self.device)
                    if mentioned.any():
                        text_logits = heads[f"text_{attribute}"](text_pooled[mentioned])
                        aux = aux + F.cross_entropy(text_logits, lab[mentioned, k])
                loss = loss + cfg.clip_aux_weight * aux
            for g in opt.param_groups:
                g["lr"] = cfg.clip_lr * cosine_lr(step, cfg.clip_steps, min(100, cfg.clip_steps // 10 + 1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if not torch.isfinite(loss):
                raise TrceError(f"CLIP loss became {loss.item()} at step {step}; lower --clip-lr")
            bar.set_postfix(loss=f"{loss.item():.3f}")
        with io.atomic_dir(self.out / "clip") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp / "tokenizer")
        self._mark("clip", {"final_loss": None if loss is None else float(loss.item()), "steps": cfg.clip_steps})

    def stage_vae(self) -> None:
        cfg = self.cfg
        images, _ = self._pool()
        vae = models.vae_model(seed=cfg.seed).to(self.device)
        opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        bar = tqdm(range(cfg.vae_steps), desc="vae", mininterval=2)
        for step in bar:
            rng = _step_rng(cfg.seed, "vae", step)
            x = to_float(images[rng.choice(len(images), size=cfg.vae_batch, replace=False)], self.device)
            posterior = vae.encode(x).latent_dist
            torch.manual_seed(cfg.seed * 100003 + step)
            recon = vae.decode(posterior.sample()).sample
            rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
            loss = rec + cfg.vae_kl_weight * posterior.kl().mean()
            for g in opt.param_groups:
                g["lr"] = cfg.vae_lr * cosine_lr(step, cfg.vae_steps, min(100, cfg.vae_steps // 10 + 1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(rec=f"{rec.item():.4f}")
        with io.atomic_dir(self.out / "vae") as tmp:
            vae.save_pretrained(tmp, safe_serialization=True)
        self._mark("vae", {"final_recon": float(rec.item()), "steps": cfg.vae_steps})

    def stage_detector(self) -> None:
        cfg = self.cfg
        images, labels = self._pool()
        det_cfg = models.DetectorConfig.default()
        det = models.AttributeClassifier(det_cfg).to(self.device)
        torch.manual_seed(cfg.seed)
        opt = torch.optim.AdamW(det.parameters(), lr=cfg.detector_lr, weight_decay=1e-4)
        bar = tqdm(range(cfg.detector_steps), desc="detector", mininterval=2)
        det.train()
        for step in bar:
            rng = _step_rng(cfg.seed, "detector", step)
            idx = rng.choice(len(images), size=cfg.detector_batch, replace=False)
            x = (to_float(images[idx], self.device) + 1) / 2
            # Light noise so the detector also reads slightly imperfect generated images.
            x = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
            logits = det(x)
            y = torch.from_numpy(labels[idx].astype(np.int64)).to(self.device)
            loss = sum(F.cross_entropy(logits[a], y[:, k]) for k, a in enumerate(world.ATTRIBUTES))
            for g in opt.param_groups:
                g["lr"] = cfg.detector_lr * cosine_lr(step, cfg.detector_steps, min(50, cfg.detector_steps // 10 + 1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        det.eval()
        accuracy = detector_accuracy(det, seed=cfg.seed + 999, n=2000 if cfg.pool_size > 1000 else 64, device=self.device)
        with io.atomic_dir(self.out / "detector") as tmp:
            io.save_tensors(tmp / "detector.safetensors", det.state_dict())
            io.write_json(tmp / "detector.json", {"config": det_cfg.to_dict(), "heldout_accuracy": accuracy})
        self._mark("detector", {"heldout_accuracy": accuracy})

    @torch.no_grad()
    def stage_cache(self) -> None:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel

        cfg = self.cfg
        images, labels = self._pool()
        vae = AutoencoderKL.from_pretrained(self.out / "vae", dtype=torch.float32).to(self.device).eval()
        lat = []
        for s in tqdm(range(0, len(images), 256), desc="encode latents", mininterval=2):
            lat.append(vae.encode(to_float(images[s : s + 256], self.device)).latent_dist.mean.cpu())
        latents = torch.cat(lat)  # (N, 4, 8, 8)
        scaling = float(1.0 / latents.std())
        text = CLIPTextModel.from_pretrained(self.out / "clip").to(self.device).eval()
        k = cfg.captions_per_image
        embeds = np.zeros((len(images) * k, self.tokenizer.model_max_length, text.config.hidden_size), np.float16)
        rng = np.random.default_rng([cfg.seed, STAGES.index("cache")])
        captions = [training_caption(self._scene(labels[i % len(images)]), rng)[0] for i in range(len(images) * k)]
        for s in tqdm(range(0, len(captions), 512), desc="encode captions", mininterval=2):
            ids = self.tokenizer(captions[s : s + 512], padding="max_length", truncation=True, return_tensors="pt").input_ids
            embeds[s : s + 512] = text(ids.to(self.device)).last_hidden_state.cpu().numpy().astype(np.float16)
        empty = self.tokenizer([""], padding="max_length", return_tensors="pt").input_ids
        uncond = text(empty.to(self.device)).last_hidden_state.cpu()
        d = self.out / "cache"
        d.mkdir(exist_ok=True)
        io.save_tensors(d / "latents.safetensors", {"latents": latents * scaling, "uncond": uncond})
        with io.atomic_path(d / "embeds.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, embeds)
        self._mark("cache", {"scaling_factor": scaling, "captions": len(captions)})

    def stage_unet(self) -> None:
        cfg = self.cfg
        from diffusers import DDPMScheduler

        cache = io.load_tensors(self.out / "cache" / "latents.safetensors")
        latents, uncond = cache["latents"], cache["uncond"]
        embeds = np.load(self.out / "cache" / "embeds.npy", mmap_mode="r")
        n_img, k = len(latents), self.cfg.captions_per_image
        drawn = self.unet_images()  # (M,) the images the UNet may see; None: all of them
        unet = models.unet_model(seed=cfg.seed).to(self.device)
        ema = models.unet_model(seed=cfg.seed).to(self.device)
        if drawn is not None:
            log.info("UNet from scratch on %d of %d images: none shows %s", len(drawn), n_img, cfg.exclude)
        elif self.warm is not None:
            kind, src = self.warm
            weights = src / "unet" / ("ema.safetensors" if kind == "run" else "diffusion_pytorch_model.safetensors")
            unet.load_state_dict({k: v.float() for k, v in io.load_tensors(weights).items()})
            log.info("UNet warm start from %s (its EMA weights)", src)
        ema.load_state_dict(unet.state_dict())
        ema.requires_grad_(False)
        opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
        noise_sched = DDPMScheduler.from_config(models.scheduler().config)
        alphas = noise_sched.alphas_cumprod.to(self.device)
        uncond_dev = uncond.to(self.device)

        def loss_at(step: int) -> torch.Tensor:
            rng = _step_rng(cfg.seed, "unet", step)
            if drawn is None:
                cap = rng.choice(n_img * k, size=cfg.unet_batch, replace=False)
            else:  # caption j of image i is row i + j * n_img of the cache
                cap = rng.choice(drawn, size=cfg.unet_batch, replace=False) + n_img * rng.integers(0, k, cfg.unet_batch)
            img = cap % n_img
            x0 = latents[img].to(self.device)
            cond = torch.from_numpy(embeds[np.sort(cap)].astype(np.float32))
            cond = cond[np.argsort(np.argsort(cap))].to(self.device)  # back to batch order
            drop = torch.from_numpy(rng.random(cfg.unet_batch) < cfg.caption_dropout).to(self.device)
            cond = torch.where(drop[:, None, None], uncond_dev.expand_as(cond), cond)
            g = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + step)
            noise = torch.randn(x0.shape, generator=g).to(self.device)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.unet_batch,), generator=g).to(self.device)
            xt = noise_sched.add_noise(x0, noise, t)
            pred = unet(xt, t, cond).sample
            # Min-SNR-gamma weighting (Hang et al. 2023) for epsilon prediction: converges faster.
            snr = alphas[t] / (1 - alphas[t])
            weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr
            return (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()

        ckdir = self.out / "unet"
        denoiser_loop(unet, ema, opt, loss_at, steps=cfg.unet_steps, lr=cfg.unet_lr, warmup=cfg.unet_warmup,
                      ema_decay=cfg.unet_ema, ckdir=ckdir, model_file="unet.safetensors",
                      checkpoint_every=cfg.checkpoint_every, desc="unet")
        final = io.read_json(ckdir / "last.json")
        self._mark("unet", {"steps": cfg.unet_steps, "final_loss": final["loss"]})

    def unet_images(self) -> np.ndarray | None:
        """(M,) indices of the pool images the UNet trains on: those not showing `exclude`; None without it."""
        if self.excluded is None:
            return None
        column, value = self.excluded
        _, labels = self._pool()
        keep = np.flatnonzero(labels[:, column] != value)
        if len(keep) < self.cfg.unet_batch:
            raise TrceError(f"exclude {self.cfg.exclude} leaves {len(keep)} pool images, fewer than a batch "
                            f"({self.cfg.unet_batch})", field="exclude")
        return keep

    def stage_export(self) -> None:
        export_pipeline(self.out, self.out / "export", self.cfg)
        self._mark("export", {"path": str(self.out / "export")})


def train(out: str | Path, *, seed: int = 0, device: str = "auto", tiny: bool = False, ship: bool = False,
          **overrides) -> tuple[Path, Shipped | None]:
    """`trce shapeworld train` in Python: train (or resume) every component into `out`; returns (the exported
    pipeline folder, where it was installed when `ship` and where the replaced weights were kept).
    `overrides` are `TrainConfig` fields. A ship is refused before training with `tiny` or `exclude`, and after it
    when the model fails the quality bar (see `ship_weights`)."""
    from dataclasses import fields, replace

    from trce.errors import choose
    from trce.shapeworld import weights_dir

    known = {f.name for f in fields(TrainConfig)}
    for name in overrides:
        choose("ShapeWorld training setting", name, known)
    if ship:
        check_ship_args(tiny=tiny, exclude=overrides.get("exclude"), dest=weights_dir())
    cfg = TrainConfig.tiny(seed=seed) if tiny else TrainConfig(seed=seed)
    cfg = replace(cfg, device=device, **overrides)
    export = Trainer(out, cfg).run()
    return export, (ship_weights(export, device=device) if ship else None)
