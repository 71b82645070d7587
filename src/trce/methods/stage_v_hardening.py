"""TRCE stage V hardened (`robust=R`; `trce.erase(..., robust=R)` and `trce erase --robust R` harden T and V).

Eq. 8 steers the trajectories of the spec's prompts c^m. An attacker who chooses the text encoder's INPUT, a
prefix δ of k free vectors before the prompt, finds a conditioning c^adv = τ([δ; c^m]) that the edited model reads
as the concept again: a trajectory Eq. 8 never saw. Hardening puts those conditionings into the loss:

1. adversaries. Round r = 0..R-1 runs before optimizer step s_r = ⌊r·S/R⌋ of the run's S steps (round 0 before
   training) and attacks, for `robust_prompts` pairs p of the spec (a seeded draw per round among the pairs that
   have cached trajectories; never an evaluation suite's prompts), the CURRENT model θ_r: the pipeline with stage
   T's edit and the stage-V weights trained so far. The attack is the white-box soft prompt that hardens stage T
   (`trce.methods.robust.soft_attack`, UnlearnDiffAtk's Eq. 3 without projection):
       δ*_p = argmin_δ (1/S') Σ_s || ε_θr( √ᾱ_s z0_p + √(1−ᾱ_s) ε_s, τ([δ; c^m_p]), t_s ) − ε_s ||²,
   z0_p the ORIGINAL model's image of c^m_p. What joins the loss is the full conditioning
   c^adv_p = τ([δ*_p; c^m_p]) (L, D), the text encoder's output that the denoiser reads, made by the model family
   (`family.encode_ids`), so every architecture is hardened the same way.
2. the loss. Pair p's adversaries A_p (all rounds so far) join its plain conditioning at the SAME cached points:
   concept sample (n, k) of pair p is conditioned on c ~ U(A_p) with probability ρ (`robust_mix`) when A_p ≠ ∅,
   else on c^m_p, and
       L_erase(c) = max( ||ε_θ'(z_t^m, c, t) − f_safe||² − ||ε_θ'(z_t^m, c, t) − f_unsafe||² + α, 0 )   (Eq. 8)
   with z_t^m, f_safe and f_unsafe of the ORIGINAL model on c^m (Eq. 6, 7); the ∅ half of Eq. 8 and Eq. 9 are
   unchanged. Why those points and targets: the attack pulls ε_θ'(·, c^adv) towards the original's ε on noisy
   images of c^m, so the trajectory c^adv opens runs (up to the attack's residual) where the original's c^m
   trajectory runs, through z_t^m; what the erased model should predict there is what it should predict for c^m,
   f_safe, away from f_unsafe. So the loss closes the path the attack opened where that path lies, with no new
   sampling and no reference call in the loop. Altogether the min-max
       min_θ' E_(n,k) [ (1−ρ) L_erase(c^m) + ρ L_erase(c^adv(θ')) + L_erase(∅) ] / 2 + λ L_preserve       (Eq. 8, 9)
   solved by alternation: each round solves the inner problem for θ_r, and training minimises with the
   adversaries held fixed until the next round.

3. consistency (`robust_consistency` κ > 0, beyond the paper; TRADES' split of adversarial training into a plain
   loss and a consistency term, Zhang et al. 2019): Eq. 8's hinge is linear in ε̂ (its gradient is the constant
   2(f_unsafe − f_safe)), so it pushes an adversarial prediction along the same direction however close that
   prediction already is to the concept's. A sample conditioned on c^adv_p also pays
       κ ||ε_θ'(z_t^m, c^adv_p, t) − sg(ε_θ'(z_t^m, c^m_p, t))||²
   (sg: no gradient), the distance to what the model in training predicts for the plain prompt at the same point,
   which Eq. 8 already erases: the prefix the attack found should change nothing. One more forward pass (without
   gradient) per adversarial sample.

The mix is a pure function of (seed, epoch): its draws come from a generator of their own, so the batches are the
plain run's and robust=0 runs the very code of the unhardened stage (bit for bit). The adversaries found so far go
into every checkpoint (`adversaries.safetensors`, their records in `state.json`); a round is attacked through a
results file in the checkpoint folder (`adversaries/round-N-<digest of the attacked weights>/`), so a run killed
inside a round finishes that round's attack where it stopped, a file is reused only for the very weights it was
found against, and under `accelerate launch` the round's targets are split between the processes (which is why a
hardened run over several processes needs a checkpoint folder). `Edit.info["robust"]` records each round (step,
pairs, the attack's objective at its start, its end and for the plain prompt, the Eq. 8 hinge of the current model
under c^m and under the adversaries at the pairs' cached points, the share of samples trained on adversaries and
their hinge until the next round, seconds) and, under `final`, both hinges at every adversary after training.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from trce.edit import Edit
from trce.errors import TrceError
from trce.methods.stage_v_config import StageVConfig
from trce.methods.stage_v_loss import triplet_loss
from trce.methods.training import Checkpoints
from trce.methods.trajectories import Reference, mix_seed

log = logging.getLogger(__name__)


def round_steps(rounds: int, total: int) -> list[int]:
    """s_r = ⌊r·S/R⌋: the optimizer step before which round r runs (round 0 before training)."""
    return [r * total // rounds for r in range(rounds)]


def adversary_draws(seed: int, epoch: int, shape: tuple[int, ...]) -> torch.Tensor:
    """(2, *shape) uniform [0, 1) draws of an epoch's concept samples: [0] decides whether a sample takes an adversary
    (< robust_mix), [1] which of its pair's. A pure function of (seed, epoch), apart from the batch plan's draws."""
    gen = torch.Generator("cpu").manual_seed(mix_seed("stage-v-adversary", seed, epoch))
    return torch.rand((2, *shape), generator=gen)


@contextlib.contextmanager
def original_pipeline(pipe, family, ref: Reference):
    """Within the block, a pipeline that draws as the ORIGINAL model: the reference pipeline, `pipe` itself (stage V
    alone), or `pipe` with the reference denoiser's tensors written over the ones an earlier stage changed."""
    if ref.encode_pipe is not pipe:
        yield ref.encode_pipe
        return
    own = family.denoiser(pipe)
    if ref.denoiser is own:
        yield pipe
        return
    mine = dict(own.named_parameters())
    theirs = dict(ref.denoiser.named_parameters())
    if set(mine) != set(theirs):
        raise TrceError("the stage V reference denoiser has other parameters than the pipeline's; pass the original "
                        "model of this pipeline")
    changed = {f"{family.denoiser_name}.{n}": p.detach() for n, p in theirs.items()
               if not torch.equal(p.detach().to(mine[n].device), mine[n].detach())}
    with Edit(weights=changed, method="original").applied(pipe, check_base=False):
        yield pipe


