"""TRCE stage T (paper Sec. 4.1, Eq. 4-5) and its [KEY] ablation (Table 4, method `trce-key`): a closed-form
edit of every linear layer that carries text into the denoiser (the model family names them: on SD every
cross-attention key and value projection, `attn2.to_k`, `attn2.to_v`).

For each such W, with the erase sums normalised by their count (App. C.1), w weighting the
preservation prior C = Σ e_k e_kᵀ / n_k (see `trce.methods.prior`) and a ridge λ:

    W' = (Σ W e_s e_mᵀ/n_m + w W C + λ W) (Σ e_m e_mᵀ/n_m + w C + λ I)⁻¹            (Eq. 5)

η is the paper's η as the authors' code applies it (`preserve_weight`): their prior is the sum over each COCO
caption's 77 tokens, added as η·(η·Σ)/3e4 (ddgoodgood/TRCE `run_trce_stage1.py` multiplies the cache by
`preserve_scale`, `cfr_utils.closed_form_refinement` again and divides by 3e4, the caption count), so per token of
the mean-normalised C the weight is w = η² · (prior tokens per caption): 77·η² on SD at role `all`. The paper's
Table 3 sweep (η 0.002-0.02) therefore runs unchanged.

Every term of the first factor is W times a matrix that does not depend on the layer, so
W' = W·T with T = B M⁻¹, B = Σ e_s e_mᵀ/n_m + wC + λI and M = Σ e_m e_mᵀ/n_m + wC + λI: one
D x D solve (float64, `torch.linalg.solve`) serves all layers, and each layer costs one product.
B − M = Σ (e_s − e_m) e_mᵀ/n_m has rank ≤ n_m, so T = I + u·vt and with few rows the product is two thin ones
(`LowRank`): on sdxl-arch's 140 projections at D = 2048 and 300 rows, 11.5 s instead of 22.2 s on one CPU core.

e_m / e_s are the malicious / safe embeddings at the spec's token role (`eot` for TRCE, the
paper's choice; `key` for the [KEY] ablation, the keyword tokens; UCE itself is `trce.methods.uce`). The ridge is
relative: λ = ridge · tr(Σ e_m e_mᵀ/n_m + wC) / D, so one default suits text encoders of any scale; the absolute λ
is recorded. The solve itself (shared with the layer-wise variant, `trce.methods.layerwise`) is
`trce.methods.closed_form`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from trce.concepts import ConceptSpec, Pair, as_specs, preservation_prompts_of, spec_record
from trce.edit import Edit, resolve
from trce.errors import TrceError
from trce.families import family_of
from trce.methods.closed_form import (
    apply_transform,
    diagnostics,
    pair_index,
    preserve_weight,
    solve_low_rank,
    solve_transform,
)
from trce.methods.prior import preservation_prior
from trce.registry import Context
from trce.tokens import (
    PRESERVE_ROLES,
    ROLES,
    needs_padding,
    parse_role,
)

log = logging.getLogger(__name__)


MAX_WEIGHT = 1e6  # the largest eta, ridge or pooled_eta a stage T config takes


@dataclass(frozen=True)
class StageTConfig:
    """Stage T's settings (a spec's `settings: {T: ...}`); None takes the spec's own eta / ridge / token_role.
    `eta` is the paper's η (see `preserve_weight`)."""

    eta: float | None = None
    ridge: float | None = None
    token_role: str | None = None
    preserve_role: str = "all"  # a role over the preservation prompts, or "same" (the mapped role minus key)
    batch_size: int = 64
    pooled: bool = True  # also map the pooled text path where the family has one (SDXL); False: the ablation
    # the pooled path's own preservation weight w on its mean-normalised prior (trce's unit: the paper has no pooled
    # path; None: the token path's w). On a DiT the pooled vector modulates every block, so its edit moves the other
    # concepts more than the token edit does and wants a larger weight
    pooled_eta: float | None = None
    # the layer-wise variant (joint-attention families, trce.methods.layerwise): each joint block's text keys and
    # values mapped on the text stream's own states, instead of the context embedder
    layerwise: bool = False
    layer_points: int = 4  # (z_t, t) points per prompt the stream states are read at
    # hardening (trce.methods.robust): rounds of adversaries found against the edited model, then a re-solve
    robust: int = 0  # R rounds (0: plain stage T)
    robust_attack: str = "closed-form+soft"  # closed-form (RECE's), soft (white-box soft prompts) or both
    robust_reg: float = 0.1  # RECE's λ, relative to tr(Tᵀ G T) / D
    robust_prompts: int = 16  # spec prompts attacked per round (soft)
    robust_tokens: int = 5  # soft vectors before the prompt
    robust_steps: int = 30  # Adam steps per soft prompt
    robust_samples: int = 4  # noisy latents in the denoising objective
    robust_lr: float = 0.01
    robust_reference_steps: int = 20  # sampling steps of the original model's reference images
    robust_guidance: float = 7.5

    def __post_init__(self) -> None:
        for name in ("eta", "ridge", "pooled_eta"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise TrceError(f"{name} must be a number >= 0, got {value!r}", field=name)
            if value is not None and value > MAX_WEIGHT:  # η² times the tokens would overflow the solve
                raise TrceError(f"{name} must be at most {MAX_WEIGHT:g}, got {value!r}: it weights the preserved "
                                "rows (η² per token) against the erased ones, and far below that bound the "
                                "preservation term alone decides the solve", field=name)
        if self.token_role is not None:
            parse_role(self.token_role, ROLES)
        if self.preserve_role != "same":
            parse_role(self.preserve_role, PRESERVE_ROLES)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise TrceError(f"stage T batch_size must be a positive integer, got {self.batch_size!r}")
        from trce.methods.robust import ADVERSARIES

        if not isinstance(self.layerwise, bool):
            raise TrceError(f"layerwise must be true or false, got {self.layerwise!r}", field="layerwise")
        if isinstance(self.layer_points, bool) or not isinstance(self.layer_points, int) or self.layer_points < 1:
            raise TrceError(f"layer_points must be an integer >= 1, got {self.layer_points!r}", field="layer_points")
        if self.layerwise and self.robust:
            raise TrceError("layerwise stage T cannot be hardened (robust > 0): the rounds re-solve the context "
                            "embedder's map", field="layerwise")
        for name in ("robust", "robust_prompts", "robust_tokens", "robust_steps", "robust_samples",
                     "robust_reference_steps"):
            value = getattr(self, name)
            low = 0 if name == "robust" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise TrceError(f"{name} must be an integer >= {low}, got {value!r}", field=name)
        for name in ("robust_reg", "robust_lr", "robust_guidance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise TrceError(f"{name} must be a number > 0, got {value!r}", field=name)
        if self.robust_attack not in ADVERSARIES:
            import difflib

            close = difflib.get_close_matches(str(self.robust_attack), ADVERSARIES, n=1)
            raise TrceError(f"unknown robust_attack {self.robust_attack!r}"
                            + (f" (did you mean {close[0]!r}?)" if close else "")
                            + f"; choose from {', '.join(ADVERSARIES)}", field="robust_attack")


def run_trce(pipe, specs: Sequence[ConceptSpec], config: StageTConfig, context: Context) -> Edit:
    """TRCE stage T (the registry's stage function): the Edit that maps the specs' malicious embeddings onto the
    safe ones, all specs by one solve."""
    return _erase(pipe, specs, config, "trce", context)


def run_trce_key(pipe, specs: Sequence[ConceptSpec], config: StageTConfig, context: Context) -> Edit:
    """TRCE's [KEY] ablation (paper Table 4; method `trce-key`): the same solve on the expression's own tokens (token
    role `key`), with TRCE's prior and ridge. Not UCE: `trce.methods.uce` is UCE as its authors compute it. Hardened
    with `robust=3, robust_attack=closed-form` it is what trce called RECE before (keyword rows, relative λ)."""
    if config.token_role not in (None, "key"):
        raise TrceError(f"the [KEY] ablation (trce-key) maps the keyword tokens (token role 'key'), not "
                        f"{config.token_role!r}; use method trce for other token roles")
    return _erase(pipe, specs, replace(config, token_role="key"), "trce-key", context)


def erase(pipe, spec: ConceptSpec | Sequence[ConceptSpec], config: StageTConfig | None = None,
          context: Context | None = None) -> Edit:
    """TRCE stage T on one spec or several (see `run_trce`)."""
    return run_trce(pipe, as_specs(spec), config or StageTConfig(), context or Context())


def erase_trce_key(pipe, spec: ConceptSpec | Sequence[ConceptSpec], config: StageTConfig | None = None,
                   context: Context | None = None) -> Edit:
    """TRCE's [KEY] ablation on one spec or several (see `run_trce_key`)."""
    return run_trce_key(pipe, as_specs(spec), config or StageTConfig(), context or Context())


# --------------------------------------------------------------------------- the solve
def projection_paths(pipe) -> list[str]:
    """Exact paths of every linear layer that carries per-token text into the denoiser (SD: every
    `attn2.to_k/to_v`)."""
    return family_of(pipe).text_projections(pipe)


def pooled_pair_embeddings(pipe, pairs: Sequence[Pair], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(e_m, e_s): the pooled text vectors (n_pairs, P) of the malicious and the safe prompts, float64."""
    fam = family_of(pipe)
    prompts = list(dict.fromkeys([p.malicious for p in pairs] + [p.safe for p in pairs]))
    vecs = torch.cat([fam.pooled_states(pipe, prompts[s:s + batch_size]).cpu().double()
                      for s in range(0, len(prompts), batch_size)])  # (N, P)
    index = {p: i for i, p in enumerate(prompts)}
    em = vecs[[index[p.malicious] for p in pairs]]
    es = vecs[[index[p.safe] for p in pairs]]
    return em, es


# --------------------------------------------------------------------------- embeddings of the pairs
def pair_embeddings(pipe, pairs: Sequence[Pair], role: str, batch_size: int = 64, progress: bool = True,
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(e_m, e_s, dropped): aligned (n, D) float64 embeddings at `role` (see trce.tokens).

    `dropped` counts pairs that gave no position (an expression cut off by truncation, for `key`).
    """
    em, es, dropped, _ = pair_rows(pipe, pairs, role, batch_size, progress)
    return em, es, dropped


def pair_rows(pipe, pairs: Sequence[Pair], role: str, batch_size: int = 64, progress: bool = True,
              ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """`pair_embeddings` and (n,) the index of the pair each row came from."""
    em, es, dropped, row_pair, _ = _pair_rows(pipe, pairs, role, batch_size, progress, pooled=False)
    return em, es, dropped, row_pair


def _pair_rows(pipe, pairs: Sequence[Pair], role: str, batch_size: int, progress: bool, pooled: bool):
    """`pair_rows`, and with `pooled` also `pooled_pair_embeddings` from the same encoder passes (on sdxl-arch
    encoding the pairs a second time for the pooled path took 70 of stage T's 177 s): (em, es, dropped, row_pair,
    (pm, ps) or None)."""
    parts = parse_role(role, ROLES)
    fam = family_of(pipe)
    tok, width = fam.tokenizer(pipe), fam.text_width(pipe)
    if not pairs:
        empty = torch.zeros(0, width, dtype=torch.float64)
        return empty, empty.clone(), 0, torch.zeros(0, dtype=torch.long), None
    prompts = list(dict.fromkeys([p.malicious for p in pairs] + [p.safe for p in pairs]))
    index = {p: i for i, p in enumerate(prompts)}
    cut = not needs_padding(parts)
    h = None  # (N, L, D); unread padding stays 0
    id_rows, pooled_rows = [], []
    for s in tqdm(range(0, len(prompts), batch_size), desc="encode pairs", disable=not progress, mininterval=1):
        batch = prompts[s : s + batch_size]
        if pooled:
            batch_ids, out, vec = fam.token_and_pooled_states(pipe, batch, cut)  # + (B, P)
            pooled_rows.append(vec.cpu().double())
        else:
            batch_ids, out = fam.token_states(pipe, batch, cut)  # (B, L), (B, L', D), L' <= L
        out = out.cpu()
        if h is None:
            h = torch.zeros(len(prompts), batch_ids.shape[1], width, dtype=out.dtype)
        h[s : s + out.shape[0], : out.shape[1]] = out
        id_rows.append(batch_ids)
    ids = torch.cat(id_rows)  # (N, L)
    rows_m, rows_s, row_pair, dropped = pair_index(tok, pairs, ids, index, parts)
    if dropped:
        log.warning("stage T: %d of %d pairs have no %s tokens (cut off by truncation) and were skipped",
                    dropped, len(pairs), role)
    pooled_pairs = None
    if pooled:
        vecs = torch.cat(pooled_rows)  # (N, P), one per distinct prompt
        pooled_pairs = (vecs[[index[p.malicious] for p in pairs]], vecs[[index[p.safe] for p in pairs]])
    if not rows_m:
        empty = torch.zeros(0, width, dtype=torch.float64)
        return empty, empty.clone(), dropped, torch.zeros(0, dtype=torch.long), pooled_pairs
    im_t, pm_t = torch.tensor(rows_m).T
    is_t, ps_t = torch.tensor(rows_s).T
    em = h[im_t, pm_t].double()  # (n, D)
    es = h[is_t, ps_t].double()  # (n, D)
    if not (torch.isfinite(em).all() and torch.isfinite(es).all()):
        raise TrceError("the text encoder produced NaN/inf embeddings for the concept prompts (try --dtype fp32)")
    return em, es, dropped, torch.tensor(row_pair, dtype=torch.long), pooled_pairs


# --------------------------------------------------------------------------- the method
def _setting(specs: Sequence[ConceptSpec], config: StageTConfig, name: str):
    value = getattr(config, name)
    if value is not None:
        return value
    values = list(dict.fromkeys(getattr(s, name) for s in specs))
    if len(values) > 1:
        names = ", ".join(s.name for s in specs)
        raise TrceError(f"concepts {names} disagree on {name} ({', '.join(map(str, values))}); "
                        f"set it for all of them with --{name.replace('_', '-')}")
    return values[0]


def _preserve_role(config: StageTConfig, token_role: str) -> str:
    if config.preserve_role != "same":
        return "+".join(parse_role(config.preserve_role, PRESERVE_ROLES))
    parts = [p for p in parse_role(token_role, ROLES) if p != "key"]
    return "+".join(parts) if parts else "all"


def _erase(pipe, specs: Sequence[ConceptSpec], config: StageTConfig, method: str, context: Context) -> Edit:
    from trce.edit import fingerprint

    t0 = time.perf_counter()
    specs = as_specs(specs)
    if not specs:
        raise TrceError("no concept to erase")
    base = fingerprint(pipe)  # before any edit: the patch's base model
    eta, ridge = float(_setting(specs, config, "eta")), float(_setting(specs, config, "ridge"))
    role = "+".join(parse_role(_setting(specs, config, "token_role"), ROLES))
    preserve_role = _preserve_role(config, role)

    pairs = [p for s in specs for p in s.pairs()]
    prompts = preservation_prompts_of(specs, context.data_dir)
    inputs = [inp for inp in family_of(pipe).text_inputs(pipe) if config.pooled or inp.name != "pooled"]
    with_pooled = any(inp.name == "pooled" for inp in inputs)
    if config.layerwise:  # a family without a text stream is refused before any encoding
        from trce.methods.layerwise import stream_inputs

        stream_inputs(pipe)
    t1 = time.perf_counter()
    em, es, dropped, row_pair, pooled_pairs = _pair_rows(pipe, pairs, role, config.batch_size, context.progress,
                                                         pooled=with_pooled)
    t2 = time.perf_counter()
    if em.shape[0] == 0:
        log.warning("stage T: %s has no embeddings to map; the edit changes nothing", "+".join(s.name for s in specs))
    solved, factors = {}, {}
    prior = diag = weight = None  # the layer-wise variant leaves the token input's layer as it is: no prior, no solve
    if not config.layerwise:
        prior = preservation_prior(pipe, prompts, preserve_role, base["id"], context.cache_dir, context.use_cache,
                                   config.batch_size, context.progress)
        weight = preserve_weight(eta, prior.count, prior.prompts)
        t, diag = solve_transform(em, es, prior.cov, weight, ridge)
    t3 = time.perf_counter()
    token_input = next(inp for inp in inputs if inp.name == "tokens")
    robust_info = None
    if config.robust and em.shape[0]:
        from trce.methods.robust import harden

        def token_edit(tt: torch.Tensor) -> Edit:
            return Edit(weights={p: apply_transform(resolve(pipe, p), tt, token_input.columns)
                                 for p in token_input.paths}, method=method)

        t, robust_info = harden(pipe, pairs=pairs, em=em, es=es, row_pair=row_pair, cov=prior.cov, t=t,
                                solve=lambda a, b: solve_transform(a, b, prior.cov, weight, ridge), make_edit=token_edit,
                                config=config, paths=token_input.paths, seed=context.seed, progress=context.progress)
        diag = diag | diagnostics(t, em, es, prior.cov)  # the hardened T on the spec's own rows
    if not config.layerwise:
        solved["tokens"] = t
        # the layer products through T's low-rank factors (the hardened T is no longer I + rank n: dense)
        factors["tokens"] = None if robust_info is not None else solve_low_rank(em, es, prior.cov, weight, ridge)
    pooled_info = None
    if with_pooled:
        # the pooled path (SDXL's pooled CLIP embedding): the same closed form on one vector per prompt
        pm, ps = pooled_pairs
        pprior = preservation_prior(pipe, prompts, "all", base["id"], context.cache_dir, context.use_cache,
                                    config.batch_size, context.progress, text_input="pooled")
        peta = weight if config.pooled_eta is None else float(config.pooled_eta)
        solved["pooled"], pdiag = solve_transform(pm, ps, pprior.cov, peta, ridge)
        factors["pooled"] = solve_low_rank(pm, ps, pprior.cov, peta, ridge)
        pooled_info = {"embeddings": int(pm.shape[0]), "preserve_weight": peta, "prior_cache": pprior.key, "prior_cached": pprior.cached,
                       **{k: pdiag[k] for k in ("condition", "erase_residual", "preserve_drift", "lambda")}}
    layer_info = None
    if config.layerwise:
        from trce.methods.layerwise import solve_layerwise

        stream, per_block, stream_dropped = solve_layerwise(
            pipe, pairs, prompts, parse_role(role, ROLES), parse_role(preserve_role, PRESERVE_ROLES), eta, ridge,
            config.layer_points, context.seed, config.batch_size, context.progress)
        inputs = [inp for inp in inputs if inp.name != "tokens"] + stream  # the blocks in place of the entry
        for name, (tt, low, _, _) in per_block.items():
            solved[name], factors[name] = tt, low
        layer_info = {"points": config.layer_points, "blocks": len(stream), "pairs_dropped": stream_dropped,
                      **{name: {"embeddings": n, **{k: d[k] for k in ("condition", "erase_residual", "preserve_drift")}}
                         for name, (_, _, d, n) in per_block.items()}}
    weights = {}
    layers = [(path, inp) for inp in inputs for path in inp.paths]
    for path, inp in tqdm(layers, desc=f"{method} stage T", unit="layer", disable=not context.progress):
        weights[path] = apply_transform(resolve(pipe, path), solved[inp.name], inp.columns, factors[inp.name])
    t4 = time.perf_counter()

    record = spec_record(specs)
    settings = {
        "stage": "T", "eta": eta, "preserve_weight": weight, "ridge": ridge,
        "lambda": None if diag is None else diag["lambda"], "token_role": role,
        "preserve_role": preserve_role, "key_alignment": "last target token", "dtype": "float64",
    }
    if config.layerwise:
        settings["layerwise"] = {"points": config.layer_points}
    if config.robust:
        settings["robust"] = {k: getattr(config, k) for k in (
            "robust", "robust_attack", "robust_reg", "robust_prompts", "robust_tokens", "robust_steps",
            "robust_samples", "robust_lr", "robust_reference_steps", "robust_guidance")}
    info = {
        "pairs": len(pairs), "pairs_dropped": dropped, "embeddings": int(em.shape[0]),
        "preserve_prompts": len(prompts), "tensors": len(weights),
        # the token input's solve (the layer-wise variant's per-block solves are under "layerwise")
        **({} if prior is None else {
            "preserve_embeddings": prior.count, "prior_cache": prior.key, "prior_cached": prior.cached,
            "condition": diag["condition"], "erase_residual": diag["erase_residual"],
            "preserve_drift": diag["preserve_drift"]}),
        **({"pooled": pooled_info} if pooled_info is not None else {}),
        **({"layerwise": layer_info} if layer_info is not None else {}),
        **({"robust": robust_info} if robust_info is not None else {}),
        "seconds": {"prompts": t1 - t0, "encode": t2 - t1, "prior": t3 - t2, "solve": t4 - t3,
                    "total": time.perf_counter() - t0},
    }
    log.info("%s stage T: %s, %d pairs -> %d embeddings at %s, %d preservation prompts (prior %s), "
             "%d tensors in %.2f s", method, record["name"], len(pairs), em.shape[0], role, len(prompts),
             "layer-wise" if prior is None else "cached" if prior.cached else "computed", len(weights),
             info["seconds"]["total"])
    return Edit(weights=weights, method=method, spec=record, settings=settings, base=base, info=info)
