"""Eq. 5 in closed form, shared by TRCE stage T (`trce.methods.stage_t`: the text encoder's rows, every projection
that reads them) and its layer-wise variant (`trce.methods.layerwise`: each joint block's text stream): which rows
the pairs map (`pair_index`), the solve T with W' = W·T (`solve_transform`; the paper's η as `preserve_weight`),
its low-rank factors (`solve_low_rank`, `LowRank`), embedding-space `diagnostics`, and W' itself
(`apply_transform`). The equations are in `trce.methods.stage_t`'s module doc.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trce.concepts import Pair
from trce.errors import TrceError
from trce.tokens import pair_positions, token_span

log = logging.getLogger(__name__)


def _system(em: torch.Tensor, es: torch.Tensor, cov: torch.Tensor, eta: float, ridge: float,
            ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(M, B, λ) of Eq. 5 with W' = W B M⁻¹: M = Σ e_m e_mᵀ/n + η C + λI, B = Σ e_s e_mᵀ/n + η C + λI, float64."""
    width = cov.shape[0]
    eye = torch.eye(width, dtype=torch.float64)
    n = em.shape[0]
    mm = em.T @ em / n  # (D, D) Σ e_m e_mᵀ / n_m
    sm = es.T @ em / n  # (D, D) Σ e_s e_mᵀ / n_m
    a = mm + eta * cov
    lam = ridge * float(torch.trace(a)) / width
    return a + lam * eye, sm + eta * cov + lam * eye, lam


def preserve_weight(eta: float, tokens: int, captions: int) -> float:
    """w of Eq. 5 from the paper's η, as the authors' code applies it (module doc): η² times the prior's tokens per
    caption (`tokens` summed over `captions`); 0 without a prior."""
    return float(eta) ** 2 * tokens / captions if captions else 0.0


def solve_transform(em: torch.Tensor, es: torch.Tensor, cov: torch.Tensor, eta: float, ridge: float,
                    ) -> tuple[torch.Tensor, dict]:
    """T (D x D, float64) with W' = W·T for every projection W (Eq. 5), and diagnostics.

    em, es: (n, D) malicious / safe embeddings (row i of one maps to row i of the other);
    cov: (D, D) preservation prior Σ e eᵀ / n_k.
    """
    width = cov.shape[0]
    eye = torch.eye(width, dtype=torch.float64)
    n = em.shape[0]
    if n == 0:
        # Nothing to map: the minimiser of η Σ||W'e - We||² + λ||W' - W||² is W itself.
        return eye, {"lambda": 0.0, "condition": 1.0, "erase_residual": 0.0, "preserve_drift": 0.0}
    em, es, cov = em.double(), es.double(), cov.double()
    m, b, lam = _system(em, es, cov, eta, ridge)
    try:
        # W' = W B M⁻¹ and M is symmetric, so (B M⁻¹)ᵀ = M⁻¹ Bᵀ = solve(M, Bᵀ).
        t = torch.linalg.solve(m, b.T).T
    except torch.linalg.LinAlgError as exc:
        raise TrceError("the stage-T system is singular (too few embeddings and no preservation prior); "
                        "set --ridge above 0 or add preservation prompts") from exc
    if not torch.isfinite(t).all():
        raise TrceError("the stage-T solve produced NaN/inf; set a larger --ridge")
    eig = torch.linalg.eigvalsh(m)
    condition = float(eig[-1] / eig[0]) if eig[0] > 0 else float("inf")
    if condition > 1e12:
        log.warning("stage T: the system is ill-conditioned (condition number %.1e); consider a larger --ridge",
                    condition)
    return t, {"lambda": lam, "condition": condition, **diagnostics(t, em, es, cov)}


@dataclass(frozen=True)
class LowRank:
    """T = I + u·vt. B − M = Σ (e_s − e_m) e_mᵀ / n (the η C and λI terms cancel), so
    T − I = (B − M) M⁻¹ = [(E_s − E_m)ᵀ / n]·[E_m M⁻¹] has rank ≤ n: with n rows ≪ D, W' = W + (W u) vt costs
    out·D·n per layer instead of out·D² (sdxl-arch, 140 projections, D = 2048, n = 300: 22.2 s → 11.5 s, one core)."""

    u: torch.Tensor  # (D, n)
    vt: torch.Tensor  # (n, D)


