"""Model families: everything that differs between SD 1.x, SD 2.x, SDXL, SD3 and FLUX, in one module each.

Methods, attacks and evaluation never branch on the architecture: they ask the pipeline's family
(`family_of(pipe)`) how to encode prompts, which token positions a role means, which linear layers
carry text into the denoiser, which parameters a training stage may change, how to call the
denoiser, and how to draw. A new architecture is one new module with a `ModelFamily` subclass and
one line in `FAMILIES`.

Conditioning. `encode(pipe, prompts)` returns ONE tensor (N, L, D) per prompt batch: exactly what the
denoiser conditions on. Families with more than token states (SDXL's pooled embedding and size ids,
SD3's pooled CLIP vector) pack the extra vectors into extra rows of that tensor and unpack them in
`predict` and `pipeline_inputs`, so every method can index, concatenate and repeat conditionings
as plain tensors.

Predictions. `predict(denoiser, z, t, cond)` returns the denoiser's raw output in the model's own
parameterisation (ε for epsilon models, v for v-prediction, velocity for flow matching); methods
that compare predictions compare them in that parameterisation, consistently on both sides.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from trce.errors import TrceError, choose

# name -> "module:Class"; `family_of` tries them in this order (the more specific first).
FAMILIES: dict[str, str] = {
    "flux": "trce.families.flux:FluxFamily",
    "sd3": "trce.families.sd3:SD3Family",
    "sdxl": "trce.families.sdxl:SDXLFamily",
    "sd2": "trce.families.sd2:SD2Family",
    "sd1": "trce.families.sd1:SD1Family",
}

# Training groups every family defines (`trainable`):
#   visual          what TRCE stage V trains: self-attention and the query of cross-attention (Sec. 4.2)
#   cross-attn      every cross-attention parameter (KPOP/ESD-x: objects and styles)
#   non-cross-attn  everything but cross-attention, the time embedding and the output layers (ESD-u: nudity)
GROUPS = ("visual", "cross-attn", "non-cross-attn")


@dataclass(frozen=True)
class TextInput:
    """A place where text enters the denoiser through linear layers: what TRCE stage T maps (Eq. 5).

    name      "tokens" (one state per token position: token roles choose which) or "pooled" (one vector per
              prompt, e.g. SDXL's pooled CLIP embedding)
    paths     `Edit` paths of the weights that read it
    columns   the slice [start, stop) of those weights' input columns that read it (None: all of them)
    """

    name: str
    paths: tuple[str, ...]
    columns: tuple[int, int] | None = None

    @property
    def per_token(self) -> bool:
        return self.name == "tokens"


class ModelFamily:
    """The interface. Subclasses set `name`, `description`, `pipeline_classes` and implement the methods."""

    name: str = ""
    description: str = ""
    pipeline_classes: tuple[str, ...] = ()  # diffusers pipeline classes of this family (model_index `_class_name`)
    denoiser_name: str = "unet"  # the pipeline attribute holding the denoiser (`transformer` for DiTs)
    denoiser_classes: tuple[str, ...] = ()  # class names of its denoiser (a bare denoiser's family)
    load_kwargs: ClassVar[dict] = {}  # extra keyword arguments of `from_pretrained` (SD: no safety checker)

    # ------------------------------------------------------------------ identity and components
    def matches(self, pipe) -> bool:
        return type(pipe).__name__ in self.pipeline_classes

    def components(self, pipe) -> dict[str, torch.nn.Module]:
        """The pipeline's torch modules by attribute name: every path an `Edit` may name starts with one."""
        found = {name: value for name, value in getattr(pipe, "components", {}).items()
                 if isinstance(value, torch.nn.Module)}
        # the denoiser first, then the text encoders, then the rest (the VAE)
        order = sorted(found, key=lambda n: (n != self.denoiser_name, not n.startswith("text_encoder"), n))
        return {name: found[name] for name in order}

    def denoiser(self, pipe) -> torch.nn.Module:
        return getattr(pipe, self.denoiser_name)

    def identity_modules(self, pipe) -> dict[str, torch.nn.Module]:
        """The modules whose configuration and weights identify a base model (its fingerprint)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ text
    def tokenizer(self, pipe):
        """The tokenizer whose positions token roles name (`trce.tokens`)."""
        raise NotImplementedError

    def text_encoder(self, pipe) -> torch.nn.Module:
        """The (first) text encoder, the one `tokenizer` feeds."""
        raise NotImplementedError

    def text_encoders(self, pipe) -> list[torch.nn.Module]:
        """Every text encoder (attacks freeze them all)."""
        return [self.text_encoder(pipe)]

    def input_table(self, pipe) -> torch.Tensor:
        """(V, E) a token's input embedding, every encoder's row concatenated: the space attacks optimise in."""
        return self.text_encoder(pipe).get_input_embeddings().weight

    def encode_ids(self, pipe, ids: torch.Tensor, slots: slice | None = None,
                   embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids of the role tokenizer -> (B, L(+1), D) conditioning, with the token embeddings at `slots`
        replaced by `embeds` ((B or 1, k, E), E the width of `input_table`; differentiable)."""
        raise NotImplementedError

    def text_width(self, pipe) -> int:
        """Width D of the text states the text projections read."""
        raise NotImplementedError

    def token_states(self, pipe, prompts: Sequence[str], cut_at_eos: bool = False,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (N, L) of the role tokenizer, states (N, L', D)): the per-token text states the "tokens" input's
        weights read, position by position. With `cut_at_eos` only the positions up to the batch's last first
        end-of-text are encoded (L' <= L; causal encoders give the same values there)."""
        raise NotImplementedError

    def pooled_states(self, pipe, prompts: Sequence[str]) -> torch.Tensor:
        """(N, P): the per-prompt vectors a "pooled" text input reads (families that have one)."""
        raise NotImplementedError

    def token_and_pooled_states(self, pipe, prompts: Sequence[str], cut_at_eos: bool = False,
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`token_states` and `pooled_states` of the same prompts: (ids, states, pooled (N, P)). Families whose pooled
        vector comes out of the same encoder pass as the token states override it with one pass."""
        ids, states = self.token_states(pipe, prompts, cut_at_eos)
        return ids, states, self.pooled_states(pipe, prompts)

    def text_inputs(self, pipe) -> list[TextInput]:
        """Where text enters the denoiser through linear layers (stage T maps each): per-token states, and for
        some families a pooled vector too."""
        return [TextInput("tokens", tuple(self.text_projections(pipe)))]

    def text_stream_inputs(self, pipe) -> list[TextInput]:
        """Per-block layers that read the text *inside* the denoiser (a joint-attention stream rewritten by every
        block), one TextInput per block whose paths read the same states: stage T's layer-wise variant
        (`trce.methods.layerwise`). [] where text enters only through `text_inputs` (SD's cross-attention)."""
        return []

    def token_part(self, cond: torch.Tensor) -> torch.Tensor:
        """The per-token rows of a conditioning (N, L, D) made by `encode` (families that pack more drop it)."""
        return cond

    def unconditional(self, pipe) -> torch.Tensor:
        """(1, L, D): the conditioning of classifier-free guidance's unconditional half, as the pipeline forms it
        (SD: the empty prompt encoded; SDXL with force_zeros_for_empty_prompt: zeros)."""
        return self.encode(pipe, [""])

    def encode(self, pipe, prompts: Sequence[str]) -> torch.Tensor:
        """(N, L, D) conditioning, exactly as the pipeline conditions on `prompts` (no guidance half)."""
        raise NotImplementedError

    def text_projections(self, pipe) -> list[str]:
        """Exact `Edit` paths of the linear layers that carry text into the denoiser (TRCE stage T, UCE)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ denoiser
    def predict(self, denoiser, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The denoiser's output at (z, t) under `cond`; with `params`, those tensors substituted
        (`torch.func.functional_call`: the frozen original of a model being trained)."""
        raise NotImplementedError

    def trainable(self, denoiser, group: str) -> dict[str, torch.nn.Parameter]:
        """The denoiser's parameters of a training group (see GROUPS), by name inside the denoiser."""
        raise NotImplementedError

    def injection_layers(self, denoiser, sites: str) -> list[str]:
        """Attention-processor names (as in `denoiser.attn_processors`) that read the text, at KPOP's `sites`."""
        raise NotImplementedError

    def injection_processor(self, inner, slot, name: str):
        """The processor that wraps layer `name`'s own processor `inner` and injects `slot.prompt` there
        (`trce.prompt_injection`; cross-attention by default)."""
        from trce.families.injection import PromptInjectionProcessor

        return PromptInjectionProcessor(inner, slot, name)

    def injection_width(self, pipe) -> int:
        """Width d of an injected (KPOP) prompt: the width of the context rows the injected layers read beside it
        (cross-attention: the text states, `text_width`)."""
        return self.text_width(pipe)

    def injection_rows(self, pipe, cond: torch.Tensor) -> torch.Tensor:
        """(N, m_c, d): the context rows of conditioning `cond` (N, L, D) as an injected prompt sits beside them,
        width `injection_width`: KPOP sizes its prompt in m_c and initialises it from these (cross-attention: the
        text states themselves, `token_part`)."""
        return self.token_part(cond)

    def latent_shape(self, pipe_or_denoiser, image_size: int | None = None, scale: int | None = None,
                     ) -> tuple[int, int, int]:
        """(C, h, w) of the latents of an image of `image_size` pixels (None: the model's own)."""
        raise NotImplementedError

    def latents_out(self, pipe, latents: torch.Tensor, image_size: int | None = None) -> torch.Tensor:
        """The pipeline's `output_type="latent"` result as (N, C, h, w) latents (FLUX returns them packed)."""
        return latents

    def sampler(self, scheduler_config: dict, steps: int, device=None):
        """A fresh sampler for trajectories that methods draw themselves (the pipeline's own is left alone)."""
        raise NotImplementedError

    def noised(self, pipe, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_t, regression target) for training-style denoising objectives (UnlearnDiffAtk's Eq. 3)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ drawing
    def draw_kwargs(self, pipe) -> dict[str, Any]:
        """Extra keyword arguments of every `pipe(prompt=...)` call trce makes (the same images, drawn faster: SD3
        without T5 collapses its zero T5 rows); `pipeline_inputs` includes them."""
        return {}

    def pipeline_inputs(self, pipe, cond: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments of `pipe(...)` that draw from a conditioning made by `encode` (soft prompts)."""
        raise NotImplementedError

    def image_size(self, pipe) -> int:
        raise NotImplementedError

    def info(self, pipe) -> dict[str, Any]:
        """What `trce info` prints beside parameter counts."""
        return {}


_loaded: dict[str, ModelFamily] = {}


def get_family(name: str) -> ModelFamily:
    name = choose("model family", name, FAMILIES)
    if name not in _loaded:
        module_name, _, cls = FAMILIES[name].partition(":")
        _loaded[name] = getattr(importlib.import_module(module_name), cls)()
    return _loaded[name]


def family_names() -> list[str]:
    return list(FAMILIES)


def family_of(pipe) -> ModelFamily:
    """The family of a loaded pipeline (by its class, then by what it holds)."""
    cached = getattr(pipe, "trce_family", None)
    if isinstance(cached, ModelFamily):
        return cached
    for name in FAMILIES:
        fam = get_family(name)
        if fam.matches(pipe):
            try:
                pipe.trce_family = fam
            except AttributeError:
                pass
            return fam
    raise TrceError(f"trce does not know the architecture of a {type(pipe).__name__}; known families: "
                    f"{', '.join(FAMILIES)}")


def denoiser_family(denoiser) -> ModelFamily:
    """The family of a bare denoiser (the first whose denoiser class it is)."""
    for name in FAMILIES:
        fam = get_family(name)
        if type(denoiser).__name__ in fam.denoiser_classes:
            return fam
    raise TrceError(f"trce does not know a denoiser of type {type(denoiser).__name__}")


def family_for_class(class_name: str) -> ModelFamily:
    """The family that loads diffusers pipeline class `class_name` (a folder's model_index `_class_name`)."""
    for name in FAMILIES:
        fam = get_family(name)
        if class_name in fam.pipeline_classes:
            return fam
    known = sorted({c for n in FAMILIES for c in get_family(n).pipeline_classes})
    raise TrceError(f"trce has no model family for {class_name}; it loads {', '.join(known)}")


from trce.utils import callable_module

callable_module(__name__, family_names)  # `trce.families()`
