"""TRCE stage V's loss (paper Sec. 4.2, Eq. 8, 9): the triplet hinge that moves the trained model's prediction at the
original model's concept trajectories toward the guidance-enhanced safe target f_safe (Eq. 7) and away from the
unsafe one f_unsafe (Eq. 6), and the preservation MSE against the original's predictions (Eq. 9)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

LOSS_COLUMNS = ("total", "erase", "preserve", "active")  # the parts of `stage_v_loss` that a run records per step


def named_losses(row: Sequence[float]) -> dict[str, float]:
    """A recorded row of `LOSS_COLUMNS` values as a dict."""
    return dict(zip(LOSS_COLUMNS, (float(v) for v in row)))


def repelled_safe(f_safe: torch.Tensor, f_unsafe: torch.Tensor, repel: float) -> torch.Tensor:
    """f_safe + γ (f_safe − f_unsafe): Eq. 7's target moved γ safe–unsafe gaps further from Eq. 6's.

    Why: Eq. 8's hinge is flat once ε̂ is `margin` closer to f_safe than to f_unsafe, so the trained model stops just
    past the bisector of the two. When the safe prompt itself still draws the concept now and then (a colour left
    unnamed that the model often paints red), landing near f_safe keeps that rate; moving the target away from
    f_unsafe moves the bisector, and the hinge then pushes ε̂ out of the concept's side (ESD's negative guidance,
    applied to TRCE's guided safe target).
    """
    return f_safe if not repel else f_safe + repel * (f_safe - f_unsafe)


def triplet_loss(pred: torch.Tensor, f_safe: torch.Tensor, f_unsafe: torch.Tensor, margin: float) -> torch.Tensor:
    """Eq. 8 per sample: max(||ε̂ − f_safe||² − ||ε̂ − f_unsafe||² + margin, 0), shape (B,).

    The squared norms are means over (C, h, w) ("mean-squared norms", as F.mse_loss), so the margin
    does not depend on the latent size.
    """
    d_safe = (pred - f_safe).pow(2).flatten(1).mean(1)  # (B,)
    d_unsafe = (pred - f_unsafe).pow(2).flatten(1).mean(1)  # (B,)
    return torch.relu(d_safe - d_unsafe + margin)


def stage_v_loss(pred_c: torch.Tensor, pred_u: torch.Tensor, pred_p: torch.Tensor, f_safe: torch.Tensor,
                 f_unsafe: torch.Tensor, target_p: torch.Tensor, *, margin: float, lambda_preserve: float,
                 pred_cp: torch.Tensor | None = None, target_cp: torch.Tensor | None = None,
                 pred_adv: torch.Tensor | None = None, target_adv: torch.Tensor | None = None,
                 consistency: float = 0.0) -> dict[str, torch.Tensor]:
    """L = ½(L_erase(ε̂(z,c^m,t)) + L_erase(ε̂(z,∅,t))) + λ·L_preserve.

    pred_c, pred_u: (B, C, h, w) predictions of the trained model at z_t^m with c^m and with ∅;
    pred_p: (B·U, C, h, w) at unconditional points, target_p their Eq. 9 targets. Eq. 8 is applied
    to both predictions and averaged (as the authors' code does); Eq. 9 is a plain MSE.
    pred_cp, target_cp (`cond_preserve`): (B·U, C, h, w) at points of preservation prompts' trajectories under their
    prompts, and the original's conditional predictions there; L_preserve is then the sum of the two MSEs.
    pred_adv, target_adv (`robust_consistency` κ): (A, C, h, w) the predictions of the A <= B samples conditioned on an
    adversary, and the model's own (detached) predictions there for their plain prompts; L_erase then also holds
    κ · Σ_a ||pred_adv − target_adv||² / B (mean-squared norms, averaged over the batch as the hinge is).
    """
    hinge_c = triplet_loss(pred_c, f_safe, f_unsafe, margin)
    hinge_u = triplet_loss(pred_u, f_safe, f_unsafe, margin)
    erase = 0.5 * (hinge_c.mean() + hinge_u.mean())
    if pred_adv is not None and len(pred_adv):
        erase = erase + consistency * (pred_adv - target_adv).pow(2).flatten(1).mean(1).sum() / pred_c.shape[0]
    preserve = (pred_p - target_p).pow(2).mean()
    if pred_cp is not None:
        preserve = preserve + (pred_cp - target_cp).pow(2).mean()
    active = ((hinge_c > 0).float().mean() + (hinge_u > 0).float().mean()) / 2
    return {"total": erase + lambda_preserve * preserve, "erase": erase, "preserve": preserve,
            "active": active.detach()}
