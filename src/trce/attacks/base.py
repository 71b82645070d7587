"""What every attack shares: its config, the per-target driver (resume, shards, progress), search seeds, and the
token-geometry helpers of the optimisations. Budgets (`trce.attacks.budget`), targets and results
(`trce.attacks.targets`), restarts (`trce.attacks.restarts`) and the real-token vocabulary (`trce.attacks.vocabulary`)
live in modules of their own; `__all__` names them all, so `trce.attacks.base` offers an attack everything it needs.

Free slots. `family.encode_ids(pipe, ids, slots, embeds)` runs the text encoder(s) with the token
embeddings at `slots` replaced by `embeds` (a forward hook on each input-embedding layer, removed
in `finally`, `trce.tokens.slot_embeddings`), so gradients reach `embeds`; it returns the conditioning the denoiser
reads. With several text encoders (SDXL) a token's embedding is the concatenation of each encoder's row
(`family.input_table`). GCG's one-hot gradient, PEZ-style projected gradients and soft prompts all go
through it.

Driver. `run_targets` solves targets one by one with a tqdm bar; with `AttackConfig.results` it
appends one JSON line per finished target (fsynced), and a rerun skips targets whose line matches
(same target prompt, seed and configuration digest). Under `accelerate launch` the unfinished
targets are split with `PartialState.split_between_processes`; each rank appends to its own
`NAME.rank{r}.jsonl` and rank 0 merges the shards into the results file. With `restarts` in the budget, each
target's searches are combined as `trce.attacks.restarts` describes.

Seed streams. `AttackConfig.stream` (0: the attacks' own stream) adds a tag word to every search seed:
`trce attack` on a hardened patch uses `HELD_OUT_STREAM`, so its searches never replay a seed of the
hardening's own attacks (whose seed words end in a prompt index, never in the tag).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trce.attacks.budget import (
    PRESET,
    budget_key,
    budget_label,
    check_budget,
    check_budget_preset,
    check_preset,
    from_preset,
    make_budget,
    parse_budget,
    presets_of,
    record_label,
    restarts_of,
)
from trce.attacks.restarts import RESTART_SELECTION, choose_restart, combine_restarts, restart_results
from trce.attacks.targets import Target, TargetResult, as_targets
from trce.attacks.vocabulary import Vocabulary, real_tokens, shapeworld_banned, spec_banned
from trce.errors import TrceError, choose
from trce.utils.processes import process_state
from trce.utils.records import Records

# the attacks' shared names, wherever they live
__all__ = [
    "HELD_OUT_STREAM", "METRICS", "PRESET", "RESTART_SELECTION", "AttackConfig", "Target", "TargetResult", "Vocabulary",
    "as_targets", "budget_key", "budget_label", "check_budget", "check_budget_preset", "check_preset", "choose_restart",
    "combine_restarts", "compose", "embeddings_file", "finite", "from_preset", "frozen", "load_result", "make_budget",
    "merge_results", "parse_budget", "presets_of", "project", "real_tokens", "record_label", "restart_results",
    "restarts_of", "run_targets", "shapeworld_banned", "spec_banned", "target_seed",
]

log = logging.getLogger(__name__)

METRICS = ("cosine", "l2")
# the seed-stream tag of attacks on hardened patches (see the module doc); any nonzero word far above a prompt index
HELD_OUT_STREAM = 0x5EED_A77C


@dataclass(frozen=True)
class AttackConfig:
    """What every attack takes besides its targets.

    budget   the attack module's `Budget` (None: its defaults); recorded in every result line
    seed     seeds the search of target i as SeedSequence([seed, target seed, i])
    banned   words no adversarial token may be (the concept's own words)
    pairs    (with concept, without concept) prompt pairs: Ring-A-Bell's concept vector
    results  JSONL of finished targets (resume; required for several processes); soft prompts'
             embeddings go to `embeddings/` beside it
    size     image size of the reference images (white-box attacks; None: the model's)
    stream   seed-stream tag (0: none; `HELD_OUT_STREAM` on hardened patches, see the module doc)
    """

    budget: Any = None
    seed: int = 0
    banned: tuple[str, ...] = ()
    pairs: tuple[tuple[str, str], ...] = ()
    results: str | Path | None = None
    size: int | None = None
    stream: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stream, bool) or not isinstance(self.stream, int) or not 0 <= self.stream < 2 ** 32:
            raise TrceError(f"seed stream must be an integer in [0, 2**32), got {self.stream!r}")
        object.__setattr__(self, "banned", tuple(sorted({w.strip().lower() for w in self.banned if w.strip()})))
        object.__setattr__(self, "pairs", tuple((str(a), str(b)) for a, b in self.pairs))
        if self.size is not None and (self.size < 8 or self.size % 8):
            raise TrceError(f"--size must be a positive multiple of 8, got {self.size}")

    def with_budget(self, budget_cls: type, attack: str) -> AttackConfig:
        """This config with its budget resolved to `budget_cls` (a budget of another attack is refused)."""
        if self.budget is None:
            return dataclasses.replace(self, budget=budget_cls())
        if isinstance(self.budget, dict):
            return dataclasses.replace(self, budget=make_budget(budget_cls, self.budget, attack))
        if not isinstance(self.budget, budget_cls):
            raise TrceError(f"{attack} got a budget of type {type(self.budget).__name__}; "
                            f"use trce.attacks.get_attack({attack!r}).Budget")
        return self

    def digest(self, attack: str) -> str:
        """What a finished result line must have been made with to be reused (everything but `results`)."""
        key = {"attack": attack, "budget": budget_key(self.budget), "seed": self.seed, "banned": list(self.banned),
               "pairs": [list(p) for p in self.pairs], "size": self.size}
        if self.stream:  # only when set: lines written before streams existed stay valid
            key["stream"] = self.stream
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- token geometry
def project(embeds: torch.Tensor, table: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Nearest candidate row for each vector: embeds (k, D), table (A, D) -> (k,) rows.

    cosine: largest cosine similarity (PEZ, Wen et al. 2023); l2: smallest Euclidean distance.
    """
    choose("projection metric", metric, METRICS)
    e, t = embeds.detach().float(), table.float()
    if metric == "cosine":
        return (F.normalize(e, dim=-1) @ F.normalize(t, dim=-1).T).argmax(-1)  # (k, A) -> (k,)
    return torch.cdist(e, t).argmin(-1)


def compose(tokenizer, tokens: Sequence[int], prompt: str | None = None) -> tuple[torch.Tensor, slice, list[int]]:
    """(ids (L,), slot of `tokens`, content ids): [start] tokens [prompt tokens] [end] [padding].

    Exactly what the tokenizer gives for `text(tokens) + " " + prompt` (padded and truncated to its
    context length): the prompt's end is cut when it does not fit.
    """
    length = tokenizer.model_max_length
    tokens = [int(t) for t in tokens]
    if len(tokens) > length - 2:
        raise TrceError(f"{len(tokens)} adversarial tokens do not fit the text encoder's {length} positions "
                        f"(at most {length - 2})")
    body = tokens + (tokenizer(prompt, add_special_tokens=False).input_ids if prompt else [])
    if len(body) > length - 2:
        log.debug("prompt cut to %d tokens: %r", length - 2, prompt)
        body = body[: length - 2]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [tokenizer.bos_token_id, *body, tokenizer.eos_token_id] + [pad] * (length - 2 - len(body))
    return torch.tensor(ids, dtype=torch.long), slice(1, 1 + len(tokens)), body


@contextlib.contextmanager
def frozen(*modules) -> Iterator[None]:
    """Modules without parameter gradients (only the attack's inputs get them); flags restored after."""
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def finite(value: torch.Tensor | float, attack: str, target: Target, step: int, hint: str = "") -> float:
    """The value as a float; NaN/inf stops the attack with a message naming where and what to change."""
    number = float(value.detach() if isinstance(value, torch.Tensor) else value)
    if not math.isfinite(number):
        raise TrceError(f"{attack}: the objective became {number} at step {step} of target {target.index} "
                        f"({target.prompt!r}){'; ' + hint if hint else ''}")
    return number


def target_seed(config: AttackConfig, target: Target) -> int:
    """The search seed of one target's restart: independent of the other targets and of sharding.

    SeedSequence([seed, target seed, index]) for restart 0 (what every search used before restarts existed),
    with the restart index as a fourth word for restart r > 0 (SeedSequence pads short entropy with zeros, so
    a nonzero word is a new stream) and, with a seed stream (`AttackConfig.stream`), both words and the tag.
    """
    words = [int(config.seed), int(target.seed), int(target.index)]
    if target.restart or config.stream:
        words.append(int(target.restart))
    if config.stream:
        words.append(int(config.stream))
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint32)[0])


