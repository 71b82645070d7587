"""The preservation prior of Eq. 4-5: C = Σ_j e_j e_jᵀ / n over the preservation embeddings.

The paper (following MACE) accumulates it over *all* token positions of COCO captions; the
matching Σ W e eᵀ / n is W·C, so only C (D x D, float64) is stored. It depends only on the text
encoder, the prompts and the token role, so it is computed once and cached on disk as
safetensors, keyed by the model's fingerprint id, a hash of the prompt list, the role and the
context length, in `$TRCE_CACHE` (default `~/.cache/trce`) under `priors/`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trce.errors import TrceError
from trce.families import family_of
from trce.tokens import PRESERVE_ROLES, needs_padding, parse_role, role_positions
from trce.utils import cachefile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prior:
    cov: torch.Tensor  # (D, D) float64, Σ e eᵀ / count (zeros when count == 0)
    count: int  # number of token embeddings summed
    prompts: int
    role: str
    key: str
    cached: bool  # read from the disk cache rather than computed
    seconds: float


def cache_dir(explicit: str | Path | None = None) -> Path:
    """Where priors are cached: `explicit`, else $TRCE_CACHE, else ~/.cache/trce."""
    if explicit is not None:
        return Path(explicit).expanduser()
    return Path(os.environ.get("TRCE_CACHE") or Path.home() / ".cache" / "trce").expanduser()


def prior_record(fingerprint_id: str, prompts: Sequence[str], role: str, max_length: int) -> dict:
    """Everything the prior depends on (stored in its cache file and checked on reading)."""
    digest = hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()
    return {"model": fingerprint_id, "prompts": digest, "role": role, "max_length": max_length}


def prior_key(fingerprint_id: str, prompts: Sequence[str], role: str, max_length: int) -> str:
    raw = json.dumps(prior_record(fingerprint_id, prompts, role, max_length))
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def preservation_prior(
    pipe,
    prompts: Sequence[str],
    role: str = "all",
    fingerprint_id: str | None = None,
    cache: str | Path | None = None,
    use_cache: bool = True,
    batch_size: int = 64,
    progress: bool = True,
    text_input: str = "tokens",
) -> Prior:
    """C over every `role` position of `prompts` (of the family's per-token states; with text_input "pooled",
    over the prompts' pooled vectors, one each, and `role` is not used), from the disk cache when it holds it."""
    t0 = time.perf_counter()
    pooled = text_input == "pooled"
    parts = ("pooled",) if pooled else parse_role(role, PRESERVE_ROLES)
    fam = family_of(pipe)
    width = fam.pooled_states(pipe, [""]).shape[-1] if pooled else fam.text_width(pipe)
    if not prompts:
        return Prior(torch.zeros(width, width, dtype=torch.float64), 0, 0, role, "", False, 0.0)
    if fingerprint_id is None:
        from trce.edit import fingerprint

        fingerprint_id = fingerprint(pipe)["id"]
    tok = fam.tokenizer(pipe)
    record = prior_record(fingerprint_id, prompts, "+".join(parts), tok.model_max_length)
    key = prior_key(fingerprint_id, prompts, "+".join(parts), tok.model_max_length)
    path = cache_dir(cache) / "priors" / f"{key}.safetensors"
    stored = cachefile.load(path, record, "preservation prior") if use_cache else None
    if stored is not None and "cov" in stored and tuple(stored["cov"].shape) == (width, width):
        log.info("preservation prior: cache hit %s", path)
        return Prior(stored["cov"], int(stored["count"].item()), len(prompts), role, key, True,
                     time.perf_counter() - t0)

    cov = torch.zeros(width, width, dtype=torch.float64)
    count = 0
    cut = not pooled and not needs_padding(parts)  # eot/sot only: skip the padding columns
    bar = tqdm(total=len(prompts), desc="preservation prior", unit="prompt", disable=not progress, mininterval=1)
    try:
        for s in range(0, len(prompts), batch_size):
            batch = prompts[s : s + batch_size]
            if pooled:
                e = fam.pooled_states(pipe, batch).to("cpu", torch.float64)  # (B, P)
            else:
                ids, hidden = fam.token_states(pipe, batch, cut)  # (B, L), (B, L', D)
                hidden = hidden.to("cpu", torch.float64)
                rows = [hidden[i, role_positions(tok, ids[i], parts)] for i in range(len(ids))]
                e = torch.cat(rows)  # (n, D)
            if not torch.isfinite(e).all():
                raise TrceError("the text encoder produced NaN/inf embeddings for the preservation prompts "
                                "(try --dtype fp32)")
            cov += e.T @ e
            count += e.shape[0]
            bar.update(len(batch))
    finally:
        bar.close()
    cov /= count
    if use_cache:
        cachefile.save(path, {"cov": cov, "count": torch.tensor([count], dtype=torch.int64)}, record,
                       prompts=str(len(prompts)))
        log.info("preservation prior: %d prompts, %d embeddings, cached in %s", len(prompts), count, path)
    return Prior(cov, count, len(prompts), role, key, False, time.perf_counter() - t0)
