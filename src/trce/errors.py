"""The one exception type for user-facing failures.

A `TrceError` carries a single line that names the bad value and, where there is one, the fix.
The CLI prints it as `trce: error: ...` and exits with status 2; anything else is a bug and keeps
its traceback.

Library errors name the argument or setting by its Python name (`limit must be at least 1, got 0`)
and carry it as `field`; the CLI names its own flag instead (`--limit must be at least 1, got 0`)
through `message_for`.
"""

from __future__ import annotations

from collections.abc import Callable


class TrceError(Exception):
    """A user mistake or an environment problem, with a message fit to show as one line."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field

    def message_for(self, rename: Callable[[str], str | None]) -> str:
        """The message with its leading field name replaced by `rename(field)` (a CLI flag), when it has one."""
        text = str(self)
        if self.field and text.startswith(self.field + " "):
            name = rename(self.field)
            if name:
                return name + text[len(self.field):]
        return text


def check_integer(value, field: str, *, at_least: int | None = None) -> None:
    """An integer argument or setting (not a bool, not a float such as 1.5), at least `at_least` when given: the one
    check behind the library's and the CLI's `FIELD must be an integer, got 1.5` and `FIELD must be at least 1, got 0`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TrceError(f"{field} must be an integer, got {value!r}", field=field)
    if at_least is not None and value < at_least:
        raise TrceError(f"{field} must be at least {at_least}, got {value!r}", field=field)


MAX_SEED = 2 ** 32  # seeds reach numpy (SeedSequence, RandomState: no negatives, below 2**32) and torch.manual_seed


def check_seed(value, field: str = "seed") -> None:
    """A seed: an integer from 0 to 2**32 - 1 (the range every random generator trce seeds accepts)."""
    check_integer(value, field)
    if not 0 <= value < MAX_SEED:
        raise TrceError(f"{field} must be an integer from 0 to 2**32 - 1, got {value}", field=field)


def choose(kind: str, name: str, available) -> str:
    """Validate `name` against `available`, naming the choices (and a close match) on a typo."""
    import difflib

    options = sorted(available)
    if name in options:
        return name
    close = difflib.get_close_matches(name, options, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise TrceError(f"unknown {kind} {name!r}{hint}; available: {', '.join(options)}")


def choose_parts(kind: str, text: str, available) -> tuple[str, ...]:
    """`"a+b"` -> `("a", "b")`: names joined by '+' (token roles, parameter groups), each validated by `choose`; an
    empty part or a name given twice is refused."""
    if not isinstance(text, str):
        raise TrceError(f"{kind}s must be names joined by '+', got {text!r}")
    parts = tuple(p.strip() for p in text.split("+"))
    if any(not p for p in parts):
        raise TrceError(f"bad {kind} {text!r}; use one of {', '.join(sorted(available))} or a '+' combination")
    for p in parts:
        choose(kind, p, available)
    twice = sorted({p for p in parts if parts.count(p) > 1})
    if twice:
        raise TrceError(f"{kind} {text!r} names {twice[0]!r} twice")
    return parts