# --------------------------------------------------------------------------- processes and files
def merge_results(path: Path) -> dict[int, dict]:
    """Fold per-rank shards into `path` (one line per target index, the latest wins)."""
    return Records(path, "index").merge()


def load_result(rec: dict, folder: Path) -> TargetResult:
    result = TargetResult.from_json(rec)
    if result.embeddings is not None:
        from trce.utils import io

        result.embeds = io.load_tensors(folder / result.embeddings)
    return result


def _finished(rec: dict | None, target: Target, digest: str, folder: Path) -> bool:
    if rec is None or rec.get("digest") != digest or rec.get("target") != target.prompt or rec.get("seed") != target.seed:
        return False
    files = [rec.get("embeddings")] + [r.get("embeddings") for r in (rec.get("extra") or {}).get("restarts") or []]
    return all(f is None or (folder / f).exists() for f in files)


def run_targets(attack: str, targets: Sequence[Target | str], config: AttackConfig,
                solve: Callable[[Target], TargetResult], progress: bool = True) -> list[TargetResult]:
    """Solve every unfinished target (see the module doc); returns every target's result, in order.

    With `restarts` > 1 in the budget, `solve` runs once per restart (the target's `restart` set) and the target's
    result combines them (`combine_restarts`); a target is written, and resumed, as a whole.
    """
    targets = as_targets(targets)
    restarts = restarts_of(config.budget)
    digest = config.digest(attack)
    path = Path(config.results) if config.results is not None else None
    state = process_state()
    if path is None and state.num_processes > 1:
        raise TrceError("attacks sharded over several processes need a results file (AttackConfig.results)")
    records = Records(path, "index", state) if path is not None else None
    done = records.done() if records is not None else {}
    todo = [t for t in targets if not _finished(done.get(t.index), t, digest, path.parent if path else Path("."))]
    if len(todo) < len(targets) and state.is_main_process:
        log.info("%s: %d of %d targets already done, attacking %d", attack, len(targets) - len(todo), len(targets),
                 len(todo))
    fresh: dict[int, TargetResult] = {}
    with state.split_between_processes(todo) as mine, contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(mine, desc=attack, unit="target", mininterval=1,
                                       disable=not progress or not state.is_main_process))
        append = stack.enter_context(records.appender()) if records is not None else None
        for target in bar:
            parts = []
            for r in range(restarts):
                t0 = time.time()
                part = solve(dataclasses.replace(target, restart=r) if r else target)
                part.seconds = round(time.time() - t0, 3)
                part.digest = digest
                parts.append(part)
            result = parts[0] if restarts == 1 else combine_restarts(parts)
            fresh[target.index] = result
            bar.set_postfix(objective=f"{result.objective:.4g}")
            if append is not None:
                append([result.to_json()])
    if records is None:
        return [fresh[t.index] for t in targets]
    found = records.collect()
    missing = [t.index for t in targets if t.index not in found]
    if missing:
        raise TrceError(f"{path}: targets {missing[:5]} were not written; rerun the same command to finish")
    return [fresh[t.index] if t.index in fresh else load_result(found[t.index], path.parent) for t in targets]


def embeddings_file(config: AttackConfig, target: Target) -> tuple[Path | None, str | None]:
    """(absolute path, path relative to the results folder) where a soft prompt's tensors go (restart r > 0 of a
    target: `-r{r}` after the index)."""
    if config.results is None:
        return None, None
    rel = f"embeddings/{target.index:05d}{f'-r{target.restart}' if target.restart else ''}.safetensors"
    return Path(config.results).parent / rel, rel
