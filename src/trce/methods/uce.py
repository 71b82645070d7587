"""UCE (Gandikota et al., WACV 2024) as its authors' code computes it, and RECE (Gong et al., ECCV 2024) on top of it.

References, read at these commits (`docs/fidelity.md` has the side-by-side table):

- UCE: rohitgandikota/unified-concept-editing @ 35e91e28df2f2fbcbef105fa079a436641a5142b, `train-scripts/train_erase.py`
  (`edit_model`, :172-315, called at :442). RECE's own copy (`erase_methods/train_uce.py`) has the same `edit_model`.
- RECE: CharlesGong12/RECE @ 403a67fd86dce6c124b88798340e001e625b28c9, `train.py`, `erase_methods/uce.py`
  (`edit_model_adversarial`), `utils/embedding_calculation/close_form_emb.py` (`close_form_emb_regzero`) and
  `scripts/nudity.sh` (the recipe of the paper's nudity numbers).

UCE edits every layer W that reads the text states (on SD every cross-attention `to_v` and, with `with_to_k`, `to_k`:
the family's "tokens" text input) in closed form (train_erase.py:234-312):

    mat1 = λ W + s_e Σ_pairs Σ_j (W e_new,j) e_old,jᵀ + s_p Σ_retain Σ_j (W e_r,j) e_r,jᵀ
    mat2 = λ I + s_e Σ_pairs Σ_j e_old,j e_old,jᵀ     + s_p Σ_retain Σ_j e_r,j e_r,jᵀ
    W'   = mat1 · mat2⁻¹

- erase rows (:253-260): the last content token of the old (concept) prompt and every position after it ([EoT] and
  padding), aligned with the new (target) prompt's from its own last content token on: k = (tokens with attention)
  - 2, f = max(k_old, k_new), rows k_old .. L-1-(f-k_old) of old onto k_new .. L-1-(f-k_new) of new (L - f rows);
- retain rows (:289-310): all L positions of '' and of each preserve concept, mapped onto themselves;
- defaults (:324-442): technique 'replace' (target W e_new), erase_scale 1, lamb 0.5, with_to_k True, retain
  [''] + preserve concepts (none unless given, but the 'art' type), preserve_scale max(0.1, 1/len(retain)).

Every term of mat1 is W times a matrix that does not depend on W, so W' = W·T with T = B M⁻¹, B = λI + s_e Σ e_new
e_oldᵀ + s_p Σ e_r e_rᵀ and M = mat2: one D x D float64 solve serves every layer (the reference solves per layer in
float32). On layers with a bias (SD3's context embedder) the bias is left as it is: the least-squares problem is the
same on W (the reference's layers have none).

RECE (train.py:228-260) then runs `robust` rounds ("epochs") on the UCE model, each on top of the previous round:

    e_adv  = (Σ_l W_lᵀ W_l + λ_a I)⁻¹ Σ_l W_lᵀ W0_l e_c     (close_form_emb.py:202-209; W current, W0 original)
    W_l   <- edit_model_adversarial(W_l): the closed form above with e_adv's L positions onto the L positions of
             the target ' ' (train.py:241-247), retain ' ' once per concept, λ = lamb 0.1, s_p 0.1 (nudity.sh)

over all L positions of each concept prompt e_c (the slice to its last tokens is commented out, :197-200), with an
absolute λ_a (regular_scale 0.1 for nudity). With W_l = W0_l·T: Σ W_lᵀW_l = Tᵀ G T and Σ W_lᵀ W0_l = Tᵀ G, G = Σ W0ᵀW0.

trce's choices (docs/fidelity.md): the concept words are the spec's expressions and their targets the spec's
targets (`prompts`, `target`; the spec's prompt pairs are a variant); token
positions come from the tokenizer's ids ([EoT] = the first end-of-text id), the same rows as the attention mask;
the pooled text path (SDXL, SD3, FLUX), which the reference does not have, gets the same closed form on one vector
per prompt (`pooled`); RECE's adversaries act on the token states only, and RECE returns the last round (the
reference keeps the round with the lowest NudeNet rate on its validation prompts, a selection trce cannot make).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from trce.concepts import ConceptSpec, as_specs, preservation_prompts_of, spec_record
from trce.edit import Edit, resolve
from trce.errors import TrceError, choose
from trce.families import family_of
from trce.methods.training import check_numbers
from trce.registry import Context
from trce.tokens import first_eos

log = logging.getLogger(__name__)

KEY_LAYERS = ("to_k", "add_k_proj", "k_proj")  # module names of key projections (`with_to_k=False` leaves them)


def _check_switches(config) -> None:
    for name in ("with_to_k", "pooled"):
        if not isinstance(getattr(config, name), bool):
            raise TrceError(f"{name} must be true or false, got {getattr(config, name)!r}", field=name)


@dataclass(frozen=True)
class UCEConfig:
    """UCE's settings (section `uce`), defaulting to the reference's (train_erase.py at the commit above)."""

    erase_scale: float = 1.0  # --erase_scale default 1 (:329)
    preserve_scale: float | None = None  # None: max(0.1, 1/len(retain)) (:427-428)
    lamb: float = 0.5  # edit_model(..., lamb=0.5) (:442)
    with_to_k: bool = True  # edit_model's default (:172), not overridden at :442
    technique: str = "replace"  # --technique default (:324); 'tensor' is not implemented
    # what a trce spec's preservation prompts become: "none" retains [''] only (the reference's default for every
    # concept type but 'art', :409-422); "spec": [''] + the spec's preservation prompts (as --preserve_concepts)
    preserve: str = "none"
    # the concept prompts: "expressions" = the spec's bare expressions, the reference's --concepts with add_prompts
    # False (:365-388); "pairs" = the spec's malicious prompts (expressions x templates), a variant: with hundreds of
    # prompts the unnormalised erase sums outweigh λ and '' (on ShapeWorld, 719 prompts: other colours 62 %)
    prompts: str = "expressions"
    # their targets: "spec" = the spec's safe texts (as --guided_concepts); "uncond" = ' ' for all (no
    # --guided_concepts, :390-392). An empty target becomes ' ' (:215-216).
    target: str = "spec"
    pooled: bool = True  # the pooled text path (SDXL, SD3, FLUX) mapped by the same closed form (trce's extension)
    batch_size: int = 64

    WHAT: ClassVar[str] = "UCE"

    def __post_init__(self) -> None:
        scales = ("erase_scale", "lamb") + (() if self.preserve_scale is None else ("preserve_scale",))
        check_numbers(self, self.WHAT, integers=("batch_size",), non_negative=scales)
        for name, allowed in (("technique", ("replace",)), ("preserve", ("none", "spec")),
                              ("prompts", ("pairs", "expressions")), ("target", ("spec", "uncond"))):
            choose(f"{self.WHAT} {name}", str(getattr(self, name)), allowed)
        _check_switches(self)


@dataclass(frozen=True)
class RECEConfig(UCEConfig):
    """RECE's settings (section `rece`): the UCE edit it starts from (UCE's defaults: the checkpoint RECE loads,
    `erased-nudity-towards_uncond-preserve_false-sd_1_4-method_replace-1-1.0.pt`, is UCE at erase 1, preserve 1.0,
    lamb 0.5) and its rounds (scripts/nudity.sh)."""

    robust: int = 3  # --epochs 3 (nudity.sh; train.py:43 default 3)
    reg: float = 0.1  # --regular_scale 0.1 (nudity.sh): the adversary's absolute λ (close_form_emb.py:202)
    rece_lamb: float = 0.1  # --lamb 0.1 (nudity.sh, train.py:53)
    rece_erase_scale: float = 1.0  # --erase_scale default 1 (train.py:52)
    rece_preserve_scale: float = 0.1  # --preserve_scale 0.1 (nudity.sh, train.py:50)

    WHAT: ClassVar[str] = "RECE"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_numbers(self, self.WHAT, non_negative_integers=("robust",),
                      non_negative=("reg", "rece_lamb", "rece_erase_scale", "rece_preserve_scale"))


# --------------------------------------------------------------------------- texts and token states
def concept_texts(specs: Sequence[ConceptSpec], config: UCEConfig) -> list[tuple[str, str]]:
    """(old, new) texts: the concept prompts and their targets (see `UCEConfig.prompts` / `target`)."""
    if config.prompts == "pairs":
        items = [(p.malicious, p.safe) for s in specs for p in s.pairs()]
    else:
        items = [(e.text, e.target_for(s.family)) for s in specs for e in s.expressions]
    items = list(dict.fromkeys(items))
    return [(old, " " if config.target == "uncond" or new == "" else new) for old, new in items]


def token_states(pipe, texts: Sequence[str], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (N, L), states (N, L, D) float32 on CPU): every position, padding included, as the layers read them."""
    fam = family_of(pipe)
    ids, states = [], []
    for s in range(0, len(texts), batch_size):
        batch_ids, out = fam.token_states(pipe, list(texts[s:s + batch_size]), False)  # (B, L), (B, L, D)
        ids.append(batch_ids)
        states.append(out.detach().float().cpu())
    h = torch.cat(states)
    if not torch.isfinite(h).all():
        raise TrceError("the text encoder produced NaN/inf embeddings (try --dtype fp32)")
    return torch.cat(ids), h


