"""What every attack shares: configs and budgets, targets and results, the real-token vocabulary,
text encoding with free token slots, and the per-target driver (resume, shards, progress).

Real tokens. A typed adversarial prompt must be text a user can type that the model reads back as
the very tokens the attack chose. `real_tokens(tokenizer)` keeps the whole-word tokens (CLIP's
`...</w>`) whose decoded word re-tokenises, on its own, to exactly that one id; words joined by
spaces then re-tokenise to the same ids, because CLIP's pre-tokeniser splits on whitespace
before BPE. Sub-word pieces, special tokens and byte tokens that are not valid text on their own
and words with control characters are left out (an attack over them would find prompts nobody
can type back).

Banned words. The concept's own words (`Vocabulary(banned=...)`; see `shapeworld_banned` and
`spec_banned`) are removed from the candidate vocabulary, by exact word, case-insensitive: an attack that types
"red" to get red proves nothing. MMA-Diffusion's own filter is wider (every token that *contains* one of its
sensitive words or the concept's), and `trce.attacks.mma_text` applies it by default.

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
`NAME.rank{r}.jsonl` and rank 0 merges the shards into the results file.

Random restarts. Every attack's `Budget` has `restarts` (default 1): the driver runs that many independent
searches per target, restart r seeded by `target_seed` from (run seed, target seed, target index, r). The
target's line then holds every restart (`extra["restarts"]`, `restart_results` reads them back) and its top
level is the restart with the lowest objective (the attack's own pick); `trce attack` judges each restart's
image and keeps the first that succeeds (`choose_restart`). Restart 0 is exactly the search of a run without
restarts, and with `restarts=1` nothing about a result changes: not its seed, its line, nor its digest.

Budget presets. An attack's `Budget` may declare `PRESETS: ClassVar[dict[str, dict]]` (e.g. `{"fast": {...}}`)
and a `preset: str = ""` field. `--budget preset=fast` (`parse_budget`), `budget={"preset": "fast", ...}`
(`make_budget`) and `from_preset(Budget, "fast", **overrides)` start from the preset's values, then apply the
other keys on top; the name is recorded in the budget, so digests and run keys differ from the attack's faithful
default, and `budget_label` names it in every table ("unlearndiff (fast preset)", with any setting changed on top:
"mma-text (fast preset + steps=5)"; a budget changed without a preset is labelled by its changes). A budget without
a preset (`preset=""`, the default) is the attack as its authors ran it; `budget_key` leaves an empty `preset` out,
so digests made before presets existed still match. An unknown name is one TrceError listing the available ones.

Seed streams. `AttackConfig.stream` (0: the attacks' own stream) adds a tag word to every search seed:
`trce attack` on a hardened patch uses `HELD_OUT_STREAM`, so its searches never replay a seed of the
hardening's own attacks (whose seed words end in a prompt index, never in the tag).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trce.errors import TrceError, choose
from trce.utils.processes import process_state
from trce.utils.records import Records

log = logging.getLogger(__name__)

METRICS = ("cosine", "l2")
# the seed-stream tag of attacks on hardened patches (see the module doc); any nonzero word far above a prompt index
HELD_OUT_STREAM = 0x5EED_A77C
RESTART_SELECTION = ("success first (the detector's verdict on the restart's after-image), then the lowest "
                     "objective of the attack, then the lowest restart index")


# --------------------------------------------------------------------------- configs
def check_budget(budget: Any, attack: str, positive: Sequence[str] = (), unit: Sequence[str] = ()) -> None:
    """Every number finite and >= 0; `positive` ones > 0; `unit` ones in [0, 1]; TrceError names the key.
    `restarts` (every attack's) is always positive."""
    positive = (*positive, "restarts")
    check_budget_preset(budget, attack)
    restarts = getattr(budget, "restarts", 1)
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise TrceError(f"{attack} budget restarts must be a positive integer, got {restarts!r}")
    for f in fields(budget):
        value = getattr(budget, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value) or value < 0 or (f.name in positive and value <= 0):
            need = "a positive" if f.name in positive else "a non-negative"
            raise TrceError(f"{attack} budget {f.name} must be {need} number, got {value}")
        if f.name in unit and value > 1:
            raise TrceError(f"{attack} budget {f.name} must be in [0, 1], got {value}")


PRESET = "preset"


def presets_of(budget_cls: type) -> dict[str, dict]:
    """The named presets a Budget class declares (`PRESETS`; {} when none)."""
    return dict(getattr(budget_cls, "PRESETS", None) or {})


def check_preset(budget_cls: type, name: str, attack: str) -> dict:
    """The values of preset `name` of `budget_cls`; an unknown name is one TrceError naming the available ones."""
    presets = presets_of(budget_cls)
    if PRESET not in {f.name for f in fields(budget_cls)} or not presets:
        raise TrceError(f"{attack} has no budget presets (asked for {name!r})")
    if name not in presets:
        raise TrceError(f"{attack} has no budget preset {name!r}; available: {', '.join(sorted(presets))}")
    return dict(presets[name])


def from_preset(budget_cls: type, name: str, attack: str | None = None, **overrides) -> Any:
    """A `budget_cls` from its preset `name` ("" or None: the defaults), `overrides` on top; the name recorded."""
    if not name:
        return budget_cls(**overrides)
    values = check_preset(budget_cls, name, attack or budget_cls.__module__.rpartition(".")[2])
    return budget_cls(**{**values, **overrides, PRESET: name})


def make_budget(budget_cls: type, values: Any, attack: str) -> Any:
    """A `budget_cls` from a mapping of its fields, `preset` first (`from_preset`); unknown keys name the valid ones."""
    values = dict(values)
    names = {f.name for f in fields(budget_cls)}
    for key in values:
        if key == PRESET and key not in names:
            check_preset(budget_cls, str(values[key]), attack)
        choose(f"{attack} budget key", key, names)
    name = values.pop(PRESET, "")
    return from_preset(budget_cls, str(name or ""), attack, **values)


def budget_label(attack: str, budget: Any) -> str:
    """The attack's name as tables show it, with every way its budget departs from the authors' default:
    "unlearndiff" (the faithful default), "unlearndiff (fast preset)", "mma-text (fast preset + steps=5)",
    "ring-a-bell (generations=100)". A budget given as a mapping (an old record) is labelled by its preset alone."""
    if budget is None or isinstance(budget, dict):
        preset = (budget or {}).get(PRESET, "")
        return f"{attack} ({preset} preset)" if preset else attack
    preset = getattr(budget, PRESET, "")
    base = from_preset(type(budget), preset, attack) if preset else type(budget)()
    changed = [f"{f.name}={getattr(budget, f.name)}" for f in fields(budget)
               if f.name != PRESET and getattr(budget, f.name) != getattr(base, f.name)]
    parts = ([f"{preset} preset"] if preset else []) + ([", ".join(changed)] if changed else [])
    return f"{attack} ({' + '.join(parts)})" if parts else attack


def record_label(attack: dict) -> str:
    """An attack record's (metrics.json `attack`) name as tables show it: its `display`, or for a record written before
    `display` existed, its name with the preset it records."""
    if attack.get("display"):
        return str(attack["display"])
    budget = attack.get("budget") if isinstance(attack.get("budget"), dict) else {}
    return budget_label(str(attack["name"]), {PRESET: attack.get(PRESET) or budget.get(PRESET, "")})


def check_budget_preset(budget: Any, attack: str) -> None:
    """A budget's recorded preset name must be one its class declares (called by `check_budget`)."""
    name = getattr(budget, PRESET, "")
    if not isinstance(name, str):
        raise TrceError(f"{attack} budget preset must be a name, got {name!r}")
    if name:
        check_preset(type(budget), name, attack)


def parse_budget(budget_cls: type, items: Sequence[str], attack: str, base: Any = None) -> Any:
    """`["steps=40", "lr=0.01"]` -> a `budget_cls` (from `base`, else its defaults); keys may use - or _.

    `preset=NAME` is applied first (from the preset's values, not `base`), then the other keys on top; a key given
    twice is refused."""
    current = base if base is not None else budget_cls()
    names = {f.name for f in fields(budget_cls)}
    items = [str(i) for i in items]
    preset = [i for i in items if i.partition("=")[0].strip().replace("-", "_") == PRESET]
    if preset:
        if len(preset) > 1:
            raise TrceError(f"--budget takes one preset, got {len(preset)}")
        name = preset[0].partition("=")[2].strip()
        current = from_preset(budget_cls, name, attack)
        items = [i for i in items if i not in preset]
    values: dict[str, Any] = {}
    given: dict[str, str] = {}  # key -> the item that gave it: a key given twice is refused, not the last one taken
    for item in items:
        key, sep, raw = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise TrceError(f"--budget takes key=value pairs, got {item!r}")
        choose(f"{attack} budget key", key, names)
        if key in given:
            raise TrceError(f"--budget gives {key} twice ({given[key]} and {item}); give each key once")
        given[key] = item
        default = getattr(current, key)
        raw = raw.strip()
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(raw)
                value: Any = raw.lower() in ("1", "true", "yes")
            elif isinstance(default, int):
                value = int(raw)
            elif isinstance(default, float):
                value = float(raw)
            else:
                value = raw
        except ValueError as exc:
            kind = type(default).__name__
            raise TrceError(f"{attack} budget {key} must be {kind}, got {raw!r}") from exc
        values[key] = value
    return dataclasses.replace(current, **values)


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


def budget_key(budget: Any) -> dict | None:
    """A budget as the digests and run keys record it: `restarts` left out at its default 1 and `preset` when
    empty, so that results and run folders made before restarts and presets existed still match."""
    if budget is None:
        return None
    d = dataclasses.asdict(budget)
    if d.get("restarts") == 1:
        del d["restarts"]
    if d.get(PRESET, None) == "":
        del d[PRESET]
    return d


def restarts_of(budget: Any) -> int:
    """The budget's number of independent searches per target (1 for a budget without `restarts`)."""
    return int(getattr(budget, "restarts", 1) or 1)


@dataclass(frozen=True)
class Target:
    """A prompt to attack: its position, text, and the seed its images are made with; `restart`: which of the
    target's independent searches this is (0 for the first, the only one without restarts)."""

    index: int
    prompt: str
    seed: int
    guidance: float | None = None
    case_number: int | str | None = None
    restart: int = 0


def as_targets(targets: Sequence[Target | str]) -> list[Target]:
    """Strings become Target(index=i, prompt, seed=i); indices must be unique."""
    out = [t if isinstance(t, Target) else Target(index=i, prompt=str(t), seed=i) for i, t in enumerate(targets)]
    if len({t.index for t in out}) != len(out):
        raise TrceError("attack targets must have unique indices")
    return out


@dataclass
class TargetResult:
    """One target's outcome.

    prompt     the adversarial text (None for soft prompts: not typed text)
    tokens     the adversarial token ids (the K searched tokens, or the prefix)
    ids        every content token id the model reads (between start and end of text), i.e. what
               re-tokenising `prompt` gives
    objective  the attack's objective at the returned prompt (lower is better), `objective_start`
               at its starting point, `objective_plain` for the target prompt typed as it is
    embeds     soft prompts: {"prompt_embeds": (L, D), "token_embeds": (k, D)}; `embeddings` is
               their file, relative to the results file's folder
    extra      the attack's own facts; with restarts also "restart" (which restart the top level is) and
               "restarts" (one record per restart, `restart_results`)
    """

    index: int
    target: str
    seed: int
    attack: str
    attack_seed: int
    prompt: str | None
    tokens: list[int]
    ids: list[int]
    objective: float
    objective_start: float
    objective_plain: float | None
    steps: int
    seconds: float
    digest: str = ""
    embeddings: str | None = None
    extra: dict = field(default_factory=dict)
    embeds: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    # in memory only: every restart's own result (their embeddings included), in restart order
    alternatives: list | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        d = dataclasses.asdict(dataclasses.replace(self, embeds=None, alternatives=None))
        for name in _MEMORY_ONLY:
            d.pop(name)
        return d

    @classmethod
    def from_json(cls, d: dict) -> TargetResult:
        names = {f.name for f in fields(cls)} - _MEMORY_ONLY
        return cls(**{k: v for k, v in d.items() if k in names})


_MEMORY_ONLY = frozenset({"embeds", "alternatives"})
_RESTART_FIELDS = ("attack_seed", "prompt", "tokens", "ids", "objective", "objective_start", "objective_plain",
                   "steps", "seconds", "embeddings", "extra")


def combine_restarts(parts: Sequence[TargetResult]) -> TargetResult:
    """One target's restarts as one result: the top level is the restart with the lowest objective (ties: the
    first), `extra["restart"]` says which, `extra["restarts"]` records each, `alternatives` holds them all."""
    best = min(range(len(parts)), key=lambda r: (parts[r].objective, r))
    top = parts[best]
    records = [{"restart": r, **{k: copy.deepcopy(getattr(p, k)) for k in _RESTART_FIELDS}}
               for r, p in enumerate(parts)]
    return dataclasses.replace(top, seconds=round(sum(p.seconds for p in parts), 3),
                               extra={**top.extra, "restart": best, "restarts": records}, alternatives=list(parts))


def restart_results(result: TargetResult, folder: Path | None = None) -> list[TargetResult]:
    """Every restart of one target's result, in restart order (the result alone when it has no restarts); their
    soft-prompt embeddings from memory, else from their files under `folder` (the results file's folder)."""
    records = result.extra.get("restarts")
    if not records:
        return [result]
    if result.alternatives is not None and len(result.alternatives) == len(records):
        return list(result.alternatives)
    out = []
    for rec in records:
        extra = dict(rec.get("extra") or {})
        part = dataclasses.replace(result, **{k: rec.get(k, getattr(result, k)) for k in _RESTART_FIELDS
                                              if k != "extra"}, extra=extra, embeds=None, alternatives=None)
        if part.embeddings is not None and folder is not None:
            from trce.utils import io

            part.embeds = io.load_tensors(folder / part.embeddings)
        out.append(part)
    return out


def choose_restart(objectives: Sequence[float], verdicts: Sequence[bool | None]) -> int:
    """The restart kept for a target (`RESTART_SELECTION`): the first to succeed by the detector's verdict (True;
    False and undecided None do not), then the lowest objective, then the lowest index."""
    return min(range(len(objectives)), key=lambda r: (verdicts[r] is not True, objectives[r], r))


# --------------------------------------------------------------------------- the real-token vocabulary
def real_tokens(tokenizer, limit: int | None = None) -> dict[int, str]:
    """id -> word of every whole-word token that re-tokenises to itself alone (see the module doc).

    `limit`: ids at or above it are left out (the text encoder's embedding rows).
    """
    special = set(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()  # token -> id
    n = len(tokenizer) if limit is None else min(len(tokenizer), limit)
    cands = sorted(i for tok, i in vocab.items() if tok.endswith("</w>") and i < n and i not in special)
    words = [w.strip() for w in tokenizer.batch_decode([[i] for i in cands])]
    keep = [(i, w) for i, w in zip(cands, words) if w and w.isprintable() and not any(c.isspace() for c in w)]
    back = tokenizer([w for _, w in keep], add_special_tokens=False).input_ids
    return {i: w for (i, w), b in zip(keep, back) if list(b) == [i]}


@dataclass(frozen=True)
class Vocabulary:
    """The candidate tokens of an attack: real tokens minus the banned words.

    ids (A,) token ids; words their text; banned the words removed; index maps a token id to its
    row in `ids` (-1 where it is not a candidate).
    """

    ids: torch.Tensor
    words: tuple[str, ...]
    banned: tuple[str, ...]
    removed: tuple[str, ...]

    @classmethod
    def for_pipeline(cls, pipe, banned: Sequence[str] = (), substring: bool = False) -> Vocabulary:
        """The whole-word tokens the pipeline's text encoder has embeddings for, banned words removed."""
        from trce.families import family_of

        fam = family_of(pipe)
        return cls.build(fam.tokenizer(pipe), banned, limit=fam.input_table(pipe).shape[0], substring=substring)

    @classmethod
    def build(cls, tokenizer, banned: Sequence[str] = (), limit: int | None = None,
              substring: bool = False) -> Vocabulary:
        """The real tokens minus the banned ones: by exact word, case-insensitive; with `substring`, every token whose
        raw text (lowercased, `</w>` included) contains one of `banned` (MMA-Diffusion's rule)."""
        real = real_tokens(tokenizer, limit)
        if substring:
            subs = tuple(dict.fromkeys(w.lower() for w in banned if w))
            raw = dict(zip(real, tokenizer.convert_ids_to_tokens(list(real))))
            hit = {i for i in real if any(b in raw[i].lower() for b in subs)}
            ban = subs
        else:
            words = {w.strip().lower() for w in banned if w.strip()}
            hit = {i for i, w in real.items() if w.lower() in words}
            ban = tuple(sorted(words))
        keep = {i: w for i, w in real.items() if i not in hit}
        removed = tuple(sorted(real[i] for i in hit))
        if not keep:
            raise TrceError("no candidate tokens left: the tokenizer has no whole-word tokens outside the banned "
                            + (f"substrings {', '.join(map(repr, ban))}" if substring else "words"))
        ids = sorted(keep)
        return cls(ids=torch.tensor(ids, dtype=torch.long), words=tuple(keep[i] for i in ids), banned=ban,
                   removed=removed)

    def __len__(self) -> int:
        return len(self.words)

    def index(self, vocab_size: int) -> torch.Tensor:
        """(vocab_size,) row in `ids` of each token id, -1 for non-candidates."""
        out = torch.full((vocab_size,), -1, dtype=torch.long)
        out[self.ids] = torch.arange(len(self.ids))
        return out

    def text(self, rows: Sequence[int] | torch.Tensor) -> str:
        """The typed text of candidate rows (positions in `ids`), words joined by spaces."""
        return " ".join(self.words[int(r)] for r in rows)

    def sample(self, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        """Uniformly random candidate rows of `shape`."""
        return torch.randint(len(self.ids), shape, generator=gen)


def shapeworld_banned(attribute: str, values: Sequence[str]) -> tuple[str, ...]:
    """A ShapeWorld concept's own words: each erased value's keyword and every synonym (spec and held out).

    Paraphrases are phrases of common words ("the color of blood") and are not banned word by word.
    """
    from trce.shapeworld import world

    v = world.vocab()
    words = set()
    for value in values:
        words.update(v.expressions(attribute, value, "keyword"))
        words.update(v.expressions(attribute, value, "synonym", "all"))
    return tuple(sorted(w.lower() for w in words))


def spec_banned(spec) -> tuple[str, ...]:
    """A concept spec's own words: every single-word expression (ShapeWorld specs: see `shapeworld_banned`)."""
    if spec.attribute is not None:
        return shapeworld_banned(spec.attribute, spec.values)
    return tuple(sorted({e.text.strip().lower() for e in spec.expressions if len(e.text.split()) == 1}))


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
