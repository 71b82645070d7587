"""What a ShapeWorld training reads and writes beyond its stages: the warm-start source it starts from (a finished
run or an exported pipeline, and the CLIP carried over from it), the value `--exclude` keeps from the UNet, and the
exported pipeline folder it assembles from the trained parts."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from trce.errors import TrceError
from trce.shapeworld import models, world
from trce.shapeworld.training import STAGES, TrainConfig
from trce.utils import io

log = logging.getLogger(__name__)


def export_pipeline(run: Path, dest: Path, cfg: TrainConfig) -> None:
    """Assemble the trained parts into the folder that ships in the package (fp16 weights)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    scaling = io.read_json(run / "cache" / "DONE")["scaling_factor"]
    tokenizer = CLIPTokenizer.from_pretrained(run / "clip" / "tokenizer")
    text = CLIPTextModel.from_pretrained(run / "clip")
    vae = AutoencoderKL.from_pretrained(run / "vae")
    vae.register_to_config(scaling_factor=scaling)
    unet = models.unet_model(seed=cfg.seed)
    unet.load_state_dict(io.load_tensors(run / "unet" / "ema.safetensors"))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=models.scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    clip = CLIPModel.from_pretrained(run / "clip")
    vision = CLIPVisionModelWithProjection(clip.config.vision_config)
    vision.vision_model.load_state_dict(clip.vision_model.state_dict())
    vision.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    with io.atomic_dir(dest) as tmp:
        pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        vision.to(torch.float16).save_pretrained(tmp / "clip_vision", safe_serialization=True)
        io.save_tensors(
            tmp / "clip_text_projection.safetensors",
            {"text_projection": clip.text_projection.weight.half(), "logit_scale": clip.logit_scale.detach()},
        )
        det = io.read_json(run / "detector" / "detector.json")
        (tmp / "detector").mkdir()
        io.save_tensors(tmp / "detector" / "detector.safetensors", io.load_tensors(run / "detector" / "detector.safetensors"))
        io.write_json(tmp / "detector" / "detector.json", det)
        made = {**_run_record(run), "exported": io.run_record()["date"]}
        if cfg.warm_start:
            # A fine-tuned run is only reproducible with the run it started from: keep its record too.
            kind, src = warm_source(cfg.warm_start)
            made["warm_start_run"] = _run_record(src) if kind == "run" else io.read_json(src / "made.json")
        io.write_json(tmp / "made.json", made)


def excluded_value(text: str) -> tuple[int, int] | None:
    """"color=red" -> (the label column of "color", the index of "red"); "" -> None."""
    if not text:
        return None
    attribute, (value,) = world.attribute_values(text, "exclude", several=False)
    return world.ATTRIBUTES.index(attribute), list(world.vocab().values(attribute)).index(value)


def warm_source(path: str) -> tuple[str, Path]:
    """("run", folder) for a finished training run, ("export", folder) for an exported pipeline (`shapeworld`:
    the shipped weights, which hold the CLIP towers, the UNet's EMA weights, the VAE and the detector)."""
    if path == "shapeworld":
        from trce.shapeworld import weights_dir

        return "export", weights_dir()
    src = Path(path).expanduser()
    if not src.is_dir():
        raise TrceError(f"--warm-start {src} is not a finished ShapeWorld run or exported pipeline: no such folder")
    if (src / "model_index.json").exists() and (src / "clip_vision").is_dir() and (src / "made.json").exists():
        return "export", src
    missing = [s for s in ("clip", "unet") if not (src / s / "DONE").exists()]
    if not (src / "train.json").exists() or missing:
        raise TrceError(f"--warm-start {src} is not a finished ShapeWorld run (no train.json or unfinished: "
                        f"{', '.join(missing) or 'train.json'}) nor an exported pipeline")
    return "run", src


def warm_clip(kind: str, src: Path, tokenizer, seed: int = 0):
    """The CLIP of a finished run or an exported pipeline, for `tokenizer`: every token the old tokenizer had keeps
    its embedding (matched by token string, so a grown vocabulary is fine); a new token starts at the mean of the
    old embeddings of the pieces the old tokenizer split it into."""
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    if kind == "run":
        old = CLIPModel.from_pretrained(src / "clip", dtype=torch.float32)
        old_tok = CLIPTokenizer.from_pretrained(src / "clip" / "tokenizer")
        text_state, vision, visual_proj = old.text_model.state_dict(), old.vision_model, old.visual_projection
        text_proj, logit_scale = old.text_projection.weight.detach(), old.logit_scale.detach()
    else:
        text = CLIPTextModel.from_pretrained(src / "text_encoder", dtype=torch.float32)
        tower = CLIPVisionModelWithProjection.from_pretrained(src / "clip_vision", dtype=torch.float32)
        old_tok = CLIPTokenizer.from_pretrained(src / "tokenizer")
        proj = io.load_tensors(src / "clip_text_projection.safetensors")
        text_state, vision, visual_proj = text.state_dict(), tower.vision_model, tower.visual_projection
        text_proj, logit_scale = proj["text_projection"].float(), proj["logit_scale"].float()
    model = models.clip_model(tokenizer, seed=seed)
    old_rows = text_state.pop("embeddings.token_embedding.weight").float()  # (old vocab, D)
    missing, unexpected = model.text_model.load_state_dict(text_state, strict=False)
    if unexpected or set(missing) != {"embeddings.token_embedding.weight"}:
        raise TrceError(f"--warm-start {src}: its text encoder does not fit this one ({missing[:2]}, {unexpected[:2]})")
    old_vocab = old_tok.get_vocab()
    rows = torch.empty(len(tokenizer), old_rows.shape[1])
    fresh = 0
    for token, i in tokenizer.get_vocab().items():
        if token in old_vocab:
            rows[i] = old_rows[old_vocab[token]]
        else:
            pieces = old_tok(token.replace("</w>", ""), add_special_tokens=False).input_ids or [old_tok.eos_token_id]
            rows[i] = old_rows[pieces].mean(0)
            fresh += 1
    with torch.no_grad():
        model.text_model.embeddings.token_embedding.weight.copy_(rows)
        model.vision_model.load_state_dict(vision.state_dict())
        model.visual_projection.load_state_dict(visual_proj.state_dict())
        model.text_projection.weight.copy_(text_proj)
        model.logit_scale.copy_(logit_scale)
    log.info("CLIP warm start: %d of %d tokens carried over, %d new", len(tokenizer) - fresh, len(tokenizer), fresh)
    return model


def _run_record(run: Path) -> dict:
    """A run folder's train.json with what each finished stage reported."""
    stages = {s: io.read_json(run / s / "DONE") for s in STAGES if (run / s / "DONE").exists()}
    return {**io.read_json(run / "train.json"), "stages": stages}
