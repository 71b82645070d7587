"""Benchmark of TRCE stage V (`trce.methods.stage_v.erase_v`) against a naive loop, side by side.

    python benchmarks/stage_v.py                 # GPU: SD v1.4 architecture, the paper's settings
    python benchmarks/stage_v.py --reduced       # the CPU setting (chosen automatically without a GPU)

Model: `sd14-arch` (SD v1.4's UNet / CLIP ViT-L text encoder / VAE with random weights: time and
memory do not depend on weight values). Paper settings on GPU: 512x512, DDIM 50 steps (first 25
used), 100 concept trajectories, 2000 unconditional ones, 3 epochs, batch 1 + 4 preservation points,
reference in fp16, training fp32 master weights with bf16 autocast. Reduced CPU setting: 64x64,
DDIM 10 steps (first 5), 2 trajectories, 4 unconditional points, 1 epoch, 1 preservation point.

Measured in one run:
1. stage V cold: empty cache folder, so it samples and caches the concept trajectories with their
   Eq. 6/7 targets, samples the unconditional points (Eq. 9, once per base model), then trains;
2. stage V per concept: another concept (seed) with the unconditional cache already on disk,
   the case of every concept after the first;
3. naive, as the authors' code does it: trajectories sampled one at a time through all DDIM steps
   (2 UNet calls per step), and in the training loop 3 reference calls per step for Eq. 6/7 plus
   one reference call per preservation point, each prediction of the trained model a separate call.
   On GPU its unconditional sampling is timed on 50 of the 2000 trajectories and scaled (stated in
   the output); everything else runs in full.
Prints JSON (seconds per phase, peak memory, the naive / stage V ratios).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import resource
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from trce.families import family_of
from trce.loading import load_pipeline
from trce.methods.stage_v import StageVConfig, erase_v, stage_v_loss, trainable_parameters
from trce.methods.trajectories import Reference

PAIRS = [(f"a photo of a person, {w}", f"a photo of a person, {s}") for w, s in
         [("nude", "dressed"), ("naked", "clothed"), ("topless", "wearing a shirt"), ("undressed", "in a coat"),
          ("bare", "in a suit")]]

PAPER = StageVConfig(n_trajectories=100, n_uncond=2000, ddim_steps=50, epochs=3, preserve_batch=4,
                     mixed_precision="bf16", image_size=512, checkpoint_every=0, cache_batch_size=16)
REDUCED = StageVConfig(n_trajectories=2, n_uncond=4, ddim_steps=10, epochs=1, preserve_batch=1,
                       mixed_precision="no", image_size=64, checkpoint_every=0, cache_batch_size=2)


def _cpu_name() -> str:
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.processor() or 'cpu'} ({len(names) or '?'} logical CPUs)"


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # process peak RSS so far


def naive(pipe, pairs, cfg: StageVConfig, device: torch.device, uncond_measured: int) -> dict:
    """The authors' structure: no target cache, reference calls inside the training loop."""
    ref = Reference.from_pipe(pipe)
    unet = pipe.unet
    shape = (4, cfg.image_size // 8, cfg.image_size // 8)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.mixed_precision == "bf16"
                else torch.autocast("cpu", enabled=False))
    gen = torch.Generator("cpu").manual_seed(0)
    emb_m, emb_s, null = ref.encode([m for m, _ in pairs]), ref.encode([s for _, s in pairs]), ref.encode([""])
    t0 = _now(device)
    latents = []  # (trajectory, step) -> latent: the first keep steps of each full trajectory
    with torch.no_grad():
        for i in range(cfg.n_trajectories):
            sched = ref.scheduler(cfg.ddim_steps)
            z = torch.randn((1, *shape), generator=gen).to(device)
            e = emb_m[i % len(pairs)][None]
            keep = []
            for k, t in enumerate(sched.timesteps):
                e_c = ref.eps(z, t, e)
                e_u = ref.eps(z, t, null)
                if k < cfg.keep_steps:
                    keep.append(z)
                z = sched.step(e_u + cfg.sample_guidance * (e_c - e_u), t, z).prev_sample
            latents.append((keep, sched.timesteps[:cfg.keep_steps]))
    t1 = _now(device)
    uncond = []
    with torch.no_grad():
        for _ in range(uncond_measured):
            sched = ref.scheduler(cfg.ddim_steps)
            z = torch.randn((1, *shape), generator=gen).to(device)
            for t in sched.timesteps:
                e_c = ref.eps(z, t, null)
                e_u = ref.eps(z, t, null)  # the authors sample "" with guidance 7.5: two calls
                uncond.append((z, t))
                z = sched.step(e_u + cfg.sample_guidance * (e_c - e_u), t, z).prev_sample
    t2 = _now(device)
    model = copy.deepcopy(unet).to(dtype=torch.float32)
    params = trainable_parameters(model, family_of(pipe))
    opt = torch.optim.Adam(list(params.values()), lr=cfg.lr)
    null32 = null.float()
    for _ in range(cfg.epochs):
        for i in torch.randperm(cfg.n_trajectories, generator=gen).tolist():
            k = int(torch.randint(0, cfg.keep_steps, (1,), generator=gen))
            z, t = latents[i][0][k], latents[i][1][k]
            e_m, e_s = emb_m[i % len(pairs)][None], emb_s[i % len(pairs)][None]
            with torch.no_grad():  # 3 reference calls per step (Eq. 6/7)
                e0, em, es = ref.eps(z, t, null), ref.eps(z, t, e_m), ref.eps(z, t, e_s)
                f_unsafe, f_safe = e0 + cfg.beta * (em - e0), e0 + cfg.beta * (es - e0)
            with autocast:
                out_c = model(z.float(), t, encoder_hidden_states=e_m.float()).sample.float()
                out_u = model(z.float(), t, encoder_hidden_states=null32).sample.float()
            preds, targets = [], []
            for j in torch.randint(0, len(uncond), (cfg.preserve_batch,), generator=gen).tolist():
                zu, tu = uncond[j]
                with torch.no_grad():
                    targets.append(ref.eps(zu, tu, null))  # one more reference call per point (Eq. 9)
                with autocast:
                    preds.append(model(zu.float(), tu, encoder_hidden_states=null32).sample.float())
            loss = stage_v_loss(out_c, out_u, torch.cat(preds), f_safe, f_unsafe, torch.cat(targets),
                                margin=cfg.margin, lambda_preserve=cfg.lambda_preserve)["total"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    t3 = _now(device)
    scale = cfg.n_uncond / max(uncond_measured, 1)
    times = {"cache_concept": t1 - t0, "cache_uncond": (t2 - t1) * scale, "train": t3 - t2}
    times["total"] = sum(times.values())
    return {"timings_s": {k: round(v, 2) for k, v in times.items()},
            "uncond_measured": f"{uncond_measured} of {cfg.n_uncond} trajectories, time scaled x{scale:g}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--reduced", action="store_true", help="the reduced CPU setting (default without a GPU)")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reduced = args.reduced or device.type != "cuda"
    cfg = REDUCED if reduced else PAPER
    pipe = load_pipeline("sd14-arch", device=device, dtype="fp32" if device.type == "cpu" else "fp16")
    report: dict = {
        "benchmark": "stage V", "model": "sd14-arch (random weights)",
        "setting": "reduced CPU setting" if reduced else "paper settings", "config": asdict(cfg),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "peak_memory": "GPU max_memory_allocated (GiB)" if device.type == "cuda" else "process peak RSS so far (GiB)",
    }
    with tempfile.TemporaryDirectory() as cache:
        _reset_peak(device)
        cold = erase_v(pipe, PAIRS, cfg, cache_dir=cache, progress=True)
        report["stage_v_cold"] = {**cold.info["timings_s"], "peak_gib": _peak_gib(device)}
        _reset_peak(device)
        warm = erase_v(pipe, PAIRS, replace(cfg, seed=cfg.seed + 1), cache_dir=cache, progress=True)
        report["stage_v_per_concept"] = {**warm.info["timings_s"], "peak_gib": _peak_gib(device)}
        report["loss"] = {"first": cold.info["loss_first"], "last": cold.info["loss_last"]}
    if not args.skip_naive:
        _reset_peak(device)
        result = naive(pipe, PAIRS, cfg, device, uncond_measured=cfg.n_uncond if reduced else 50)
        report["naive"] = {**result, "peak_gib": _peak_gib(device)}
        ours, theirs = report["stage_v_cold"], result["timings_s"]
        report["naive_over_stage_v"] = {k: round(theirs[k] / max(ours[k], 1e-9), 2)
                                        for k in ("cache_concept", "cache_uncond", "train", "total")}
        report["naive_over_stage_v"]["per_concept_total"] = round(
            (theirs["cache_concept"] + theirs["train"]) / max(report["stage_v_per_concept"]["total"], 1e-9), 2)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
