"""SD 3 / 3.5: a rectified-flow MMDiT (`SD3Transformer2DModel`) with joint text-image attention, read by CLIP-L,
CLIP-G and (optionally) T5.

How TRCE carries over (the paper's equations are in ../shared/papers/METHOD_NOTES.md):

Stage T. There is no cross-attention: all token text enters the transformer through ONE linear layer,
`transformer.context_embedder` (joint_attention_dim -> inner width), applied to the concatenated CLIP-L and
CLIP-G penultimate states (padded to joint_attention_dim) followed by T5's states; the pooled CLIP vectors
(CLIP-L's and CLIP-G's projected [EoT], concatenated) enter through
`transformer.time_text_embed.text_embedder.linear_1`. Both are linear maps of text-encoder outputs, so Eq. 5
applies to them exactly as to SD's to_k/to_v: W' = W T with T mapping the erase prompts' [EoT] rows (CLIP, roles
from the first tokenizer) onto their safe counterparts', with the preservation prior over every CLIP row of the
preservation prompts; and the pooled layer gets its own T on the pooled vectors. With T5 omitted
(`text_encoder_3=None`, which SD3 allows and ShapeWorld's miniature uses) the T5 rows are zeros and the edit
cannot touch them; with T5 present its rows live in the same 4096-d input space, and the prior (over CLIP rows)
leaves directions the CLIP rows never visit to the ridge — a T5-aware prior is not implemented yet.
Layer-wise variant (`--set T.layerwise=true`, `trce.methods.layerwise`): instead of the entry, each joint block's
`attn.add_k_proj` / `attn.add_v_proj` (`text_stream_inputs`) get their own T_i, solved on the text stream's
states where that block reads them (modulated by the timestep and pooled vector, read at points on the original
model's early trajectory); the pooled edit is the same.

Stage V. Trajectory steering on flow matching: the model predicts a velocity v = ε − x0; Eq. 6-8 use the
original model's guided predictions ε(∅) + β(ε(c) − ε(∅)) as f_safe / f_unsafe, which for velocities is the
same affine combination (weights summing to one), so the triplet loss compares velocities consistently. The
trained layers are the image stream's attention (`attn.to_q/to_k/to_v/to_out`: the analogue of attn1 +
attn2.to_q), the guided trajectories are drawn with a stateless Euler flow sampler, early steps only.

ESD and UCE run unchanged (UCE's keyword rows through the same context_embedder solve).

KPOP. The learnable prompt p joins the context rows of the joint attention at the chosen blocks,
C -> [C; p] (`trce.families.injection.JointPromptInjectionProcessor`; `trce.prompt_injection` has the equations): the
joint softmax reads m_p more keys and values, p's own output rows are dropped, so every block keeps its
shapes. p therefore lives in the context stream's width at the attention, d = the context embedder's
output width (`caption_projection_dim`, the blocks' inner width), not the text encoder's
(`injection_width`). The rows it is sized by and initialised from (`injection_rows`) are the text's
context rows as a joint attention first sees them: LN(context_embedder(C)), the first block's
norm1_context with the timestep modulation left out (shift 0, scale 1); k m_c of them for `concat`,
where m_c counts every token row (CLIP's and T5's, also T5's zero rows when T5 is omitted). In joint
attention a concat prompt is not an exact no-op even when it copies the text (the image keys are not
copied: the copies raise the text's logits by log(k+1)), so KPOP's transfer loss does not start at 0 here.
`add` (C -> C + p, m_p = m_c or 1) works as in cross-attention and starts exactly at the original.

Without T5. SD3's pipeline then feeds `max_sequence_length` (256) zero rows after the CLIP rows. The context
embedder maps them to 256 identical rows, and identical context rows stay identical through every joint block
(same modulation, attention query, feed-forward). In the joint softmax, n identical keys with equal values act as
one key whose logit is raised by log n. So trce draws and predicts with ONE such row instead of 256
(`CollapsedRowsJointProcessor`, a subclass of diffusers' `JointAttnProcessor2_0` that behaves exactly like it
unless called with `repeated_row`, passed through `joint_attention_kwargs`). It is the same function, tested
equal on images and predictions, at about a fifth of the joint sequence for ShapeWorld-DiT (16 image + 32 CLIP
+ 1 rows instead of 16 + 32 + 256), or 77 + 1 instead of 77 + 256 rows on SD3 itself.
The collapse is used only where every joint attention runs that processor (it is installed in place of
diffusers' own on first use), directly or inside KPOP's injection when the prompt rows are appended (or one vector
is added to every row): appended rows leave the text rows' indices and the repeated row's identity alone. Under
other processors (a position-wise added prompt, a user's) the 256 rows are fed as the pipeline feeds them.

Sites over the N joint blocks `transformer_blocks.i` (a DiT has no bottleneck; the middle of the stack
stands in for the UNet's mid block): `mid` = the middle block(s), (N-1)//2 .. N//2 (one for odd N, two
for even N); `mid+up` = from there to the last block (the UNet's mid block plus its decoder half);
`all` = every joint block. Only each block's joint attention `attn` is wrapped (SD3.5's extra
image-only `attn2` reads no text). The last block (context_pre_only) still reads the text as K and V;
its context output is discarded by the block anyway.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from trce.errors import TrceError, choose
from trce.families import GROUPS, ModelFamily, TextInput


class FlowSampler:
    """A stateless Euler sampler over a flow-matching schedule with the DDIM-style surface methods use:
    `timesteps`, `init_noise_sigma`, `scale_model_input`, `step(v, t, z).prev_sample`."""

    init_noise_sigma = 1.0

    def __init__(self, scheduler_config: dict, steps: int, device=None, sigmas=None, mu: float | None = None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(copy.deepcopy(dict(scheduler_config)))
        if sigmas is None:
            sched.set_timesteps(steps, device=device, mu=mu)
        else:  # FLUX: the pipeline's own sigmas, shifted by mu
            sched.set_timesteps(device=device, sigmas=list(sigmas), mu=mu)
        self.timesteps, self.sigmas = sched.timesteps, sched.sigmas
        self.config = sched.config

    def scale_model_input(self, z: torch.Tensor, t) -> torch.Tensor:
        return z

    def step(self, velocity: torch.Tensor, t, z: torch.Tensor):
        from types import SimpleNamespace

        i = int((self.timesteps == torch.as_tensor(t, device=self.timesteps.device)).nonzero()[0])
        return SimpleNamespace(prev_sample=z + (self.sigmas[i + 1] - self.sigmas[i]).to(z.dtype) * velocity)


T5_FREE_ROWS = 256  # the zero rows SD3's pipeline feeds without T5 (its default max_sequence_length)


def _joint_processor_base():
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    return JointAttnProcessor2_0


class CollapsedRowsJointProcessor(_joint_processor_base()):
    """diffusers' SD3 joint attention, in which the context row at `repeated_row = (index, count)` stands for
    `count` identical rows (see the module doc): softmax over n identical keys with equal values is one key with
    its logit raised by log n, so every query's output is unchanged. Without `repeated_row` (or without a context)
    it is `JointAttnProcessor2_0` itself."""

    @property
    def collapses_repeated_row(self) -> bool:
        """True for exactly this processor (a subclass may compute otherwise): what a prompt injection wrapping it
        checks before it passes `repeated_row` on (`trce.families.injection.JointPromptInjectionProcessor`)."""
        return type(self) is CollapsedRowsJointProcessor

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, repeated_row: tuple[int, int] | None = None,
                 *args, **kwargs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if repeated_row is None or encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if attention_mask is not None:
            raise TrceError("a collapsed context row cannot be combined with an attention mask")
        import math

        b, n_img = hidden_states.shape[:2]

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, S, H*d) -> (B, H, S, d)
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        cq = heads(attn.add_q_proj(encoder_hidden_states))
        ck = heads(attn.add_k_proj(encoder_hidden_states))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)  # (B, H, n_img + m, d)
        index, count = repeated_row
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)  # (n_img + m,)
        bias[n_img + index] = math.log(count)  # the one key that is `count` keys
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(1, 1, 1, -1))
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1]).to(q.dtype)  # (B, n_img + m, H*d)
        img, ctx = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        return attn.to_out[1](attn.to_out[0](img)), ctx


def collapsible(denoiser) -> bool:
    """Whether every attention of the transformer runs `CollapsedRowsJointProcessor` (directly, or inside KPOP's
    injection of appended prompt rows, which keeps the rows' indices), after putting it in place of diffusers' own
    `JointAttnProcessor2_0` (the same computation without `repeated_row`); processors of any other kind (a
    user's) are left alone, and then the rows are not collapsed."""
    from trce.families.injection import JointPromptInjectionProcessor

    base = _joint_processor_base()
    processors = getattr(denoiser, "attn_processors", None)
    if not processors:
        return False
    for p in processors.values():  # an injection wraps diffusers' processor: the same swap inside it
        if isinstance(p, JointPromptInjectionProcessor) and type(p.inner) is base:
            p.inner = CollapsedRowsJointProcessor()
    if any(type(p) is base for p in processors.values()):
        denoiser.set_attn_processor({name: CollapsedRowsJointProcessor() if type(p) is base else p
                                     for name, p in processors.items()})
        processors = denoiser.attn_processors
    return all(type(p) is CollapsedRowsJointProcessor or getattr(p, "collapses_rows", False)
               for p in processors.values())


def joint_blocks_at(n: int, sites: str) -> range:
    """Indices of KPOP's `sites` in a stack of n joint blocks (see the module doc)."""
    lo, hi = (n - 1) // 2, n // 2  # the middle block (odd n) or the two middle blocks (even n)
    return {"mid": range(lo, hi + 1), "mid+up": range(lo, n), "all": range(n)}[sites]


class SD3Family(ModelFamily):
    name = "sd3"
    description = "Stable Diffusion 3 / 3.5: MMDiT with joint attention, CLIP-L + CLIP-G (+ optional T5), flow matching"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    denoiser_name = "transformer"
    denoiser_classes = ("SD3Transformer2DModel",)
    load_kwargs: ClassVar[dict] = {}

    def identity_modules(self, pipe) -> dict[str, torch.nn.Module]:
        out = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
        if getattr(pipe, "text_encoder_3", None) is not None:
            out["text_encoder_3"] = pipe.text_encoder_3
        return out

    # ------------------------------------------------------------------ text
    def tokenizer(self, pipe):
        return pipe.tokenizer

    def text_encoder(self, pipe) -> torch.nn.Module:
        return pipe.text_encoder

    def text_encoders(self, pipe) -> list[torch.nn.Module]:
        return [m for m in (pipe.text_encoder, pipe.text_encoder_2, getattr(pipe, "text_encoder_3", None)) if m is not None]

    def text_width(self, pipe) -> int:
        return int(pipe.transformer.config.joint_attention_dim)

    def _clip_states(self, pipe, ids1: torch.Tensor, ids2: torch.Tensor, slots=None, embeds=None):
        from trce.tokens import slot_embeddings

        te1, te2 = pipe.text_encoder, pipe.text_encoder_2
        e1 = te1.get_input_embeddings().weight.shape[1]
        with slot_embeddings(te1, slots, None if embeds is None else embeds[..., :e1]):
            o1 = te1(ids1.to(te1.device), output_hidden_states=True)
        with slot_embeddings(te2, slots, None if embeds is None else embeds[..., e1:]):
            o2 = te2(ids2.to(te2.device), output_hidden_states=True)
        hidden = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2].to(o1.hidden_states[-2].device)], dim=-1)
        width = self.text_width(pipe)
        hidden = torch.nn.functional.pad(hidden, (0, width - hidden.shape[-1]))  # (N, L, joint width)
        pooled = torch.cat([o1.text_embeds, o2.text_embeds.to(o1.text_embeds.device)], dim=-1)  # (N, P)
        return hidden, pooled

    def _ids2(self, pipe, ids: torch.Tensor) -> torch.Tensor:
        from trce.tokens import first_eos

        ids2 = ids.clone()
        after = torch.arange(ids.shape[1])[None] > first_eos(ids, pipe.tokenizer.eos_token_id)[:, None]
        ids2[after] = pipe.tokenizer_2.pad_token_id
        return ids2

    def token_states(self, pipe, prompts: Sequence[str], cut_at_eos: bool = False,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        ids, hidden, _ = self.token_and_pooled_states(pipe, prompts, cut_at_eos)
        return ids, hidden

    @torch.no_grad()
    def token_and_pooled_states(self, pipe, prompts: Sequence[str], cut_at_eos: bool = False,
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # one pass of the two CLIPs: their pooled vectors are read at the end-of-text token, which a cut keeps
        from trce.tokens import first_eos, tokenize

        ids = tokenize(pipe.tokenizer, prompts)
        run = ids
        if cut_at_eos:
            run = ids[:, : int(first_eos(ids, pipe.tokenizer.eos_token_id).max()) + 1]
        hidden, pooled = self._clip_states(pipe, run, self._ids2(pipe, run))
        return ids, hidden, pooled  # (N, L), (N, L', D), (N, P)

    @torch.no_grad()
    def pooled_states(self, pipe, prompts: Sequence[str]) -> torch.Tensor:
        from trce.tokens import tokenize

        ids = tokenize(pipe.tokenizer, prompts)
        return self._clip_states(pipe, ids, self._ids2(pipe, ids))[1]

    def text_projections(self, pipe) -> list[str]:
        return ["transformer.context_embedder.weight"]

    def text_inputs(self, pipe) -> list[TextInput]:
        return [TextInput("tokens", ("transformer.context_embedder.weight",)),
                TextInput("pooled", ("transformer.time_text_embed.text_embedder.linear_1.weight",))]

    def text_stream_inputs(self, pipe) -> list[TextInput]:
        # each joint block's text keys and values: they read the same modulated context rows
        out = []
        for i, block in enumerate(self.denoiser(pipe).transformer_blocks):
            if getattr(block.attn, "add_k_proj", None) is None:
                continue
            at = f"{self.denoiser_name}.transformer_blocks.{i}.attn"
            out.append(TextInput(f"block{i}", (f"{at}.add_k_proj.weight", f"{at}.add_v_proj.weight")))
        return out

    def _pack(self, hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        n, _, d = hidden.shape
        extra = torch.zeros(n, 1, d, dtype=hidden.dtype, device=hidden.device)
        extra[:, 0, :pooled.shape[-1]] = pooled.to(hidden.dtype)
        return torch.cat([hidden, extra], dim=1)

    def _t5_rows(self, pipe, n: int, like: torch.Tensor) -> torch.Tensor:
        if getattr(pipe, "text_encoder_3", None) is not None:
            raise TrceError("conditioning from token ids with T5 is not implemented; load the pipeline with "
                            "text_encoder_3=None")
        return torch.zeros(n, 256, like.shape[-1], dtype=like.dtype, device=like.device)

    @torch.no_grad()
    def encode(self, pipe, prompts: Sequence[str]) -> torch.Tensor:
        embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), None, None, device=pipe.text_encoder.device,
                                                  num_images_per_prompt=1, do_classifier_free_guidance=False)
        return self._pack(embeds, pooled)

    def encode_ids(self, pipe, ids: torch.Tensor, slots: slice | None = None,
                   embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden, pooled = self._clip_states(pipe, ids, self._ids2(pipe, ids), slots, embeds)
        return self._pack(torch.cat([hidden, self._t5_rows(pipe, len(ids), hidden)], dim=1), pooled)

    def input_table(self, pipe) -> torch.Tensor:
        a = pipe.text_encoder.get_input_embeddings().weight
        b = pipe.text_encoder_2.get_input_embeddings().weight
        return torch.cat([a, b.to(a.device, a.dtype)], dim=1)

    def token_part(self, cond: torch.Tensor) -> torch.Tensor:
        return cond[:, :-1]

    # ------------------------------------------------------------------ denoiser
    def _pooled_width(self, denoiser) -> int:
        return int(denoiser.config.pooled_projection_dim)

    def predict(self, denoiser, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=z.device).reshape(-1).expand(len(z))
        tokens, joint = self._collapsed(denoiser, cond[:, :-1])
        kwargs = {"hidden_states": z, "timestep": t, "encoder_hidden_states": tokens,
                  "pooled_projections": cond[:, -1, :self._pooled_width(denoiser)], "joint_attention_kwargs": joint}
        if params is None:
            return denoiser(**kwargs).sample
        return torch.func.functional_call(denoiser, params, (), kwargs).sample

    def _collapsed(self, denoiser, tokens: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
        """(B, m, D) context rows -> the same rows with a trailing run of T5_FREE_ROWS zero rows (T5 omitted)
        collapsed to one, and the joint_attention_kwargs that weigh it (module doc); unchanged where not possible."""
        m = tokens.shape[1] - T5_FREE_ROWS
        if m < 1 or tokens[:, m:].any() or not collapsible(denoiser):
            return tokens, None
        return tokens[:, : m + 1], {"repeated_row": (m, T5_FREE_ROWS)}  # (B, m + 1, D)

    def trainable(self, denoiser, group: str) -> dict[str, torch.nn.Parameter]:
        group = choose("parameter group", group, GROUPS)
        image_attn = (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".attn.to_out.")
        text_attn = (".attn.add_q_proj.", ".attn.add_k_proj.", ".attn.add_v_proj.", ".attn.to_add_out.")
        out = {}
        for name, param in denoiser.named_parameters():
            dotted = f".{name}"
            if group == "visual":
                keep = any(k in dotted for k in image_attn)
            elif group == "cross-attn":  # where the text stream enters attention: the joint attention's text side
                keep = any(k in dotted for k in text_attn)
            else:
                keep = (not any(k in dotted for k in text_attn)
                        and not name.startswith(("time_text_embed.", "proj_out.", "norm_out.")))
            if keep:
                out[name] = param
        if not out:
            raise TrceError(f"the transformer has no parameters in group {group!r}")
        return out

    def injection_layers(self, denoiser, sites: str) -> list[str]:
        from trce.families.injection import SITES

        sites = choose("prompt injection site", sites, SITES)
        blocks = getattr(denoiser, "transformer_blocks", None) or []
        processors = denoiser.attn_processors
        names = [f"transformer_blocks.{i}.attn.processor" for i in joint_blocks_at(len(blocks), sites)]
        names = [name for name in names if name in processors]
        if not names:
            raise TrceError(f"the transformer has no joint attention layer at injection site {sites!r}")
        return names

    def injection_processor(self, inner, slot, name: str):
        from trce.families.injection import JointPromptInjectionProcessor

        return JointPromptInjectionProcessor(inner, slot, name)

    def injection_width(self, pipe) -> int:
        return int(self.denoiser(pipe).context_embedder.out_features)  # the context stream's width

    @torch.no_grad()
    def injection_rows(self, pipe, cond: torch.Tensor) -> torch.Tensor:
        embedder = self.denoiser(pipe).context_embedder
        w = embedder.weight
        rows = embedder(self.token_part(cond).to(w.device, w.dtype)).float()  # (N, m_c, d)
        # the joint attention reads LN(c) (1 + scale) + shift; without the timestep's modulation: LN(c)
        return torch.nn.functional.layer_norm(rows, rows.shape[-1:], eps=1e-6).to(cond.device)

    def latent_shape(self, pipe_or_denoiser, image_size: int | None = None, scale: int | None = None,
                     ) -> tuple[int, int, int]:
        denoiser = getattr(pipe_or_denoiser, "transformer", pipe_or_denoiser)
        scale = scale if scale is not None else int(getattr(pipe_or_denoiser, "vae_scale_factor", 8))
        side = int(denoiser.config.sample_size) if image_size is None else image_size // scale
        if image_size is not None and (image_size <= 0 or image_size % scale):
            raise TrceError(f"image size {image_size} must be a positive multiple of {scale}")
        return int(denoiser.config.in_channels), side, side

    def sampler(self, scheduler_config: dict, steps: int, device=None):
        return FlowSampler(scheduler_config, steps, device)

    def noised(self, pipe, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = (t.float() / pipe.scheduler.config.num_train_timesteps).view(-1, *([1] * (z0.dim() - 1)))
        return (1 - sigma) * z0 + sigma * noise, noise - z0  # flow matching: the velocity target

    # ------------------------------------------------------------------ drawing
    def draw_kwargs(self, pipe) -> dict[str, Any]:
        # without T5: one zero row for the pipeline's 256, weighed as 256 (module doc)
        if getattr(pipe, "text_encoder_3", None) is not None or not collapsible(pipe.transformer):
            return {}
        m = int(pipe.tokenizer_max_length)  # the CLIP rows before the T5 rows
        return {"max_sequence_length": 1, "joint_attention_kwargs": {"repeated_row": (m, T5_FREE_ROWS)}}

    def pipeline_inputs(self, pipe, cond: torch.Tensor) -> dict[str, Any]:
        dev, dt = pipe.text_encoder.device, pipe.text_encoder.dtype
        draw = self.draw_kwargs(pipe)
        tokens = cond[:, :-1]
        if draw:
            tokens, joint = self._collapsed(pipe.transformer, tokens)
            if joint != draw["joint_attention_kwargs"]:  # not the pipeline's layout of zero T5 rows: as given
                tokens, draw = cond[:, :-1], {}
        return {"prompt_embeds": tokens.to(dev, dt),
                "pooled_prompt_embeds": cond[:, -1, :self._pooled_width(pipe.transformer)].to(dev, dt), **draw}

    def image_size(self, pipe) -> int:
        return int(pipe.transformer.config.sample_size) * int(pipe.vae_scale_factor)

    def info(self, pipe) -> dict[str, Any]:
        t = pipe.transformer.config
        return {"image_size": self.image_size(pipe), "text_width": self.text_width(pipe),
                "max_tokens": pipe.tokenizer.model_max_length, "joint_blocks": int(t.num_layers),
                "t5": getattr(pipe, "text_encoder_3", None) is not None}