def solve_low_rank(em: torch.Tensor, es: torch.Tensor, cov: torch.Tensor, eta: float, ridge: float,
                   ) -> LowRank | None:
    """The factors of `solve_transform`'s T when they are cheaper than T itself (n < D/2), else None."""
    n, width = em.shape[0], cov.shape[0]
    if n == 0 or 2 * n >= width:
        return None
    em, es, cov = em.double(), es.double(), cov.double()
    m, _, _ = _system(em, es, cov, eta, ridge)
    vt = torch.linalg.solve(m, em.T).T  # (n, D) = E_m M⁻¹ (M symmetric)
    return LowRank(u=(es - em).T / n, vt=vt)


def diagnostics(t: torch.Tensor, em: torch.Tensor, es: torch.Tensor, cov: torch.Tensor) -> dict[str, float]:
    """Embedding-space diagnostics of W' = W T (layer independent): how much of the malicious -> safe gap the edit
    closes (erase_residual, 0 = exact), and the mean squared relative change of the preserved embeddings."""
    em, es, cov = em.double(), es.double(), cov.double()
    gap = torch.linalg.norm(em - es)
    residual = float(torch.linalg.norm(em @ t.T - es) / gap) if gap > 0 else 0.0
    d = t - torch.eye(t.shape[0], dtype=t.dtype)
    drift = float(torch.trace(d @ cov @ d.T) / torch.trace(cov)) if torch.trace(cov) > 0 else 0.0
    return {"erase_residual": residual, "preserve_drift": drift}


def apply_transform(weight: torch.Tensor, t: torch.Tensor, columns: tuple[int, int] | None = None,
                    low_rank: LowRank | None = None) -> torch.Tensor:
    """W' = W·T in float64 on W's device (CPU for devices without float64), cast back; returned on CPU.

    With `columns` (start, stop) only those input columns are transformed: W'[:, a:b] = W[:, a:b]·T (the pooled
    text columns of a layer that also reads other inputs). With `low_rank` (T's factors) W' = W + (W u) vt."""
    device = weight.device if weight.device.type in ("cpu", "cuda") else torch.device("cpu")
    w = weight.detach().to(device, torch.float64)  # (out, D)

    def times_t(x: torch.Tensor) -> torch.Tensor:  # (out, D) -> (out, D)
        if low_rank is None:
            return x @ t.to(device)
        return x + (x @ low_rank.u.to(device)) @ low_rank.vt.to(device)  # (out, n) @ (n, D)

    if columns is None:
        new = times_t(w)  # (out, D)
    else:
        a, b = columns
        new = w.clone()
        new[:, a:b] = times_t(w[:, a:b])  # (out, b - a)
    if not torch.isfinite(new).all():
        raise TrceError("the stage-T edit produced NaN/inf weights; set a larger --ridge")
    return new.to(weight.dtype).cpu()


def pair_index(tok, pairs: Sequence[Pair], ids: torch.Tensor, index: dict[str, int], parts: Sequence[str],
               ) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[int], int]:
    """Which rows the pairs map: (rows_m, rows_s, row_pair, dropped), rows as (prompt index, position) aligned
    malicious -> safe, `ids` (N, L) the token ids of the prompts numbered by `index`."""
    rows_m: list[tuple[int, int]] = []
    rows_s: list[tuple[int, int]] = []
    row_pair: list[int] = []
    dropped = 0
    for i, pair in enumerate(pairs):
        im, is_ = index[pair.malicious], index[pair.safe]
        m_span = s_span = None
        if "key" in parts:
            m_span = token_span(tok, pair.malicious, pair.m_span, ids[im])
            s_span = token_span(tok, pair.safe, pair.s_span, ids[is_])
        positions = pair_positions(tok, ids[im], ids[is_], parts, m_span, s_span)
        if not positions:
            dropped += 1
            continue
        rows_m.extend((im, p) for p, _ in positions)
        rows_s.extend((is_, q) for _, q in positions)
        row_pair.extend([i] * len(positions))
    return rows_m, rows_s, row_pair, dropped
