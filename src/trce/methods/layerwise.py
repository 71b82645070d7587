"""Stage T, layer-wise (joint-attention denoisers: SD3, FLUX): Eq. 5 solved once per joint block, on the text
stream's own states where that block reads them.

On SD the cross-attention keys and values read the text encoder's output directly, so Eq. 5's e_m / e_s are
the encoder's [EoT] rows. In an MMDiT the text is a second stream that every joint block rewrites: block i's
`attn.add_k_proj` / `attn.add_v_proj` (the text's keys and values in the joint softmax, what the image reads)
take c_i = LN(h_i)(1 + scale_i(t)) + shift_i(t), the text stream after i blocks, modulated by the timestep and
the pooled vector. The default stage T edits only the entry, `context_embedder`, and lets the blocks carry the
change; this variant maps the concept where each block reads it. For each block i

    W_i' = W_i T_i,   T_i = B_i M_i⁻¹   (Eq. 5 with e_m, e_s, C taken from c_i)

with e_m / e_s the c_i rows at the spec's token role (the same positions as in the encoder's rows: the context
stream keeps one row per token) of the malicious / safe prompt of a pair under the SAME (z_t, t), and the
preservation prior C_i = Σ c cᵀ / n over the preservation prompts' rows at those points. One T_i serves the
block's key and value projections (they read the same c_i). The points (z_t, t): `points` unconditional
trajectories of the original model (Euler, 50 flow steps, from seeded noise), each stopped at a step spread
over the first half — the noisy part of the trajectory in which TRCE finds the concept decided (stage V's
early steps) — so that c_i is read on latents the model itself produces, not on noise it never sees at low σ.

The states are read from the unedited model through forward hooks on the projections (their inputs), one
forward per prompt batch and point: every T_i is solved on the original stream, as UCE solves each
cross-attention layer on the original encoder output. FLUX's 38 single-stream blocks have no separate text
projections (one sequence, shared weights) and are left alone: the change reaches them through the joint
blocks' outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from trce.errors import TrceError
from trce.families import TextInput, family_of
from trce.tokens import role_positions, tokenize

log = logging.getLogger(__name__)

TRAJECTORY_STEPS = 50  # the flow sampler's steps of the trajectories the points are taken from


def stream_inputs(pipe) -> list[TextInput]:
    """The family's per-block text-stream projections, or a clear error where it has none."""
    fam = family_of(pipe)
    inputs = fam.text_stream_inputs(pipe)
    if not inputs:
        raise TrceError(f"layerwise stage T needs a joint-attention denoiser (sd3, flux); the {fam.name} family's "
                        "text projections read the text encoder's states directly, which stage T already maps")
    return inputs


@torch.no_grad()
def stream_points(pipe, points: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`points` (z_t (1, C, h, w), t) pairs on unconditional trajectories of the model, each stopped at a step spread
    over the first half of a TRAJECTORY_STEPS-step flow schedule."""
    fam = family_of(pipe)
    den = fam.denoiser(pipe)
    dev, dt = den.device, den.dtype
    uncond = fam.unconditional(pipe).to(dev, dt)  # (1, L, D)
    stops = torch.linspace(0, TRAJECTORY_STEPS // 2 - 1, points).round().long().tolist()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for stop in stops:
        sampler = fam.sampler(pipe.scheduler.config, TRAJECTORY_STEPS, dev)
        z = torch.randn((1, *fam.latent_shape(pipe)), generator=gen).to(dev, dt) * sampler.init_noise_sigma
        for t in sampler.timesteps[:stop]:
            z = sampler.step(fam.predict(den, z, t, uncond), t, z).prev_sample
        out.append((z, sampler.timesteps[stop]))
    return out


@contextmanager
def _reading(pipe, inputs: Sequence[TextInput]):
    """Forward hooks that keep the input of each layer group's first projection: {name: (B, m, D)}."""
    from trce.edit import resolve_module

    seen: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for inp in inputs:
            module = resolve_module(pipe, inp.paths[0].rsplit(".", 1)[0])

            def hook(_module, args, _out, name=inp.name):
                seen[name] = args[0].detach()

            handles.append(module.register_forward_hook(hook))
        yield seen
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def stream_states(pipe, prompts: Sequence[str], inputs: Sequence[TextInput], pts, rows_of, batch_size: int,
                  progress: bool, desc: str, accumulate: bool = False):
    """Read every group's text-stream states of `prompts` at every point.

    rows_of(i, ids_row) -> the token positions kept for prompt i. Without `accumulate`: {name: [(prompt i, point
    k, position) -> row]} as a dict of (n_kept, D) float64 tensors ordered by (i, position, k), with the index
    list; with it: {name: (Σ r rᵀ (D, D) float64, count)} over the kept rows (the preservation prior).
    """
    fam = family_of(pipe)
    den = fam.denoiser(pipe)
    dev, dt = den.device, den.dtype
    tok = fam.tokenizer(pipe)
    kept: dict[str, list[torch.Tensor]] = {inp.name: [] for inp in inputs}
    sums: dict[str, list] = {inp.name: [None, 0] for inp in inputs}
    order: list[tuple[int, int, int]] = []
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, mininterval=1)
    try:
        with _reading(pipe, inputs) as seen:
            for s in range(0, len(prompts), batch_size):
                batch = list(prompts[s:s + batch_size])
                ids = tokenize(tok, batch)  # (B, L): row positions of the context stream
                cond = fam.encode(pipe, batch).to(dev, dt)  # (B, L', D)
                picks = [(i, p) for i in range(len(batch)) for p in rows_of(s + i, ids[i])]
                if not picks:
                    bar.update(len(batch))
                    continue
                bi, pos = (torch.tensor(x) for x in zip(*picks, strict=True))
                per_point = {inp.name: [] for inp in inputs}
                for z, t in pts:
                    fam.predict(den, z.expand(len(batch), *z.shape[1:]), t, cond)
                    for inp in inputs:
                        per_point[inp.name].append(seen[inp.name][bi, pos].to("cpu", torch.float64))  # (n, D)
                for inp in inputs:
                    rows = torch.stack(per_point[inp.name], dim=1)  # (n, K, D)
                    if not torch.isfinite(rows).all():
                        raise TrceError("the denoiser produced NaN/inf text-stream states (try --dtype fp32)")
                    if accumulate:
                        flat = rows.reshape(-1, rows.shape[-1])
                        sums[inp.name][0] = flat.T @ flat + (0 if sums[inp.name][0] is None else sums[inp.name][0])
                        sums[inp.name][1] += flat.shape[0]
                    else:
                        kept[inp.name].append(rows)
                if not accumulate:
                    order.extend((s + i, p) for i, p in picks)
                bar.update(len(batch))
    finally:
        bar.close()
    if accumulate:
        return sums
    return {name: torch.cat(v) for name, v in kept.items() if v}, order


