"""A learnable prompt injected into the attention layers that read text, through diffusers' attention processors.

KPOP (Bui et al., Sec. 4.3, Table 1) gives selected cross-attention layers an extra memory: a prompt
p of m_p tokens x text width d. With the text embeddings C (b x m_c x d):

- `concat` (the paper's default, "concatenative"): K = W_k [C; p], V = W_v [C; p], i.e. the m_p
  prompt tokens are appended to the m_c text tokens (the same p for every batch item, so
  classifier-free guidance batches get it on the conditional and unconditional halves alike).
  Any m_p >= 1 works. Appending copies of C itself leaves the output unchanged up to rounding
  (softmax over duplicated keys), which is why a prompt initialised from the text embeddings
  starts as a no-op.
- `add` ("additive"): K = W_k (C + p), V = W_v (C + p). p must have m_p = m_c (one vector per
  text token, added position by position) or m_p = 1 (one vector added to every token); any
  other m_p is refused with a `TrceError`. p = 0 leaves the output unchanged.

Sites (Table 6): `mid` (the middle block's cross-attention, the paper's default), `mid+up`, or
`all` cross-attention layers. Self-attention layers are never touched. A stack of N joint blocks
(MMDiT) has no bottleneck; its sites are the middle joint block(s) (block (N-1)//2 through N//2: one
for odd N, two for even N), from there to the last block, or every joint block (`trce.families.sd3`).

The processor wraps the layer's own processor object and only rewrites `encoder_hidden_states`
(and pads an attention mask, if any) before delegating, so no diffusers code is copied and any
attention backend keeps working. `injected(...)` installs the wrappers with
`set_attn_processor(dict)` and always puts the *original processor objects* back in `finally`.
With no prompt (`None`) the wrapper passes its arguments through untouched, so the output is
bit-identical to the original model. The model family says which layers the sites are
(`injection_layers`), which wrapper they get (`injection_processor`) and the prompt's width d
(`injection_width`).

Joint attention (MMDiT: SD3, FLUX; `JointPromptInjectionProcessor`). There is no cross-attention:
a joint block's attention runs over one sequence of image rows X (b x n x d) and context rows C
(b x m_c x d, the text stream of that block, normalised and modulated: d is the block's inner
width, not the text encoder's), each stream with its own projections:

    Q = [W_q X; W'_q C],  K = [W_k X; W'_k C],  V = [W_v X; W'_v C],  O = softmax(Q K^T / sqrt(d_h)) V

and O splits back into the image rows (to_out) and the context rows (to_add_out). The prompt
enters as extra context rows, C -> [C; p] (`concat`: K, V and the context queries gain m_p rows),
and the m_p output rows of p are dropped, so the block's residual streams keep their shapes: p is
memory the block reads at that layer and nothing more. `add` is C -> C + p, as in cross-attention
(the context rows are the text, one per token); p = 0 is exactly the original.

What does NOT carry over from cross-attention: appending copies of C is no longer a no-op. Softmax
over n identical keys is one key at logit + log n; in cross-attention every key is text, so k extra
copies of all of C add log(k+1) to every logit and cancel, but here the image keys are not copied,
so every query's weight moves from the image keys to the text keys as if the text logits were
raised by log(k+1). That identity (k copies of C == the text logits + log(k+1)) is what holds and
is what the tests check; a concat prompt is never an exact no-op in joint attention.

Rotary positions (FLUX): the layer also gets `image_rotary_emb` = (cos, sin), each (m_c + n, D),
built from [txt_ids; img_ids] (text first); FLUX's txt_ids are all 0, i.e. the identity rotation
(cos 1, sin 0). The prompt rows get that same identity rotation, inserted after the text rows and
before the image rows, so a prompt row is positioned exactly like a text row. Layers without
rotary embeddings (SD3) need nothing.

The processors themselves are `trce.families.injection`'s (the model family hands them out); this module installs
them (`injected`, `site_layers`) and reads back a KPOP patch's hidden prompt (`hidden_prompt`,
`hidden_prompt_installed`: the prompt that recovers the erased concept, stored in the Edit's extras).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from trce.edit import Edit
from trce.errors import TrceError, choose
from trce.families.injection import MODES, SITES, PromptSlot

log = logging.getLogger(__name__)


def _denoiser(pipe_or_denoiser):
    """(denoiser, family) of a pipeline or of a bare denoiser."""
    from trce.families import denoiser_family, family_of

    if isinstance(pipe_or_denoiser, torch.nn.Module):
        denoiser, family = pipe_or_denoiser, denoiser_family(pipe_or_denoiser)
    else:
        family = family_of(pipe_or_denoiser)
        denoiser = family.denoiser(pipe_or_denoiser)
    if not hasattr(denoiser, "attn_processors") or not hasattr(denoiser, "set_attn_processor"):
        raise TrceError(f"cannot inject a prompt into {type(pipe_or_denoiser).__name__}: it has no attention "
                        "processors")
    return denoiser, family


def site_layers(pipe_or_denoiser, sites: str = "mid") -> list[str]:
    """Names (as in `denoiser.attn_processors`) of the text-reading attention processors at `sites`
    (the model family says which they are)."""
    sites = choose("prompt injection site", sites, SITES)
    denoiser, family = _denoiser(pipe_or_denoiser)
    return family.injection_layers(denoiser, sites)


@contextlib.contextmanager
def injected(pipe_or_denoiser, prompt: torch.Tensor | None, mode: str = "concat", sites: str = "mid",
             ) -> Iterator[PromptSlot]:
    """Run the block with `prompt` injected at the text-reading attention layers of `sites`.

    Yields the `PromptSlot`: setting `slot.prompt` (a tensor or None) changes the injected prompt
    without reinstalling. The original processor objects are restored on exit, even on error.
    """
    unet, family = _denoiser(pipe_or_denoiser)
    slot = PromptSlot(prompt, mode)
    layers = set(site_layers(unet, sites))
    original = dict(unet.attn_processors)
    wrapped = {name: family.injection_processor(proc, slot, name) if name in layers else proc
               for name, proc in original.items()}
    unet.set_attn_processor(wrapped)  # a dict: every other layer keeps its own processor object
    log.debug("prompt injected (%s) at %d attention layers: %s", slot.mode, len(layers), sorted(layers))
    try:
        yield slot
    finally:
        unet.set_attn_processor(dict(original))  # set_attn_processor pops from the dict it gets


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
    from trce.families import family_of

    prompt, injection = hidden_prompt(edit)
    family = family_of(pipe)
    width = family.injection_width(pipe)
    if prompt.ndim != 2 or prompt.shape[-1] != width:
        raise TrceError(f"the hidden prompt has shape {tuple(prompt.shape)}, which does not fit this model's prompt "
                        f"width {width}")
    denoiser = family.denoiser(pipe)
    prompt = prompt.to(device=denoiser.device, dtype=denoiser.dtype)
    with contextlib.ExitStack() as stack:
        if apply:
            stack.enter_context(edit.applied(pipe))
        stack.enter_context(injected(pipe, prompt, injection["mode"], injection["sites"]))
        yield pipe