def last_content(tok, ids: torch.Tensor) -> torch.Tensor:
    """(N,) the last content token of each row: the position before the first [EoT] (train_erase.py:253, attention-mask
    sum - 2; a tokenizer without a start token puts an empty prompt's [EoT] at 0, which is then the row)."""
    return (first_eos(ids, tok.eos_token_id) - 1).clamp(min=0)


def aligned_rows(ids_old: torch.Tensor, ids_new: torch.Tensor, h_old: torch.Tensor, h_new: torch.Tensor, tok,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """UCE's erase rows (train_erase.py:253-260): (rows_old, rows_new), each (Σ_i (L - f_i), D) float64, with
    f = max(k_old, k_new): old positions k_old + j onto new positions k_new + j, j < L - f."""
    k_old, k_new = last_content(tok, ids_old), last_content(tok, ids_new)  # (N,)
    length = h_old.shape[1]
    olds, news = [], []
    for i in range(h_old.shape[0]):
        ko, kn = int(k_old[i]), int(k_new[i])
        n = length - max(ko, kn)
        olds.append(h_old[i, ko:ko + n])  # (n, D)
        news.append(h_new[i, kn:kn + n])  # (n, D)
    return torch.cat(olds).double(), torch.cat(news).double()


# --------------------------------------------------------------------------- the closed form
def retain_gram(pipe, texts: Sequence[str], batch_size: int) -> torch.Tensor:
    """(D, D) float64 Σ e_r e_rᵀ over every position of every retain text (train_erase.py:289-310), by batches."""
    gram = None
    for s in range(0, len(texts), batch_size):
        _, h = token_states(pipe, texts[s:s + batch_size], batch_size)  # (B, L, D)
        rows = h.reshape(-1, h.shape[-1]).double()  # (B·L, D)
        gram = rows.T @ rows if gram is None else gram + rows.T @ rows
    return gram


def closed_form(old: torch.Tensor, new: torch.Tensor, c: torch.Tensor, lamb: float, erase_scale: float,
                preserve_scale: float) -> torch.Tensor:
    """T (D x D, float64) with W' = W·T = mat1 · mat2⁻¹ (train_erase.py:234-312).

    old, new: (n, D) aligned erase rows; c: (D, D) Σ e_r e_rᵀ of the retain rows (each its own target)."""
    width = old.shape[1]
    eye = torch.eye(width, dtype=torch.float64)
    old, new, c = old.double(), new.double(), c.double()
    b = lamb * eye + erase_scale * (new.T @ old) + preserve_scale * c  # (D, D): mat1 = W·b
    m = lamb * eye + erase_scale * (old.T @ old) + preserve_scale * c  # (D, D): mat2, symmetric
    try:
        t = torch.linalg.solve(m, b.T).T  # b m⁻¹ = (m⁻¹ bᵀ)ᵀ
    except torch.linalg.LinAlgError as exc:
        raise TrceError("the UCE system is singular; set lamb above 0") from exc
    if not torch.isfinite(t).all():
        raise TrceError("the UCE solve produced NaN/inf; set a larger lamb")
    return t


def adversaries(gram: torch.Tensor, t: torch.Tensor, states: torch.Tensor, reg: float) -> torch.Tensor:
    """RECE's closed-form adversarial embeddings (close_form_emb.py:202-209) against W = W0·T.

    gram: (D, D) G = Σ_l W0_lᵀ W0_l; states: (N, L, D) concept prompts, every position -> (N, L, D) float64."""
    width = gram.shape[0]
    mat1 = t.T @ gram @ t + reg * torch.eye(width, dtype=torch.float64)  # Σ W_lᵀ W_l + λ I
    mat2 = t.T @ gram  # Σ W_lᵀ W0_l
    coefficient = torch.linalg.solve(mat1, mat2)  # (D, D) mat1⁻¹ mat2
    return states.double() @ coefficient.T  # (N, L, D)


# --------------------------------------------------------------------------- the methods
def _inputs(pipe, config: UCEConfig):
    """(token input with the edited paths, pooled input or None)."""
    inputs = {inp.name: inp for inp in family_of(pipe).text_inputs(pipe)}
    tokens = inputs["tokens"]
    if not config.with_to_k:
        paths = tuple(p for p in tokens.paths if p.rsplit(".", 2)[-2] not in KEY_LAYERS)
        if len(paths) == len(tokens.paths):
            raise TrceError("with_to_k=false leaves the key projections alone, but this model's text layers are not "
                            "split into keys and values", field="with_to_k")
        tokens = type(tokens)(tokens.name, paths, tokens.columns)
    pooled = inputs.get("pooled") if config.pooled else None
    return tokens, pooled


class Solved(NamedTuple):
    """The UCE solve: T of the token input (and of the pooled one, or None), the (old, new) texts, the spec's
    preservation prompts (`keep`, [] without preserve=spec) and the retain texts, a record, and the token states
    (N, L, D) of the old and new texts."""

    t: torch.Tensor
    tp: torch.Tensor | None
    texts: list[tuple[str, str]]
    keep: list[str]
    retain: list[str]
    record: dict
    h_old: torch.Tensor
    h_new: torch.Tensor


def _uce(pipe, specs: Sequence[ConceptSpec], config: UCEConfig, context: Context) -> Solved:
    """The UCE solve (`Solved`)."""
    fam = family_of(pipe)
    tok = fam.tokenizer(pipe)
    texts = concept_texts(specs, config)
    if not texts:
        raise TrceError("no concept prompt to erase")
    olds, news = [o for o, _ in texts], [n for _, n in texts]
    keep = preservation_prompts_of(specs, context.data_dir) if config.preserve == "spec" else []
    retain = ["", *[p for p in keep if p != ""]]  # ret_texts = [''] + preserve concepts (:422)
    scale = max(0.1, 1 / len(retain)) if config.preserve_scale is None else float(config.preserve_scale)
    ids_o, h_o = token_states(pipe, olds, config.batch_size)  # (N, L), (N, L, D)
    ids_n, h_n = token_states(pipe, news, config.batch_size)
    old, new = aligned_rows(ids_o, ids_n, h_o, h_n, tok)  # (n, D) each
    c = retain_gram(pipe, retain, config.batch_size)  # (D, D) every position of each retain text
    t = closed_form(old, new, c, config.lamb, config.erase_scale, scale)
    _, pooled = _inputs(pipe, config)
    tp = None
    if pooled is not None:  # one vector per prompt, the same closed form (the reference has no pooled path)
        pv = [torch.cat([fam.pooled_states(pipe, list(x[s:s + config.batch_size])).detach().double().cpu()
                         for s in range(0, len(x), config.batch_size)]) for x in (olds, news, retain)]  # (N, P) each
        tp = closed_form(pv[0], pv[1], pv[2].T @ pv[2], config.lamb, config.erase_scale, scale)
    record = {"texts": len(texts), "erase_rows": int(old.shape[0]), "retain_texts": len(retain),
              "retain_rows": len(retain) * int(h_o.shape[1]), "preserve_scale": scale}
    return Solved(t, tp, texts, keep, retain, record, h_o, h_n)


def _edit(pipe, specs, config: UCEConfig, t: torch.Tensor, tp: torch.Tensor | None, method: str, settings: dict,
          info: dict, base: dict) -> Edit:
    from trce.methods.closed_form import apply_transform

    tokens, pooled = _inputs(pipe, config)
    weights = {p: apply_transform(resolve(pipe, p), t, tokens.columns) for p in tokens.paths}  # W' = W·T
    if pooled is not None and tp is not None:
        weights.update({p: apply_transform(resolve(pipe, p), tp, pooled.columns) for p in pooled.paths})
    settings = {"erase_scale": config.erase_scale, "lamb": config.lamb, "with_to_k": config.with_to_k,
                "technique": config.technique, "preserve": config.preserve, "prompts": config.prompts,
                "target": config.target, "pooled": pooled is not None, "token_alignment":
                "last content token and every later position (UCE)", "dtype": "float64", **settings}
    return Edit(weights=weights, method=method, spec=spec_record(specs), settings=settings, base=base,
                info={**info, "tensors": len(weights)})


def run_uce(pipe, specs: Sequence[ConceptSpec], config: UCEConfig, context: Context) -> Edit:
    """UCE (the registry's stage function): the Edit of train_erase.py's `edit_model` (module doc)."""
    from trce.edit import fingerprint

    t0 = time.perf_counter()
    specs = as_specs(specs)
    base = fingerprint(pipe)
    solved = _uce(pipe, specs, config, context)
    record = solved.record
    log.info("uce: %d concept prompts, %d erase rows, %d retain texts (scale %.3g)", len(solved.texts),
             record["erase_rows"], len(solved.retain), record["preserve_scale"])
    return _edit(pipe, specs, config, solved.t, solved.tp, "uce",
                 {"stage": "uce", "preserve_scale": record["preserve_scale"]},
                 {**record, "seconds": time.perf_counter() - t0}, base)


def run_rece(pipe, specs: Sequence[ConceptSpec], config: RECEConfig, context: Context) -> Edit:
    """RECE (the registry's stage function): UCE, then `robust` rounds of closed-form adversaries over every position
    of each concept prompt mapped onto every position of ' ' (or its target), each re-solve on top of the last."""
    from trce.edit import fingerprint
    from trce.methods.robust import layer_gram

    t0 = time.perf_counter()
    specs = as_specs(specs)
    base = fingerprint(pipe)
    solved = _uce(pipe, specs, config, context)
    t, texts, keep, record, h_o, h_n = solved.t, solved.texts, solved.keep, solved.record, solved.h_old, solved.h_new
    tokens, _ = _inputs(pipe, config)
    gram = layer_gram(pipe, tokens.paths, tokens.columns)  # (D, D) Σ W0ᵀ W0 over the edited layers
    # retain texts of the rounds (train.py:154-159): ' ' once per concept prompt; with preserve="spec" a seeded sample
    # of as many spec preservation prompts (the reference samples characters of the --preserve_concepts string)
    rounds_retain = ([" "] * len(texts) if not keep else
                     random.Random(context.seed).sample(keep, min(len(texts), len(keep))))
    if keep:
        c = retain_gram(pipe, rounds_retain, config.batch_size)  # (D, D)
    else:  # N copies of ' ': encoded once
        c = len(rounds_retain) * retain_gram(pipe, [" "], config.batch_size)
    rounds = []
    for r in range(config.robust):
        adv = adversaries(gram, t, h_o, config.reg)  # (N, L, D) against the current model W0·t
        step = closed_form(adv.reshape(-1, adv.shape[-1]), h_n.reshape(-1, h_n.shape[-1]).double(), c,
                           config.rece_lamb, config.rece_erase_scale, config.rece_preserve_scale)
        t = t @ step  # W_{r+1} = W_r · T_r = W0 · (t T_r)
        d = adv - h_o.double()
        rounds.append({"round": r + 1, "adversary_shift": float(d.norm() / h_o.double().norm())})
        log.info("rece round %d: %s", r + 1, rounds[-1])
    settings = {"stage": "rece", "preserve_scale": record["preserve_scale"],
                "robust": config.robust, "reg": config.reg, "rece_lamb": config.rece_lamb,
                "rece_erase_scale": config.rece_erase_scale, "rece_preserve_scale": config.rece_preserve_scale,
                "robust_attack": "closed-form (RECE, absolute λ, every position)"}
    info = {**record, "robust": {"rounds": rounds, "attack": "closed-form", "retain_texts": len(rounds_retain)},
            "seconds": time.perf_counter() - t0}
    return _edit(pipe, specs, config, t, solved.tp, "rece", settings, info, base)