def solve_layerwise(pipe, pairs, prompts, parts, preserve_parts, eta: float, ridge: float, points: int, seed: int,
                    batch_size: int, progress: bool):
    """{group name: (T, LowRank | None, diagnostics)} and the stream inputs, for every joint block (module doc)."""
    from trce.methods.closed_form import diagnostics, pair_index, preserve_weight, solve_low_rank, solve_transform

    fam = family_of(pipe)
    tok = fam.tokenizer(pipe)
    inputs = stream_inputs(pipe)
    pts = stream_points(pipe, points, seed)
    distinct = list(dict.fromkeys([p.malicious for p in pairs] + [p.safe for p in pairs]))
    index = {p: i for i, p in enumerate(distinct)}
    ids = tokenize(tok, distinct)  # (N, L)
    rows_m, rows_s, _, dropped = pair_index(tok, pairs, ids, index, parts)
    wanted: dict[int, list[int]] = {}
    for i, p in rows_m + rows_s:
        wanted.setdefault(i, []).append(p)
    states, order = stream_states(pipe, distinct, inputs, pts, lambda i, _row: list(dict.fromkeys(wanted.get(i, []))),
                                  batch_size, progress, "layerwise: concept prompts")
    where = {key: j for j, key in enumerate(order)}
    take_m = torch.tensor([where[r] for r in rows_m], dtype=torch.long)
    take_s = torch.tensor([where[r] for r in rows_s], dtype=torch.long)
    sums = stream_states(pipe, prompts, inputs, pts, lambda _i, row: role_positions(tok, row, preserve_parts),
                         batch_size, progress, "layerwise: preservation prior", accumulate=True)
    solved = {}
    for inp in inputs:
        width = resolve_width(pipe, inp)
        rows = states.get(inp.name)
        em = rows[take_m].reshape(-1, width) if rows is not None else torch.zeros(0, width, dtype=torch.float64)
        es = rows[take_s].reshape(-1, width) if rows is not None else torch.zeros(0, width, dtype=torch.float64)
        total, count = sums[inp.name]
        cov = total / count if count else torch.zeros(width, width, dtype=torch.float64)
        # the paper's η as stage T applies it: η² x the prior's rows per caption (and per (z_t, t) point)
        weight = preserve_weight(eta, count, len(prompts) * len(pts))
        t, diag = solve_transform(em, es, cov, weight, ridge)
        solved[inp.name] = (t, solve_low_rank(em, es, cov, weight, ridge), diag | diagnostics(t, em, es, cov),
                            int(em.shape[0]))
    return inputs, solved, dropped


def resolve_width(pipe, inp: TextInput) -> int:
    from trce.edit import resolve

    return int(resolve(pipe, inp.paths[0]).shape[1])