class Hardening:
    """The adversaries of a hardened stage V run (module doc): when each round runs, the pool, the per-sample mix and
    the records. Every process holds the same pool (the attacks' results are shared through their files)."""

    def __init__(self, pipe, family, pairs, emb_m: torch.Tensor, data, config: StageVConfig, ref: Reference, acc,
                 ckpt: Checkpoints | None, total: int, progress: bool):
        from trce.methods.robust import pick_pairs

        self.pipe, self.family, self.config, self.ref, self.acc = pipe, family, config, ref, acc
        self.prompts = [m for m, _ in pairs]
        self.emb_m = emb_m  # (P, L, D) c^m
        self.lat, self.t, self.f_safe, self.f_unsafe, pair_index = data  # (N, K, C, h, w), (K,), ..., (N,)
        self.first: dict[int, int] = {}  # pair -> its first cached trajectory (where the hinges are measured)
        for n, p in enumerate(pair_index.tolist()):
            self.first.setdefault(p, n)
        present = sorted(self.first)  # pairs without a trajectory never reach Eq. 8: not attacked
        self.seed = mix_seed("stage-v-robust", config.seed)
        self.starts = round_steps(config.robust, total)
        self.picks = [[present[j] for j in pick_pairs(present, config.robust_prompts, self.seed, r)]
                      for r in range(config.robust)]
        self.folder = ckpt.folder / "adversaries" if ckpt is not None else None
        if self.folder is None and acc.num_processes > 1:
            raise TrceError(f"hardened stage V over {acc.num_processes} processes shares each round's adversaries "
                            "through its checkpoint folder; give it a cache or checkpoint folder and checkpoint_every "
                            "> 0, or set robust=0")
        self.progress = progress and acc.is_main_process
        self.cond = emb_m.new_zeros((0, *emb_m.shape[1:]))  # (N_adv, L, D) c^adv
        self.pair = torch.zeros(0, dtype=torch.long, device=emb_m.device)  # (N_adv,) the pair of each
        self.records: list[dict] = []
        self.reference: dict[int, torch.Tensor] | None = None  # pair -> the original model's latents of c^m
        self._index()

    # ------------------------------------------------------------------ the pool
    def _index(self) -> None:
        """count (P,) adversaries per pair and table (P, A_max) their rows in the pool (-1 past the count)."""
        n_pairs = self.emb_m.shape[0]
        self.count = torch.bincount(self.pair, minlength=n_pairs)  # (P,)
        table = torch.full((n_pairs, max(1, int(self.count.max()) if len(self.pair) else 1)), -1, dtype=torch.long)
        for p in range(n_pairs):
            rows = (self.pair == p).nonzero()[:, 0].cpu()
            table[p, :len(rows)] = rows
        self.table = table.to(self.pair.device)

    def mix(self, emb: torch.Tensor, pair: torch.Tensor, u_mix: torch.Tensor, u_pick: torch.Tensor,
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """emb (B, L, D) c^m of the samples' pairs `pair` (B,) -> the conditionings with an adversary of the pair
        where u_mix < robust_mix and the pair has one (u_pick picks which), and (B,) bool: where it took one."""
        count = self.count[pair]  # (B,)
        took = (u_mix < self.config.robust_mix) & (count > 0)
        if not bool(took.any()):
            return emb, took
        j = torch.minimum((u_pick * count).long(), (count - 1).clamp(min=0))  # (B,) uniform in [0, count)
        rows = self.table[pair, j].clamp(min=0)  # (B,) rows of the pool
        return torch.where(took[:, None, None], self.cond[rows], emb), took

    def tally(self, took: torch.Tensor, hinge: torch.Tensor) -> None:
        """Add a micro-batch's samples (all processes) to the latest round's training record: how many took an
        adversary, and the Eq. 8 hinge (B,) of those and of the plain ones."""
        took = took.float()
        sums = torch.stack([torch.tensor(float(len(took)), device=hinge.device), took.sum(),
                            (hinge * took).sum(), (hinge * (1 - took)).sum()])
        sums = self.acc.reduce(sums, reduction="sum").tolist()
        trained = self.records[-1]["trained"]
        for key, value in zip(("samples", "adversarial", "hinge_adversarial_sum", "hinge_plain_sum"), sums):
            trained[key] += value

    # ------------------------------------------------------------------ rounds
    def rounds_due(self, step: int, params: dict[str, torch.nn.Parameter], model: torch.nn.Module) -> None:
        """Run every round due before optimizer step `step` (s_r <= step) that has not run yet."""
        while len(self.records) < len(self.starts) and self.starts[len(self.records)] <= step:
            self._round(len(self.records), step, params, model)

    def _round(self, r: int, step: int, params: dict[str, torch.nn.Parameter], model: torch.nn.Module) -> None:
        from trce.methods.robust import reference_latents_for, soft_attack

        cfg = self.config
        t0 = time.perf_counter()
        picked = self.picks[r]
        if self.reference is None:  # the original's images of every round's prompts, once (seeded: a resume remakes them)
            every = sorted({i for pick in self.picks for i in pick})
            with original_pipeline(self.pipe, self.family, self.ref) as original:
                self.reference = reference_latents_for(original, self.prompts, every, cfg.seed,
                                                       cfg.robust_reference_steps, cfg.robust_guidance, cfg.image_size)
        # the CURRENT model: the pipeline (stage T applied) with the stage-V weights trained so far
        current = Edit(weights={f"{self.family.denoiser_name}.{n}": p.detach() for n, p in params.items()},
                       method="trce")
        results = None
        if self.folder is not None:  # keyed by the exact weights attacked: reused only for them
            results = self.folder / f"round-{r + 1}-{current.digest()['tensors'][:16]}" / "soft-prompt.jsonl"
        found = soft_attack(self.pipe, current, self.prompts, picked, tokens=cfg.robust_tokens,
                            steps=cfg.robust_steps, samples=cfg.robust_samples, lr=cfg.robust_lr,
                            seed=mix_seed("stage-v-adversary-round", self.seed, r) % 2**31, reference=self.reference,
                            progress=self.progress, results=results, size=cfg.image_size)
        cond = torch.stack([res.embeds["prompt_embeds"] for res in found]).to(self.emb_m)  # (n, L, D) c^adv
        if cond.shape[1:] != self.emb_m.shape[1:]:
            raise TrceError(f"the soft-prompt conditionings have shape {tuple(cond.shape[1:])}, the prompts' "
                            f"{tuple(self.emb_m.shape[1:])}: this model family's encode_ids and encode disagree")
        pair = torch.tensor(picked, dtype=torch.long, device=self.pair.device)  # (n,)
        plain, adversarial = self.hinges(model, cond, pair)
        self.cond, self.pair = torch.cat([self.cond, cond]), torch.cat([self.pair, pair])
        self._index()
        record = {
            "round": r + 1, "step": step, "pairs": list(picked), "adversaries": len(picked),
            "objective_start": _mean(res.objective_start for res in found),  # the attack's Eq. 3 at its start
            "objective": _mean(res.objective for res in found),  # ... at the adversary found
            "objective_plain": _mean(res.objective_plain for res in found),  # ... for the plain prompt
            "erase_plain": plain, "erase_adversarial": adversarial,  # Eq. 8 hinge of the current model
            "trained": {"samples": 0.0, "adversarial": 0.0, "hinge_adversarial_sum": 0.0, "hinge_plain_sum": 0.0},
            "seconds": round(time.perf_counter() - t0, 3),
        }
        log.info("stage V hardening round %d at step %d: %d adversaries, attack objective %.4g -> %.4g (plain %.4g), "
                 "Eq. 8 hinge plain %.4g, adversarial %.4g, %.1fs", r + 1, step, len(picked),
                 record["objective_start"], record["objective"], record["objective_plain"], plain, adversarial,
                 record["seconds"])
        self.records.append(record)

    @torch.no_grad()
    def hinges(self, model: torch.nn.Module, cond: torch.Tensor, pair: torch.Tensor) -> tuple[float, float]:
        """Mean Eq. 8 hinge of `model` under c^m and under the adversaries `cond` (n, L, D) of pairs `pair` (n,), at
        every cached step of each pair's first trajectory: how much of the erasure each adversary undoes."""
        keep = self.t.shape[0]
        chunk = max(1, self.config.cache_batch_size)
        plain, adversarial = [], []
        for c, p in zip(cond, pair.tolist()):
            n = self.first[p]
            for k0 in range(0, keep, chunk):
                ks = slice(k0, min(keep, k0 + chunk))
                z, t = self.lat[n, ks], self.t[ks]  # (k, C, h, w), (k,)
                e = torch.cat([self.emb_m[p].expand(len(z), -1, -1), c.expand(len(z), -1, -1)])  # (2k, L, D)
                with self.acc.autocast():
                    out = self.family.predict(model, torch.cat([z, z]), torch.cat([t, t]), e).float()
                fs, fu = self.f_safe[n, ks], self.f_unsafe[n, ks]
                h = triplet_loss(out, torch.cat([fs, fs]), torch.cat([fu, fu]), self.config.margin)  # (2k,)
                plain.append(h[:len(z)])
                adversarial.append(h[len(z):])
        return float(torch.cat(plain).mean()), float(torch.cat(adversarial).mean())

    # ------------------------------------------------------------------ checkpoints and records
    def files(self) -> dict[str, dict[str, torch.Tensor]]:
        if not len(self.pair):
            return {}
        return {"adversaries.safetensors": {"cond": self.cond, "pair": self.pair}}

    def load(self, files: dict, state: dict, where) -> None:
        records = state.get("robust")
        saved = files.get("adversaries.safetensors", {})
        n = sum(r["adversaries"] for r in records or [])
        if records is None or (n and set(saved) != {"cond", "pair"}) or (n and len(saved["pair"]) != n):
            raise TrceError(f"checkpoint {where} does not hold the adversaries of this hardened stage V run; delete it")
        self.records = [dict(r, trained=dict(r["trained"])) for r in records]
        if n:
            self.cond = saved["cond"].to(self.emb_m)
            self.pair = saved["pair"].to(self.pair.device)
        self._index()

    def summary(self, model: torch.nn.Module) -> dict:
        """Edit.info["robust"]: the rounds (training tallies as means) and both hinges at every adversary after
        training."""
        rounds = []
        for r in self.records:
            tr = r["trained"]
            adv, samples = tr["adversarial"], tr["samples"]
            trained = {"samples": int(samples), "adversarial_share": adv / samples if samples else None,
                       "erase_adversarial": tr["hinge_adversarial_sum"] / adv if adv else None,
                       "erase_plain": tr["hinge_plain_sum"] / (samples - adv) if samples > adv else None}
            rounds.append({**r, "trained": trained})
        final = None
        if len(self.pair):
            plain, adversarial = self.hinges(model, self.cond, self.pair)
            final = {"erase_plain": plain, "erase_adversarial": adversarial}
        return {"rounds": rounds, "adversaries": len(self.pair), "mix": self.config.robust_mix, "final": final,
                "attack": "soft"}


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")
